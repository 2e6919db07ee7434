"""Every route family answers 503 with Retry-After and the one JSON error body when the database cancels its
statements, whichever driver ran them: a real server with a 1 s statement timeout, and a second connection
holding ACCESS EXCLUSIVE locks so that the server's real queries wait until PostgreSQL cancels them."""

import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import psycopg
import pytest
from PIL import Image
from sqlalchemy import Engine

from backend.ingest.populate import ingest
from backend.sources.datasets import Dataset, balanced
from backend.storage.engine import database_problem, is_outage, libpq_url
from tests.utils.server import RunningServer, running_server

DB_TIMEOUT_S = 1.0
APP_TABLES = ("images", "embeddings", "categories", "prototypes", "deleted_embeddings", "catalogue_meta", "catalogue_jobs")


@pytest.fixture(scope="module")
def stored(databases, embedder, cifar_train: Dataset) -> Engine:
    engine = databases.new()
    ingest(Dataset("cifar10", balanced(cifar_train.samples, 4)), embedder, engine, 10**7, progress=False)
    return engine


@pytest.fixture(scope="module")
def server(stored: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {
        **os.environ,
        "DATABASE_URL": stored.url.render_as_string(hide_password=False),
        "DATA_DIR": str(tmp_path_factory.mktemp("db-errors")),
        "ONNX_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "onnx-db-errors"),
        "DB_TIMEOUT_SECONDS": str(DB_TIMEOUT_S),
        "REQUEST_TIMEOUT_SECONDS": "30",
        "AUTH_MODE": "off",
        "SERVE_WORKER": "false",
    }
    with running_server(env) as server:
        yield server


@contextmanager
def locked(engine: Engine, tables: tuple[str, ...]) -> Iterator[None]:
    """`tables` locked by another connection: every statement that reads or writes them waits, and is
    cancelled by the server's statement timeout."""
    with psycopg.connect(libpq_url(engine)) as conn:
        conn.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        yield
        conn.rollback()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 60)).save(out, "PNG")
    return out.getvalue()


def route_families(http: httpx.Client, image_id: int, category_id: int) -> dict[str, Callable[[], httpx.Response]]:
    png = _png()
    return {
        "search": lambda: http.post("/search", files={"file": ("q.png", png)}),
        "images info": lambda: http.get(f"/images/{image_id}/info"),
        "images similar": lambda: http.get(f"/images/{image_id}/similar"),
        "images bytes": lambda: http.get(f"/images/{image_id}"),
        "categories": lambda: http.get("/categories"),
        "category page": lambda: http.get(f"/categories/{category_id}/images"),
        "duplicates": lambda: http.get("/duplicates?limit=5"),
        "map": lambda: http.get("/map"),
        "gallery": lambda: http.get("/prototypes/gallery"),
        "jobs list": lambda: http.get("/jobs"),
        "jobs create": lambda: http.post("/jobs/urls", json={"urls": ["http://127.0.0.1:9/x.png"]}),
        "status": lambda: http.get("/status"),
        "upload": lambda: http.post("/upload", files={"file": ("u.png", png)}, data={"category": "airplane"}),
    }


def assert_unavailable(name: str, r: httpx.Response) -> None:
    assert r.status_code == 503, (name, r.status_code, r.text[:300])
    assert int(r.headers["retry-after"]) > 0, name
    assert r.headers["content-type"] == "application/json", name
    body = r.json()
    assert list(body) == ["detail"] and body["detail"].startswith("database unavailable"), (name, body)


def test_every_route_family_answers_503_when_statements_time_out(server: RunningServer, stored: Engine) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        some = http.get("/categories").json()[0]
        image_id = http.get(f"/categories/{some['id']}/images").json()["items"][0]["id"]
        calls = route_families(http, image_id, some["id"])
        assert calls["search"]().status_code == 200  # the index is loaded before the fault
        with locked(stored, APP_TABLES):
            for name, call in calls.items():
                assert_unavailable(name, call())
        for name in ("categories", "status", "search", "map"):  # and it recovers on its own
            assert calls[name]().status_code == 200, name


def test_a_cancelled_copy_is_an_outage_and_a_bad_query_is_not(stored: Engine) -> None:
    """psycopg 3's COPY (the bulk vector read; no request makes one now: /map reads its kept sample) raises its
    own QueryCanceled, which SQLAlchemy never wraps: it is an outage (a 503), a bug in our SQL is not."""
    with locked(stored, ("images",)), psycopg.connect(libpq_url(stored)) as conn:
        conn.execute("SET statement_timeout = 300")
        with pytest.raises(psycopg.errors.QueryCanceled) as cancelled, conn.cursor().copy("COPY images TO STDOUT") as copy:
            for _ in copy:
                pass
    assert is_outage(cancelled.value) and "statement timeout" in database_problem(cancelled.value)
    with psycopg.connect(libpq_url(stored)) as conn, pytest.raises(psycopg.errors.UndefinedTable) as bad:
        conn.execute("SELECT * FROM no_such_table")
    assert not is_outage(bad.value)  # a bug in our SQL stays a 500
    assert not is_outage(ValueError("not a database error"))
