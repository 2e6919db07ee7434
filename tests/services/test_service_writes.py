"""Writes through the service besides ingestion (tests/ingest/): delete, and searching an empty catalogue."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Engine, func, select

from backend.core.search_params import SearchParams
from backend.datasets import Dataset, balanced
from backend.imaging import decode_image
from backend.ingest.populate import ingest
from backend.services.search import SearchService
from backend.storage import catalogue
from backend.storage.engine import session_scope
from backend.storage.schema import Embedding, Prototype
from backend.storage.schema import Image as ImageRow
from tests.utils.images import png
from tests.utils.settings import make_settings


def counts(engine: Engine) -> tuple[int, int, int]:
    with session_scope(engine) as s:
        return (
            s.scalar(select(func.count()).select_from(ImageRow)),
            s.scalar(select(func.count()).select_from(Embedding)),
            s.scalar(select(func.coalesce(func.sum(Prototype.count), 0))),
        )


@pytest.fixture
def small(cifar_train: Dataset) -> Dataset:
    return Dataset("cifar10", balanced(cifar_train.samples, 40))


@pytest.fixture
def service(engine: Engine, embedder, small: Dataset, tmp_path: Path) -> SearchService:
    ingest(small, embedder, engine, max_pixels=10**7, progress=False)
    return SearchService(make_settings(tmp_path, engine), engine, embedder)


def test_delete_updates_database_prototypes_and_index(service: SearchService, engine: Engine, small: Dataset) -> None:
    index = service.cache.get()
    with session_scope(engine) as s:
        victim = s.scalar(select(ImageRow.id).order_by(ImageRow.id).limit(1))
        cid = s.get(ImageRow, victim).category_id
    total = index.ntotal
    service.delete(victim)
    assert index.ntotal == total - 1
    assert counts(engine) == (39, 39, 39)
    with session_scope(engine) as s:
        protos = catalogue.load_prototypes(s, service.model)
    assert protos.counts[list(protos.category_ids).index(cid)] == 3
    results = service.search_vectors(
        np.eye(1, index.dim, dtype=np.float32), SearchParams(limit=50, top_categories=10, use_prototypes=False)
    )[0].results
    assert victim not in [h.image_id for h in results]
    assert service.cache.is_current()


def test_search_on_an_empty_catalogue_returns_nothing(engine: Engine, embedder, tmp_path: Path) -> None:
    service = SearchService(make_settings(tmp_path, engine), engine, embedder)
    image = decode_image(png(Image.new("RGB", (40, 40), "red")), 10**7)
    for use_prototypes in (True, False):
        result = service.search([image.rgb], SearchParams(limit=5, top_categories=3, use_prototypes=use_prototypes))[0]
        assert result.results == [] and result.vectors_total == 0
    assert service.rank_categories([image.rgb])[0] == [[]]
