"""Status, health, readiness and maintenance."""

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from backend.api.deps import LifecycleDep, SettingsDep, WritesDep
from backend.api.errors import error_responses
from backend.api.security import Access, guard, viewer_is_admin
from backend.schemas import HealthOut, PrototypesRebuilt, ReadyOut, RebuildOut, StatusOut
from backend.storage.engine import DATABASE_ERRORS, database_problem

router = APIRouter(tags=["system"])


@router.get("/health", dependencies=[guard(Access.PUBLIC)])
async def health() -> HealthOut:
    """Liveness: answers while the process serves requests. Touches neither the database nor the worker
    threads, so it answers even when both are stuck."""
    return HealthOut(status="ok")


@router.get(
    "/ready",
    response_model=ReadyOut,
    dependencies=[guard(Access.PUBLIC)],
    responses={503: {"model": ReadyOut, "description": "not ready; `checks` says why"}},
)
async def ready(service: LifecycleDep, settings: SettingsDep) -> JSONResponse:
    """Readiness: the database answers, the model is loaded and the index reflects every committed change."""
    checks = {"model": "loaded" if service.model_loaded else "not loaded"}

    def database_and_index() -> None:
        checks["index"] = "current" if service.index_is_current() else "catching up with the database"
        checks["database"] = "ok"

    try:
        await asyncio.wait_for(run_in_threadpool(database_and_index), settings.db_timeout_seconds + 1)
    except TimeoutError:
        checks["database"] = f"no answer within {settings.db_timeout_seconds + 1:g} s"
    except DATABASE_ERRORS as exc:
        checks["database"] = f"unavailable: {database_problem(exc)}"
    ok = checks == {"model": "loaded", "index": "current", "database": "ok"}
    body = ReadyOut(ready=ok, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/status", dependencies=[guard(Access.SEARCH)], responses=error_responses())
async def status(service: LifecycleDep, settings: SettingsDep, request: Request) -> StatusOut:
    """Counts per category, model, device, database, index type and whether the index matches the database.
    Where the database lives (a path, a host) is shown to admin keys only."""
    out = StatusOut(
        **(await run_in_threadpool(service.status)).model_dump(), uptime_s=round(time.monotonic() - request.app.state.started, 1)
    )
    if not await viewer_is_admin(request):
        out.database.server = "embedded PostgreSQL (pgserver)" if settings.uses_embedded_db else "PostgreSQL server"
    return out


@router.post("/admin/rebuild-index", dependencies=[guard(Access.ADMIN)], responses=error_responses())
def rebuild_index(service: LifecycleDep) -> RebuildOut:
    """Rebuild the FAISS index from the vectors stored in the database (no re-embedding); retrain stage 1."""
    index = service.rebuild_index("requested by POST /admin/rebuild-index")
    return RebuildOut(vectors=index.ntotal, categories=len(index.category_ids), origin=service.index_origin)


@router.post("/admin/rebuild-prototypes", dependencies=[guard(Access.ADMIN)], responses=error_responses())
def rebuild_prototypes(writes: WritesDep) -> PrototypesRebuilt:
    """Recompute every prototype from the stored given-label embeddings."""
    return PrototypesRebuilt(prototypes=writes.rebuild_prototypes())


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[guard(Access.METRICS)],
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
def metrics() -> Response:
    """Prometheus metrics: HTTP requests, embedding and per-stage search time, index size and refreshes,
    database errors. Public unless METRICS_REQUIRE_KEY is set (then a key with the `metrics` scope)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
