"""The prototype gallery and the catalogue map over a real database and model, against NumPy."""

import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from backend.sources.datasets import Dataset
from backend.storage import vector_reader
from backend.storage.engine import session_scope
from tests.utils.app import app_client
from tests.utils.catalogue import Stored, read_stored, small_catalogue


@pytest.fixture(scope="module")
def engine(databases, embedder, cifar_train: Dataset) -> Engine:
    return small_catalogue(databases, embedder, cifar_train)


@pytest.fixture(scope="module")
def client(engine: Engine, embedder, tmp_path_factory) -> Iterator[TestClient]:
    with app_client(engine, embedder, tmp_path_factory.mktemp("views")) as c:
        yield c


@pytest.fixture(scope="module")
def stored(engine: Engine, embedder) -> Stored:
    """This module's catalogue, read back (conftest's `stored` reads the shared one)."""
    return read_stored(engine, embedder.model_id)


def test_gallery_shows_the_images_nearest_each_prototype(client: TestClient, stored) -> None:
    vectors, prototypes, ids = stored.vectors, stored.prototypes, stored.category_ids
    body = client.get("/prototypes/gallery?per_category=4").json()
    assert sorted(c["category"] for c in body["categories"]) == sorted(ids)
    for row in body["categories"]:
        j = list(prototypes.category_ids).index(row["category_id"])
        mask = vectors.category_ids == row["category_id"]
        scores = vectors.vectors[mask] @ prototypes.vectors[j]
        order = np.argsort(-scores)[:4]
        assert [i["image_id"] for i in row["images"]] == vectors.ids[mask][order].tolist()
        np.testing.assert_allclose([i["score"] for i in row["images"]], scores[order], atol=1e-5)
    assert client.get("/prototypes/gallery?per_category=0").status_code == 422


def test_map_is_the_pca_of_the_embeddings_and_places_queries_on_it(client: TestClient, stored) -> None:
    vectors, ids = stored.vectors, stored.category_ids
    body = client.get("/map").json()
    points = body["points"]
    assert len(points) == len(vectors.ids) == 100  # under MAP_POINTS: every image
    xy = np.array([[p["x"], p["y"]] for p in points])
    row_of = {int(i): r for r, i in enumerate(vectors.ids)}
    x = vectors.vectors[[row_of[p["image_id"]] for p in points]].astype(np.float64)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    want = centred @ vt[:2].T
    for axis in range(2):  # the same axes, up to their sign
        assert abs(np.corrcoef(xy[:, axis], want[:, axis])[0, 1]) > 0.999
    np.testing.assert_allclose(body["explained"], (s[:2] ** 2 / (s**2).sum()), atol=1e-4)
    assert {p["category"] for p in points} == set(ids)
    # A stored image sent as a query lands on its own point.
    some = points[17]
    placed = client.post("/map/place", files={"file": ("q.png", client.get(f"/images/{some['image_id']}").content)}).json()
    assert placed["x"] == pytest.approx(some["x"], abs=1e-3) and placed["y"] == pytest.approx(some["y"], abs=1e-3)
    again = client.get("/map").json()
    assert again["age_seconds"] >= body["age_seconds"]
    assert {**again, "age_seconds": 0} == {**body, "age_seconds": 0}  # kept, and the same


def test_the_map_is_a_kept_sample_served_at_once_and_refreshed_in_the_background(
    databases, embedder, cifar_train: Dataset, cifar_queries: Dataset, tmp_path
) -> None:
    engine = small_catalogue(databases, embedder, cifar_train, images=60)
    settings = {"map_points": 40, "map_refresh_seconds": 0, "map_refit_changes": 10**6}
    with app_client(engine, embedder, tmp_path, **settings) as client:
        first = client.get("/map").json()
        with session_scope(engine) as session:
            sample = vector_reader.map_sample(session, embedder.model_id, 40)
        assert sorted(p["image_id"] for p in first["points"]) == sample.ids.tolist()  # the database's sample
        assert first["as_of_seq"] > 0 and first["age_seconds"] < 60
        upload = client.post("/upload", files={"file": ("u.png", cifar_queries.samples[0].load())})
        assert upload.status_code == 201, upload.text
        stale = client.get("/map").json()  # served at once: the last map, while a refresh runs
        assert stale["as_of_seq"] == first["as_of_seq"] and stale["points"] == first["points"]
        deadline = time.monotonic() + 30
        while (fresh := client.get("/map").json())["as_of_seq"] == first["as_of_seq"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fresh["as_of_seq"] > first["as_of_seq"] and len(fresh["points"]) == 40
        assert fresh["explained"] == first["explained"]  # the axes kept: fewer than MAP_REFIT_CHANGES changes
