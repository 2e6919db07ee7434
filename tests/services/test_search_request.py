"""The lean search request: what it skips must not change what it answers."""

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from backend.api.main import create_app
from backend.core.search_params import SearchParams
from backend.imaging import decode_image
from backend.services.search import SearchService
from backend.sources.datasets import Dataset
from backend.storage import catalogue
from backend.storage.engine import session_scope
from tests.utils.catalogue import fill
from tests.utils.images import photo_jpeg
from tests.utils.settings import make_settings

EXACT_5 = SearchParams(limit=5, top_categories=1, use_prototypes=False)


def test_an_image_deleted_by_another_writer_is_never_returned(
    engine: Engine, embedder, cifar_train: Dataset, tmp_path: Path
) -> None:
    """The index follows other processes' deletions only at its next refresh; until then the one database
    read a search makes (autocommit, a single SELECT) is what keeps a deleted image out of the results."""
    fill(engine, embedder, cifar_train.samples, 50)
    service = SearchService(make_settings(tmp_path, engine, index_refresh_seconds=0), engine, embedder)
    query = embedder.embed([decode_image(cifar_train.samples[0].load(), 10**7).rgb])
    before = [h.image_id for h in service.search_vectors(query, EXACT_5)[0].results]
    with session_scope(engine) as s:  # "another process": straight to the database, the index not told
        for image_id in before[:2]:
            catalogue.delete_image(s, image_id)
    with service.cache.reading() as index:
        assert index.ntotal == 50  # the index still holds their vectors
    after = [h.image_id for h in service.search_vectors(query, EXACT_5)[0].results]
    assert not set(after) & set(before[:2])
    assert after == before[2:5]  # the others keep their order; nothing is invented to fill the gap


def test_search_by_photo_over_http_decodes_reduced(engine: Engine, embedder, cifar_train: Dataset, tmp_path: Path) -> None:
    fill(engine, embedder, cifar_train.samples, 50)
    settings = make_settings(tmp_path, engine, auth_mode="off")
    photo = photo_jpeg(768, 576)
    with TestClient(create_app(service=SearchService(settings, engine, embedder))) as client:
        r = client.post("/search?limit=5&use_prototypes=false", files={"file": ("p.jpg", photo, "image/jpeg")})
        assert r.status_code == 200, r.text
        scores = [h["score"] for h in r.json()["results"]]
        bad = client.post("/search", files={"file": ("p.jpg", photo[: len(photo) // 2], "image/jpeg")})
    full = embedder.embed([decode_image(photo, 10**8).rgb])
    service = SearchService(settings, engine, embedder)
    expected = [
        h.score for h in service.search_vectors(full, SearchParams(limit=5, top_categories=1, use_prototypes=False))[0].results
    ]
    np.testing.assert_allclose(scores, expected, atol=0.01)  # the reduced decode's scores, within its measured cosine
    assert bad.status_code == 400 and "truncated" in bad.json()["detail"]
