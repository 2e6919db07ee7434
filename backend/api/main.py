"""The FastAPI application: `python -m backend.cli serve`, or `uvicorn backend.api.main:create_app --factory`."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from backend.api.routes import categories, images, search, system
from backend.core.config import PROJECT_ROOT, Settings, get_settings
from backend.core.errors import AppError
from backend.index_cache import prune_change_log
from backend.service import SearchService

log = logging.getLogger(__name__)

# Multipart framing around the file: allowed on top of MAX_UPLOAD_SIZE before a request is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


PRUNE_EVERY_S = 3600.0


async def _refresh_index(service: SearchService, settings: Settings) -> None:
    """Follow writes made by other processes (CLI populate, workers, other servers) without a restart, and
    now and then forget old deletions from the change log."""
    every_s = settings.index_refresh_seconds
    if every_s <= 0:
        return
    pruned_at = 0.0
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(service.cache.refresh)
            if time.monotonic() - pruned_at > PRUNE_EVERY_S:
                await run_in_threadpool(prune_change_log, service.engine, settings.change_log_retention_days)
                pruned_at = time.monotonic()
        except Exception:  # a database hiccup must not end the loop; the next round retries
            log.exception("index refresh failed")


def create_app(settings: Settings | None = None, service: SearchService | None = None) -> FastAPI:
    settings = settings or (service.settings if service else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service if service is not None else await run_in_threadpool(SearchService, settings)
        # Load the model and the index before the first request, off the event loop.
        await run_in_threadpool(svc.embedder.load)
        await run_in_threadpool(svc.cache.get)
        app.state.service = svc
        app.state.started = time.monotonic()
        refresher = asyncio.create_task(_refresh_index(svc, settings))
        yield
        refresher.cancel()
        await run_in_threadpool(svc.cache.save)  # the next start loads it and applies only later changes

    app = FastAPI(
        title="Image similarity search",
        description="Two-stage image search: category prototypes first, then FAISS over the top categories.",
        version="1.0.0",
        lifespan=lifespan,
    )

    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(problems), "errors": exc.errors()}, status_code=422)

    @app.middleware("http")
    async def refuse_oversized_bodies(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_upload_size + MULTIPART_OVERHEAD:
            return JSONResponse(
                {"detail": f"request body larger than MAX_UPLOAD_SIZE ({settings.max_upload_size:,} bytes)"},
                status_code=413,
            )
        return await call_next(request)

    for module in (search, images, categories, system):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/app/")

    app.mount("/app", StaticFiles(directory=PROJECT_ROOT / "frontend", html=True), name="frontend")
    return app
