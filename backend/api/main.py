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
from backend.service import SearchService

log = logging.getLogger(__name__)

# Multipart framing around the file: allowed on top of MAX_UPLOAD_SIZE before a request is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


async def _refresh_index(service: SearchService, every_s: float) -> None:
    """Pick up writes made by other processes (CLI populate, another server) without a restart."""
    if every_s <= 0:
        return
    while True:
        await asyncio.sleep(every_s)
        try:
            if await run_in_threadpool(service.refresh_if_stale):
                log.info("index refreshed from the database: %s", service.index_origin)
        except Exception:  # a database hiccup must not end the loop; the next round retries
            log.exception("index refresh failed")


def create_app(settings: Settings | None = None, service: SearchService | None = None) -> FastAPI:
    settings = settings or (service.settings if service else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service or await run_in_threadpool(SearchService, settings)
        # Load the model and the index before the first request, off the event loop.
        await run_in_threadpool(svc.embedder.load)
        await run_in_threadpool(svc.ensure_index)
        app.state.service = svc
        app.state.started = time.monotonic()
        refresher = asyncio.create_task(_refresh_index(svc, settings.index_refresh_seconds))
        yield
        refresher.cancel()
        await run_in_threadpool(svc.save_index)  # uploads since start are in the DB anyway; this saves a rebuild

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
