"""The HTTP API over a real database and model: search, upload, browse, and every bad input."""

import io
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine

from backend.api.main import create_app
from backend.services.search import SearchService
from backend.sources.datasets import Dataset
from tests.utils.catalogue import fill
from tests.utils.settings import make_settings

MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def client(databases, embedder, cifar_train: Dataset, tmp_path_factory) -> TestClient:
    engine: Engine = databases.new()
    fill(engine, embedder, cifar_train.samples, 100)
    # These tests are about the routes; access control has its own (test_auth.py).
    settings = make_settings(tmp_path_factory.mktemp("api"), engine, max_upload_size=MAX_UPLOAD, auth_mode="off")
    app = create_app(service=SearchService(settings, engine, embedder))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def query_png(cifar_queries: Dataset) -> dict[str, bytes]:
    return {s.label: s.load() for s in reversed(cifar_queries.samples)}


def image_count(client: TestClient) -> int:
    return client.get("/status").json()["database"]["images"]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_search_two_stage(client: TestClient, query_png: dict[str, bytes]) -> None:
    r = client.post("/search?limit=7&top_categories=2&use_prototypes=true", files={"file": ("q.png", query_png["horse"])})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 7 and body["limit"] == 7
    assert len(body["searched_categories"]) == 2
    assert {h["category"] for h in body["results"]} <= set(body["searched_categories"])
    assert body["vectors_scanned"] == 20 < body["vectors_total"]
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert [h["rank"] for h in body["results"]] == list(range(1, 8))
    assert set(body["timings_ms"]) >= {"embed", "prototypes", "search", "total"}
    thumb = client.get(body["results"][0]["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_search_exact_scans_everything(client: TestClient, query_png: dict[str, bytes]) -> None:
    body = client.post("/search?use_prototypes=false", files={"file": ("q.png", query_png["cat"])}).json()
    assert len(body["results"]) == 10  # DEFAULT_SEARCH_LIMIT
    assert body["vectors_scanned"] == body["vectors_total"] and body["top_categories"] is None


def test_prototypes_only(client: TestClient, query_png: dict[str, bytes]) -> None:
    body = client.post("/search/prototypes", files={"file": ("q.png", query_png["ship"])}).json()
    assert len(body["categories"]) == 10
    assert body["categories"][0]["score"] >= body["categories"][-1]["score"]


def test_upload_then_fetch_similar_info_and_delete(client: TestClient, query_png: dict[str, bytes]) -> None:
    before = image_count(client)
    r = client.post("/upload", files={"file": ("frog.png", query_png["frog"])}, data={"category": "frog", "description": "green"})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["category"] == "frog" and new["label_given"] and not new["duplicate"]
    again = client.post("/upload", files={"file": ("same.png", query_png["frog"])})
    assert again.status_code == 200 and again.json()["duplicate"] and again.json()["image_id"] == new["image_id"]
    assert image_count(client) == before + 1

    raw = client.get(f"/images/{new['image_id']}")
    assert raw.content == query_png["frog"] and raw.headers["content-type"] == "image/png"
    assert "immutable" in raw.headers["cache-control"]
    assert client.get(f"/images/{new['image_id']}", headers={"If-None-Match": raw.headers["etag"]}).status_code == 304
    info = client.get(f"/images/{new['image_id']}/info").json()
    assert (info["category"], info["description"], info["width"]) == ("frog", "green", 32)

    search = client.post("/search?limit=1&use_prototypes=false", files={"file": ("q.png", query_png["frog"])}).json()
    assert search["results"][0]["image_id"] == new["image_id"] and search["results"][0]["score"] > 0.9999
    similar = client.get(f"/images/{new['image_id']}/similar?limit=5").json()
    assert new["image_id"] not in [h["image_id"] for h in similar["results"]] and len(similar["results"]) == 5

    assert client.get(f"/images/{new['image_id']}/thumbnail").status_code == 200
    assert client.delete(f"/images/{new['image_id']}").status_code == 200
    assert client.get(f"/images/{new['image_id']}").status_code == 404
    assert client.get(f"/images/{new['image_id']}/thumbnail").status_code == 404
    assert image_count(client) == before
    assert client.get("/status").json()["index"]["current"]


def test_upload_without_category_is_predicted(client: TestClient, query_png: dict[str, bytes]) -> None:
    body = client.post("/upload", files={"file": ("a.png", query_png["airplane"])}).json()
    assert body["label_given"] is False and body["category"] and 0 < body["category_score"] <= 1
    client.delete(f"/images/{body['image_id']}")


def test_categories_and_paging(client: TestClient) -> None:
    cats = client.get("/categories").json()
    assert len(cats) == 10 and all(c["images"] == 10 for c in cats)
    page = client.get(f"/categories/{cats[0]['id']}/images?offset=5&limit=3").json()
    assert page["total"] == 10 and len(page["items"]) == 3 and page["offset"] == 5
    assert all(item["category"] == cats[0]["name"] for item in page["items"])


def test_status_and_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    status = client.get("/status").json()
    assert status["model"]["id"] == "efficientnet_lite0/imagenet/224px" and status["model"]["device"] == "cpu"
    assert status["index"]["type"] == "flat" and status["index"]["vectors"] == status["database"]["images"]
    assert "uptime_s" in status


def test_admin_rebuilds(client: TestClient) -> None:
    assert client.post("/admin/rebuild-index").json()["vectors"] == image_count(client)
    assert client.post("/admin/rebuild-prototypes").json()["prototypes"] == 10


def test_pages_are_served(client: TestClient) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/app/"
    page = client.get("/app/")
    assert page.status_code == 200 and "Search similar images" in page.text and "Search prototypes only" in page.text
    assert client.get("/docs").status_code == 200


def bomb_png() -> bytes:
    return encode(Image.new("1", (8000, 8000)))  # 64 Mpx of 1-bit pixels: a few KB on disk


def truncated_jpeg(query_png: dict[str, bytes]) -> bytes:
    whole = encode(Image.open(io.BytesIO(query_png["dog"])).resize((256, 256)), "JPEG")
    return whole[: len(whole) // 2]


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "message"),
    [
        ("post", "/upload", {"files": {"file": ("a.txt", b"hello, not an image")}}, 400, "not an image"),
        ("post", "/upload", {"files": {"file": ("empty.png", b"")}}, 400, "empty file"),
        ("post", "/upload", {"files": {"file": ("t.jpg", "TRUNCATED")}}, 400, "corrupt or truncated"),
        ("post", "/upload", {"files": {"file": ("bomb.png", "BOMB")}}, 400, "too large"),
        ("post", "/search", {"files": {"file": ("bomb.png", "BOMB")}}, 400, "too large"),
        ("post", "/upload", {"files": {"file": ("big.png", b"\x89PNG" + b"0" * (MAX_UPLOAD + 10))}}, 413, "MAX_UPLOAD_SIZE"),
        ("post", "/upload", {"files": {"file": ("huge.png", b"0" * (MAX_UPLOAD * 2))}}, 413, "MAX_UPLOAD_SIZE"),
        ("post", "/upload", {"files": {"file": ("q.png", "VALID")}, "data": {"category": "unicorn"}}, 422, "unknown category"),
        ("post", "/search?limit=0", {"files": {"file": ("q.png", "VALID")}}, 422, "limit"),
        ("post", "/search?limit=51", {"files": {"file": ("q.png", "VALID")}}, 422, "limit"),
        ("post", "/search?top_categories=11", {"files": {"file": ("q.png", "VALID")}}, 422, "top_categories"),
        ("post", "/search?nprobe=0", {"files": {"file": ("q.png", "VALID")}}, 422, "nprobe"),
        ("get", "/images/1/similar?nprobe=-1", {}, 422, "nprobe"),
        ("post", "/search", {}, 422, "file"),
        ("get", "/images/999999", {}, 404, "image 999999 not found"),
        ("get", "/images/999999/thumbnail", {}, 404, "not found"),
        ("get", "/images/999999/similar", {}, 404, "not found"),
        ("delete", "/images/999999", {}, 404, "not found"),
        ("get", "/categories/999999/images", {}, 404, "not found"),
        # Edges that answered 500 or were silently wrong before (issue 12):
        ("post", "/upload", {"files": {"file": ("q.png", "VALID")}, "data": {"description": "a\x00b"}}, 422, "control"),
        ("post", "/upload", {"files": {"file": ("q.png", "VALID")}, "data": {"category": "\x07bird"}}, 422, "control"),
        ("post", "/upload", {"files": {"file": ("q.png", "VALID")}, "data": {"description": "x" * 2001}}, 422, "longer"),
        ("post", "/upload", {"data": {"file": "not a file"}}, 422, "file upload"),
        ("post", "/search", {"data": {"file": "not a file"}}, 422, "file upload"),
        ("post", "/search/prototypes", {"files": [("file", ("a.png", "VALID")), ("file", ("b.png", "VALID"))]}, 422, "one file"),
        ("post", "/upload", {"files": [("file", ("a.png", "VALID")), ("file", ("b.png", "VALID"))]}, 422, "one file"),
        ("post", "/upload", {"files": [("file", (None, "x")), ("file", (None, "y"))]}, 422, "one file"),
        ("get", f"/categories/1/images?offset={2**63}", {}, 422, "offset"),
        ("get", f"/images/{2**64}/info", {}, 422, "image_id"),
        ("get", f"/images/{2**64}/similar", {}, 422, "image_id"),
        ("delete", f"/images/{2**64}", {}, 422, "image_id"),
        ("get", "/images/0/thumbnail", {}, 422, "image_id"),
        ("post", "/categories", {"json": {"name": "   "}}, 422, "must not be empty"),
        ("post", "/categories", {"json": {"name": "a\x00b"}}, 422, "control"),
        ("post", "/categories", {"json": {"name": "x" * 101}}, 422, "longer"),
        (
            "post",
            "/categories",
            {"content": b'{"name": "\\ud800"}', "headers": {"content-type": "application/json"}},
            422,
            "control",
        ),
        ("post", "/categories", {"json": ["name"]}, 422, "name"),
        (
            "post",
            "/categories",
            {"content": b'{"nam\\u0000e": 1, "\\ud83d": "x"}', "headers": {"content-type": "application/json"}},
            422,
            "name",
        ),
        ("post", "/categories", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "JSON"),
        ("post", "/upload", {"files": {"file": ("\x00\x1b[31m" + "n" * 500 + ".png", b"junk")}}, 400, "not an image"),
    ],
)
def test_bad_input_gets_clear_error_and_stores_nothing(
    client: TestClient, query_png: dict[str, bytes], method: str, url: str, kwargs: dict, status: int, message: str
) -> None:
    payloads = {"TRUNCATED": truncated_jpeg(query_png), "BOMB": bomb_png(), "VALID": query_png["deer"]}
    if "files" in kwargs:
        files = kwargs["files"].items() if isinstance(kwargs["files"], dict) else kwargs["files"]
        kwargs = {**kwargs, "files": [(k, (n, payloads.get(v, v) if n else v)) for k, (n, v) in files]}
    before = image_count(client)
    r = client.request(method, url, **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and message in detail and len(detail) < 400  # one bounded line
    assert "\x00" not in detail and "\x1b" not in detail
    assert image_count(client) == before
    assert client.get("/health").status_code == 200  # still serving


def test_concurrent_searches_and_uploads(client: TestClient, cifar_queries: Dataset) -> None:
    uploads = [s for s in cifar_queries.samples[20:26]]
    before = image_count(client)
    errors: list[str] = []
    uploaded: list[int] = []

    def searcher() -> None:
        for s in cifar_queries.samples[:4]:
            r = client.post("/search?limit=5", files={"file": ("q.png", s.load())})
            if r.status_code != 200 or len(r.json()["results"]) != 5:
                errors.append(r.text)

    def uploader() -> None:
        for s in uploads:
            r = client.post("/upload", files={"file": ("u.png", s.load())}, data={"category": s.label})
            if r.status_code != 201:
                errors.append(r.text)
            else:
                uploaded.append(r.json()["image_id"])

    threads = [threading.Thread(target=searcher) for _ in range(3)] + [threading.Thread(target=uploader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert image_count(client) == before + len(uploads)
    for image_id, s in zip(uploaded, uploads, strict=True):
        top = client.post("/search?limit=1&use_prototypes=false", files={"file": ("q.png", s.load())}).json()
        assert top["results"][0]["image_id"] == image_id
    for image_id in uploaded:
        client.delete(f"/images/{image_id}")


def test_unreadable_request_path_is_json(client: TestClient, tmp_path: Path) -> None:
    r = client.get("/images/not-a-number")
    assert r.status_code == 422 and "image_id" in r.json()["detail"]


def test_server_picks_up_images_stored_by_another_process(databases, embedder, cifar_train: Dataset, tmp_path: Path) -> None:
    import time

    engine: Engine = databases.new()
    fill(engine, embedder, cifar_train.samples, 20)
    settings = make_settings(tmp_path, engine, index_refresh_seconds=0.2, auth_mode="off")
    with TestClient(create_app(service=SearchService(settings, engine, embedder))) as c:
        assert c.get("/status").json()["index"]["vectors"] == 20
        fill(engine, embedder, cifar_train.samples, 40)  # "the CLI"
        deadline = time.monotonic() + 20
        while c.get("/status").json()["index"]["vectors"] != 40 and time.monotonic() < deadline:
            time.sleep(0.1)
        status = c.get("/status").json()
        assert status["index"]["vectors"] == 40 and status["index"]["current"]
        assert status["index"]["origin"].startswith("rebuilt from database")


def test_info_never_shows_server_paths() -> None:
    from backend.schemas import _shown_source

    assert _shown_source("/home/alice/photos/cat/a.png") == "a.png"  # rows stored before sources were relative
    assert _shown_source("cat/sub/a.png") == "cat/sub/a.png"
    assert _shown_source("cifar10:data_batch_1:17") == "cifar10:data_batch_1:17"
    assert _shown_source(None) is None


def test_stage1_trained_by_a_rebuild_gives_probabilities(client: TestClient, query_png: dict[str, bytes]) -> None:
    client.post("/admin/rebuild-index")  # trains stage 1 on the 100 given labels (10 a category)
    stage1 = client.get("/status").json()["stage1"]
    assert stage1["setting"] == "auto" and stage1["ranker"] in ("prototype", "centroids", "classifier")
    assert stage1["labels"] == image_count(client) and stage1["ranker"] == max(
        ("prototype", "centroids", "classifier"),
        key=lambda r: (stage1["heldout"][r]["top1"], -("prototype", "centroids", "classifier").index(r)),
    )
    body = client.post("/search/prototypes", files={"file": ("q.png", query_png["ship"])}).json()
    probabilities = [c["probability"] for c in body["categories"]]
    assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-4
    assert probabilities == sorted(probabilities, reverse=True)
    upload = client.post("/upload", files={"file": ("a.png", query_png["airplane"])}).json()
    assert upload["label_given"] is False and 0 < upload["category_probability"] <= 1
    client.delete(f"/images/{upload['image_id']}")
