"""The FastAPI application: `python -m backend.cli serve`, or `uvicorn backend.api.main:create_app --factory`."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from backend.api.docs_pages import install_docs_pages
from backend.api.errors import install_error_handlers
from backend.api.limits import BodyLimit, RequestBudget
from backend.api.observability import RequestLog, instrument
from backend.api.routes import categories, duplicates, images, jobs, search, system, views
from backend.api.routes.jobs import ARCHIVE_PATH
from backend.api.security import (
    SAFE_METHODS,
    Access,
    KeyBeforeBody,
    SameOriginWrites,
    declare_access,
    guard,
    trusted_hosts,
)
from backend.core.config import PROJECT_ROOT, Settings, get_settings
from backend.services.assembly import Services
from backend.services.index_lifecycle import IndexLifecycle
from backend.services.search import SearchService
from backend.storage.engine import DATABASE_ERRORS, database_problem
from backend.telemetry import DATABASE_ERRORS_TOTAL

log = logging.getLogger(__name__)

# Multipart framing around the file: allowed on top of MAX_UPLOAD_SIZE before a request is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


PRUNE_EVERY_S = 3600.0


async def _refresh_index(lifecycle: IndexLifecycle, settings: Settings) -> None:
    """Follow writes made by other processes (CLI populate, workers, other servers) without a restart, and
    now and then forget old deletions from the change log."""
    every_s = settings.index_refresh_seconds
    if every_s <= 0:
        return
    pruned_at = 0.0
    failing = False
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(lifecycle.refresh)
            if time.monotonic() - pruned_at > PRUNE_EVERY_S:
                await run_in_threadpool(lifecycle.prune_change_log, settings.change_log_retention_days)
                pruned_at = time.monotonic()
        except DATABASE_ERRORS as exc:  # one line when it starts failing, one when it recovers; retried
            DATABASE_ERRORS_TOTAL.labels("index refresh").inc()
            if not failing:
                log.warning("index refresh paused: database unavailable: %s", database_problem(exc))
            failing = True
            continue
        except Exception:  # a bug must not end the loop either
            log.exception("index refresh failed")
            continue
        if failing:
            log.warning("index refresh resumed: the database answers again")
        failing = False


RESUME_EVERY_S = 60.0


async def _resume_staging(services: Services) -> None:
    """Staging that a crash (or a database outage) interrupted goes on: at start, then every minute."""
    while True:
        try:
            await run_in_threadpool(services.jobs.resume_staging)
        except DATABASE_ERRORS as exc:
            log.warning("staging not resumed: database unavailable: %s", database_problem(exc))
        except Exception:  # a bug must not end the loop
            log.exception("resuming staging failed")
        await asyncio.sleep(RESUME_EVERY_S)


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """The request path, outermost last (see the comments): every request passes through all of them."""
    # Innermost first: cross-site writes are refused before any work, CORS answers preflights for listed
    # origins only, and every request (refused ones too) is logged once.
    app.add_middleware(SameOriginWrites, allowed_origins=settings.cors_origins)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=sorted({"GET", "POST", "DELETE"} | SAFE_METHODS),
            allow_headers=["X-API-Key", "Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(KeyBeforeBody, routes_of=app)  # a write without its key is refused before its body is read
    too_large = f"request body larger than MAX_UPLOAD_SIZE ({settings.max_upload_size:,} bytes) allows"
    archive_too_large = f"archive larger than MAX_ARCHIVE_SIZE ({settings.max_archive_size:,} bytes) allows"
    larger = {ARCHIVE_PATH: (settings.max_archive_size + MULTIPART_OVERHEAD, archive_too_large)}
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_size + MULTIPART_OVERHEAD, message=too_large, larger=larger)
    # An archive upload may take longer than a search: an hour for its body (it is staged in the background).
    app.add_middleware(RequestBudget, seconds=settings.request_timeout_seconds, longer={ARCHIVE_PATH: 3600.0})
    # A Host that is not this server (DNS rebinding) is refused before anything else looks at the request.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts(settings), www_redirect=False)
    app.add_middleware(RequestLog)


def create_app(settings: Settings | None = None, service: SearchService | None = None) -> FastAPI:
    settings = settings or (service.settings if service else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        search = service if service is not None else await run_in_threadpool(SearchService, settings)
        services = Services.around(search)
        await run_in_threadpool(services.start)  # model, index, job queue and worker, off the event loop
        app.state.services = services
        app.state.started = time.monotonic()
        resumer = asyncio.create_task(_resume_staging(services))
        refresher = asyncio.create_task(_refresh_index(services.lifecycle, settings))
        yield
        refresher.cancel()
        resumer.cancel()
        await run_in_threadpool(services.stop)

    app = FastAPI(
        title="Image similarity search",
        description="Two-stage image search: category prototypes first, then FAISS over the top categories.",
        version="1.0.0",
        lifespan=lifespan,
        docs_url=None,  # install_docs_pages: the same pages with local assets
        redoc_url=None,
    )

    install_error_handlers(app)
    instrument(app)
    _add_middleware(app, settings)

    for module in (search, images, duplicates, views, categories, jobs, system):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False, dependencies=[guard(Access.PUBLIC)])
    def root() -> RedirectResponse:
        return RedirectResponse("/app/")

    install_docs_pages(app)
    declare_access(app, settings)

    app.mount("/app", StaticFiles(directory=PROJECT_ROOT / "frontend", html=True), name="frontend")
    return app
