"""Writes through the service besides ingestion (tests/ingest/): delete, and searching an empty catalogue."""

from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import Engine, select

from backend.core.search_params import SearchParams
from backend.imaging import decode_image
from backend.services.assembly import Services
from backend.services.search import SearchService
from backend.sources.datasets import Dataset
from backend.storage import catalogue
from backend.storage.engine import session_scope
from backend.storage.schema import Image as ImageRow
from tests.utils.catalogue import row_counts
from tests.utils.images import png
from tests.utils.settings import make_settings


def test_delete_updates_database_prototypes_and_index(writable_service: SearchService, engine: Engine, small: Dataset) -> None:
    index = writable_service.cache.get()
    with session_scope(engine) as s:
        victim = s.scalar(select(ImageRow.id).order_by(ImageRow.id).limit(1))
        cid = s.get(ImageRow, victim).category_id
    total = index.ntotal
    Services.around(writable_service).writes.delete(victim)
    assert index.ntotal == total - 1
    assert row_counts(engine) == (39, 39, 39)
    with session_scope(engine) as s:
        protos = catalogue.load_prototypes(s, writable_service.model)
    assert protos.counts[list(protos.category_ids).index(cid)] == 3
    results = writable_service.search_vectors(
        np.eye(1, index.dim, dtype=np.float32), SearchParams(limit=50, top_categories=10, use_prototypes=False)
    )[0].results
    assert victim not in [h.image_id for h in results]
    assert writable_service.cache.is_current()


def test_search_on_an_empty_catalogue_returns_nothing(engine: Engine, embedder, tmp_path: Path) -> None:
    writable_service = SearchService(make_settings(tmp_path, engine), engine, embedder)
    image = decode_image(png(Image.new("RGB", (40, 40), "red")), 10**7)
    for use_prototypes in (True, False):
        result = writable_service.search([image.rgb], SearchParams(limit=5, top_categories=3, use_prototypes=use_prototypes))[0]
        assert result.results == [] and result.vectors_total == 0
    assert writable_service.stage1_ranking([image.rgb])[0] == [[]]
