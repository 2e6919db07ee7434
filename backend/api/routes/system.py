"""Status, health and maintenance."""

import time

from fastapi import APIRouter, Request

from backend.api.deps import ServiceDep
from backend.api.schemas import HealthOut, PrototypesRebuilt, RebuildOut, StatusOut

router = APIRouter(tags=["system"])


@router.get("/health")
def health() -> HealthOut:
    """Liveness probe: answers as long as the process serves requests."""
    return HealthOut(status="ok")


@router.get("/status")
def status(service: ServiceDep, request: Request) -> StatusOut:
    """Counts per category, model, device, index type and whether the index matches the database."""
    return StatusOut(**service.status().model_dump(), uptime_s=round(time.monotonic() - request.app.state.started, 1))


@router.post("/admin/rebuild-index")
def rebuild_index(service: ServiceDep) -> RebuildOut:
    """Rebuild the FAISS index from the vectors stored in the database (no re-embedding)."""
    index = service.cache.rebuild("requested by POST /admin/rebuild-index")
    return RebuildOut(vectors=index.ntotal, categories=len(index.category_ids), origin=service.cache.origin)


@router.post("/admin/rebuild-prototypes")
def rebuild_prototypes(service: ServiceDep) -> PrototypesRebuilt:
    """Recompute every prototype from the stored given-label embeddings."""
    return PrototypesRebuilt(prototypes=service.rebuild_prototypes())
