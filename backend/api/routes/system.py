"""Status, health and maintenance."""

import time

from fastapi import APIRouter, Request

from backend.api.deps import ServiceDep

router = APIRouter(tags=["system"])


@router.get("/health")
def health() -> dict:
    """Liveness probe: answers as long as the process serves requests."""
    return {"status": "ok"}


@router.get("/status")
def status(service: ServiceDep, request: Request) -> dict:
    """Counts per category, model, device, index type and whether the index matches the database."""
    return {**service.status(), "uptime_s": round(time.monotonic() - request.app.state.started, 1)}


@router.post("/admin/rebuild-index")
def rebuild_index(service: ServiceDep) -> dict:
    """Rebuild the FAISS index from the vectors stored in the database (no re-embedding)."""
    index = service.ensure_index(force_rebuild=True)
    return {"vectors": index.ntotal, "categories": len(index.category_ids), "origin": service.index_origin}


@router.post("/admin/rebuild-prototypes")
def rebuild_prototypes(service: ServiceDep) -> dict:
    """Recompute every prototype from the stored given-label embeddings."""
    return {"prototypes": service.rebuild_prototypes()}
