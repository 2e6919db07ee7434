"""What `/status` and `status --json` report: the model, the database's counts, the index and stage 1."""

from sqlalchemy import Engine

from backend.core import search_params
from backend.core.config import Settings
from backend.embedding.embedder import Embedder
from backend.schemas import (
    CategoryCount,
    DatabaseStatus,
    IndexStatus,
    ModelStatus,
    RefreshStatus,
    SearchSettings,
    Stage2Status,
    Status,
)
from backend.search.live_index import LiveIndex
from backend.search.stage1 import Stage1
from backend.search.stage2 import Stage2
from backend.storage.engine import location, session_scope
from backend.storage.status_counts import status_counts


def build_status(
    settings: Settings, engine: Engine, embedder: Embedder, cache: LiveIndex, stage1: Stage1, stage2: Stage2 | None = None
) -> Status:
    # One statement: counts kept by triggers (no row is counted here) and the head the index is compared with.
    # No lock of the live index is taken, so a refresh or a link tick never holds /status up.
    with session_scope(engine, single_read=True) as session:
        read = status_counts(session, embedder.model_id)
    counts, images, models = read.categories, read.images, read.models
    return Status(
        model=ModelStatus(
            id=embedder.model_id,
            name=embedder.name,
            dim=embedder.dim,
            device=str(embedder.device),
            runtime=embedder.runtime,
            loaded=embedder.loaded,
        ),
        database=DatabaseStatus(
            server=location(settings, engine),
            images=images,
            vectors_for_model=models.get(embedder.model_id, 0),
            vectors_by_model=models,
            categories=[CategoryCount(id=cid, name=name, images=n, labelled=given) for cid, name, n, given in counts],
        ),
        index=index_status(settings, cache, cache.current_at(read.head)),
        settings=SearchSettings(
            use_prototype_filtering=settings.use_prototype_filtering,
            default_top_categories=settings.default_top_categories,
            default_search_limit=settings.default_search_limit,
            bounds=search_params.bounds(),
        ),
        stage1=stage1.status(),
        stage2=Stage2Status(engine=stage2.engine if stage2 else "in-process", **((stage2.status() if stage2 else None) or {})),
    )


def index_status(settings: Settings, cache: LiveIndex, current: bool) -> IndexStatus:
    index = cache.loaded
    last = cache.last_refresh
    return IndexStatus(
        **cache.layout_status(),
        lists=int(index.ivf.nlist) if index else 0,
        default_nprobe=settings.faiss_nprobe,
        retrain=index.needs_retraining() if index else [],
        loaded=index is not None,
        origin=cache.origin,
        vectors=index.ntotal if index else 0,
        categories=len(index.category_ids) if index else 0,
        current=current,
        seq=cache.seq,
        memory_bytes=cache.memory_bytes(),
        refreshes=dict(cache.refreshes),
        last_refresh=RefreshStatus(**vars(last)) if last else None,
    )
