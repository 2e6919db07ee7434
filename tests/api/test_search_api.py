"""POST /search's filters, paging, batches and search by URL over a real database, model and HTTP server."""

import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine

from backend.core import search_params as sp
from backend.sources.datasets import Dataset
from tests.utils.app import app_client
from tests.utils.catalogue import small_catalogue
from tests.utils.http_images import serving


@pytest.fixture(scope="module")
def engine(databases, embedder, cifar_train: Dataset) -> Engine:
    return small_catalogue(databases, embedder, cifar_train)


def client_of(engine: Engine, embedder, tmp, **settings: object) -> TestClient:
    return app_client(engine, embedder, tmp, max_upload_size=300_000, url_timeout_seconds=5, **settings)


@pytest.fixture(scope="module")
def client(engine: Engine, embedder, tmp_path_factory) -> Iterator[TestClient]:
    with client_of(engine, embedder, tmp_path_factory.mktemp("api"), allow_private_urls=True) as c:
        yield c


@pytest.fixture(scope="module")
def queries(cifar_queries: Dataset) -> list[bytes]:
    return [s.load() for s in cifar_queries.samples[::10][:5]]


@pytest.fixture(scope="module")
def site(queries: list[bytes]) -> Iterator[str]:
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(queries[1])).save(jpeg, "JPEG", quality=95)
    with serving({"/q0.png": queries[0], "/q1.jpg": jpeg.getvalue(), "/page.html": b"<html>" + b"x" * 100}) as url:
        yield url


def search(client: TestClient, query: str = "", **kwargs: object):
    return client.post(f"/search?{query}", **kwargs)  # type: ignore[arg-type]


def test_several_files_answer_one_result_set_each_in_order(client: TestClient, queries: list[bytes]) -> None:
    files = [("file", (f"q{i}.png", q)) for i, q in enumerate(queries)]
    batch = search(client, "limit=5&use_prototypes=false", files=files)
    assert batch.status_code == 200, batch.text
    sets = batch.json()["queries"]
    assert len(sets) == len(queries)
    for q, got in zip(queries, sets, strict=True):
        alone = search(client, "limit=5&use_prototypes=false", files={"file": ("q.png", q)}).json()
        assert [h["image_id"] for h in got["results"]] == [h["image_id"] for h in alone["results"]]
        assert [h["score"] for h in got["results"]] == pytest.approx([h["score"] for h in alone["results"]], abs=1e-5)


def test_filters_and_paging_over_http(client: TestClient, queries: list[bytes]) -> None:
    file = {"file": ("q.png", queries[2])}
    first = search(client, "limit=10&use_prototypes=false&categories=cat&categories=dog", files=file).json()
    assert sorted(first["searched_categories"]) == ["cat", "dog"] and first["category_filter"] == ["cat", "dog"]
    assert {h["category"] for h in first["results"]} <= {"cat", "dog"} and len(first["results"]) == 10
    second = search(client, "limit=5&offset=5&use_prototypes=false&categories=cat&categories=dog", files=file).json()
    assert second["results"] == first["results"][5:] and second["offset"] == 5
    cut = first["results"][3]["score"]
    kept = search(client, f"limit=10&min_score={cut}&use_prototypes=false&categories=cat&categories=dog", files=file).json()
    assert [h["image_id"] for h in kept["results"]] == [h["image_id"] for h in first["results"] if h["score"] >= cut]
    two_stage = search(client, "limit=10&top_categories=1&categories=cat&categories=dog&categories=bird", files=file).json()
    named = [c["category"] for c in two_stage["categories"] if c["category"] in ("cat", "dog", "bird")]
    assert two_stage["searched_categories"] == named[:1]
    stored_id = first["results"][0]["image_id"]
    similar = client.get(f"/images/{stored_id}/similar?limit=3&offset=2&categories=cat&use_prototypes=false").json()
    assert [h["rank"] for h in similar["results"]] == [3, 4, 5] and {h["category"] for h in similar["results"]} == {"cat"}


@pytest.mark.parametrize(
    ("query", "count", "word"),
    [
        ("offset=-1", 1, "offset"),
        (f"offset={sp.OFFSET_MAX + 1}", 1, "offset"),
        ("min_score=1.5", 1, "min_score"),
        ("min_score=nan", 1, "min_score"),
        ("min_score=high", 1, "min_score"),
        ("categories=unicorn", 1, "unknown category 'unicorn'"),
        ("categories=%20%20", 1, "categories"),
        ("", sp.QUERIES_MAX + 1, f"at most {sp.QUERIES_MAX} files"),
    ],
)
def test_bad_parameters_are_one_clear_422(client: TestClient, queries: list[bytes], query: str, count: int, word: str) -> None:
    r = search(client, query, files=[("file", ("q.png", queries[0]))] * count)
    assert r.status_code == 422, r.text
    assert word in r.json()["detail"] and len(r.json()["detail"]) < 400


def test_search_by_url_equals_search_by_upload(client: TestClient, queries: list[bytes], site: str) -> None:
    by_url = search(client, "limit=5", data={"url": f"{site}/q0.png"})
    assert by_url.status_code == 200, by_url.text
    by_file = search(client, "limit=5", files={"file": ("q.png", queries[0])}).json()
    assert [h["image_id"] for h in by_url.json()["results"]] == [h["image_id"] for h in by_file["results"]]
    ranking = client.post("/search/prototypes", data={"url": f"{site}/q1.jpg"})
    assert ranking.status_code == 200 and len(ranking.json()["categories"]) == 10


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "word"),
    [
        ("/missing.png", {}, 400, "HTTP 404"),
        ("/page.html", {}, 400, "not an image"),
        ("ftp://127.0.0.1/x.png", {}, 422, "not an http(s) URL"),
        ("", {}, 422, "url: must not be empty"),
        ("/q0.png", {"files": {"file": ("q.png", b"x")}}, 422, "not both"),
    ],
)
def test_bad_urls_get_one_clear_error(client: TestClient, site: str, path: str, kwargs: dict, status: int, word: str) -> None:
    url = path if "://" in path or not path else f"{site}{path}"
    r = client.post("/search", data={"url": url}, **kwargs)
    assert r.status_code == status, r.text
    assert word in r.json()["detail"]


def test_private_addresses_are_refused_without_allow_private_urls(engine: Engine, embedder, tmp_path, site: str) -> None:
    with client_of(engine, embedder, tmp_path) as guarded:
        for path in ("/search", "/search/prototypes"):
            r = guarded.post(path, data={"url": f"{site}/q0.png"})
            assert r.status_code == 422, r.text
            assert "ALLOW_PRIVATE_URLS" in r.json()["detail"]
