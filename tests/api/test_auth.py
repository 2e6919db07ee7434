"""Access control: every route's decision, each scope against each endpoint family in every mode, keys
that are wrong or revoked, constant-time comparison, cross-site requests, /metrics and the request log."""

import hashlib
import hmac
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from backend.api.errors import api_routes
from backend.api.main import create_app
from backend.api.security import Access, declare_access, guard, route_access
from backend.core.config import Settings
from backend.services.keys import KeyInfo, authenticate, create_key, revoke
from backend.services.search import SearchService
from backend.sources.datasets import Dataset
from backend.storage.engine import session_scope
from backend.storage.schema import ApiKey
from backend.telemetry import JsonFormatter
from tests.utils.catalogue import fill
from tests.utils.settings import make_settings

# Every route and who may call it. A new route fails this test until it is added here with a decision.
DECISIONS = {
    ("GET", "/"): Access.PUBLIC,
    ("GET", "/docs"): Access.PUBLIC,
    ("GET", "/redoc"): Access.PUBLIC,
    ("GET", "/health"): Access.PUBLIC,
    ("GET", "/ready"): Access.PUBLIC,
    ("GET", "/metrics"): Access.METRICS,
    ("GET", "/status"): Access.SEARCH,
    ("POST", "/search"): Access.SEARCH,
    ("POST", "/search/prototypes"): Access.SEARCH,
    ("GET", "/images/{image_id}/similar"): Access.SEARCH,
    ("GET", "/duplicates"): Access.SEARCH,
    ("GET", "/prototypes/gallery"): Access.SEARCH,
    ("GET", "/map"): Access.SEARCH,
    ("POST", "/map/place"): Access.SEARCH,
    ("GET", "/images/{image_id}"): Access.SEARCH,
    ("GET", "/images/{image_id}/thumbnail"): Access.SEARCH,
    ("GET", "/images/{image_id}/info"): Access.SEARCH,
    ("GET", "/categories"): Access.SEARCH,
    ("GET", "/categories/{category_id}/images"): Access.SEARCH,
    ("POST", "/upload"): Access.WRITE,
    ("DELETE", "/images/{image_id}"): Access.WRITE,
    ("POST", "/categories"): Access.WRITE,
    ("POST", "/admin/rebuild-index"): Access.ADMIN,
    ("POST", "/admin/rebuild-prototypes"): Access.ADMIN,
    # Catalogue jobs (issue 11): watching is reading; handing over images is writing; the server's disk is admin's.
    ("GET", "/jobs"): Access.SEARCH,
    ("GET", "/jobs/{job_id}"): Access.SEARCH,
    ("POST", "/jobs/archive"): Access.WRITE,
    ("POST", "/jobs/urls"): Access.WRITE,
    ("POST", "/jobs/{job_id}/cancel"): Access.WRITE,
    ("POST", "/jobs/folder"): Access.ADMIN,
    ("POST", "/jobs/reembed"): Access.ADMIN,
}


def test_every_route_has_a_decision(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    found = {(m, r.path_format): route_access(r) for r in api_routes(app.routes) for m in r.methods or ()}
    assert found == DECISIONS


def test_a_route_without_a_decision_stops_the_app(tmp_path: Path) -> None:
    app = FastAPI()
    router = APIRouter()
    router.add_api_route("/guarded", lambda: None, dependencies=[guard(Access.PUBLIC)])
    router.add_api_route("/forgotten", lambda: None, methods=["POST"])
    app.include_router(router)
    with pytest.raises(RuntimeError, match="/forgotten does not declare its access"):
        declare_access(app, make_settings(tmp_path))


@pytest.fixture(scope="module")
def auth_db(databases, embedder, cifar_train: Dataset) -> Engine:
    engine = databases.new()
    fill(engine, embedder, cifar_train.samples, 30)
    return engine


@pytest.fixture(scope="module")
def keys(auth_db: Engine) -> dict[str, str]:
    """A key per scope, one revoked, one that never existed and one that is not even a key."""
    out = {}
    with session_scope(auth_db) as session:
        for scope in ("search", "write", "admin", "metrics"):
            out[scope] = create_key(session, f"{scope} key", [scope])[1]
        out["revoked"] = create_key(session, "gone", ["admin"])[1]
        revoke(session, "gone")
    prefix, secret = out["admin"].split("_", 2)[1:]
    out["wrong"] = f"imsrc_{prefix}_{'A' * len(secret)}"  # a real prefix with the wrong secret
    out["garbage"] = "letmein"
    return out


@pytest.fixture(scope="module")
def clients(auth_db: Engine, embedder, tmp_path_factory) -> Iterator[dict[str, TestClient]]:
    """One app per AUTH_MODE (and one with METRICS_REQUIRE_KEY) over the same catalogue."""
    out: dict[str, TestClient] = {}
    modes = {"writes": {}, "all": {"auth_mode": "all"}, "off": {"auth_mode": "off"}, "metrics": {"metrics_require_key": True}}
    for name, overrides in modes.items():
        settings = make_settings(tmp_path_factory.mktemp(name), auth_db, **overrides)
        out[name] = TestClient(create_app(service=SearchService(settings, auth_db, embedder)))
        out[name].__enter__()
    yield out
    for c in out.values():
        c.__exit__(None, None, None)


@pytest.fixture(scope="module")
def png(cifar_queries: Dataset) -> bytes:
    return cifar_queries.samples[0].load()


# One request per endpoint family, and the status it gets when allowed. Writes are chosen to be harmless
# when repeated (an unknown id, an existing category, a duplicate upload answers 200).
FAMILIES = {
    "search": (Access.SEARCH, "POST", "/search", {200}),
    "read image": (Access.SEARCH, "GET", "/images/1/info", {200, 404}),
    "browse": (Access.SEARCH, "GET", "/categories", {200}),
    "status": (Access.SEARCH, "GET", "/status", {200}),
    "upload": (Access.WRITE, "POST", "/upload", {200, 201}),
    "delete": (Access.WRITE, "DELETE", "/images/999999", {404}),
    "create category": (Access.WRITE, "POST", "/categories", {201}),
    "admin": (Access.ADMIN, "POST", "/admin/rebuild-prototypes", {200}),
    "metrics": (Access.METRICS, "GET", "/metrics", {200}),
    "health": (Access.PUBLIC, "GET", "/health", {200}),
}
KEYS = ["none", "search", "write", "admin", "metrics", "revoked", "wrong", "garbage"]


def _expected(mode: str, access: Access, key: str, ok: set[int]) -> set[int]:
    settings = Settings(_env_file=None, auth_mode="writes" if mode == "metrics" else mode, metrics_require_key=mode == "metrics")  # type: ignore[call-arg]
    from backend.api.security import needs_key

    if not needs_key(access, settings):
        return ok
    if key == "none" or key in ("revoked", "wrong", "garbage"):
        return {401}
    grants = KeyInfo(0, key, "", [key], None, None, None).grants(access.value)  # type: ignore[arg-type]
    return ok if grants else {403}


@pytest.mark.parametrize("mode", ["writes", "all", "off", "metrics"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_scope_against_each_endpoint_family(clients, keys, png: bytes, mode: str, family: str) -> None:
    access, method, path, ok = FAMILIES[family]
    for key in KEYS:
        headers = {} if key == "none" else {"X-API-Key": keys[key]}
        kwargs: dict = {"headers": headers}
        if path in ("/search", "/upload"):
            kwargs["files"] = {"file": ("q.png", png)}
            if path == "/upload":
                kwargs["data"] = {"category": "cat"}
        elif path == "/categories" and method == "POST":
            kwargs["json"] = {"name": "cat"}
        r = clients[mode].request(method, path, **kwargs)
        want = _expected(mode, access, key, ok)
        assert r.status_code in want, f"{mode} {family} key={key}: {r.status_code} {r.text[:200]}"
        assert r.headers["content-type"].startswith(("application/json", "text/plain")), r.headers
        if r.status_code in (401, 403):
            assert r.json()["detail"]


def test_bearer_header_and_last_use(clients, keys, auth_db: Engine) -> None:
    c = clients["writes"]
    r = c.post("/categories", json={"name": "dog"}, headers={"Authorization": f"Bearer {keys['write']}"})
    assert r.status_code == 201
    assert c.post("/categories", json={"name": "dog"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    with session_scope(auth_db) as session:
        row = session.scalar(select(ApiKey).where(ApiKey.name == "write key"))
        assert row is not None and row.last_used_at is not None
        # Only a hash is stored: no column holds the key or its secret part.
        assert row.key_sha256 == hashlib.sha256(keys["write"].encode()).hexdigest()
        assert keys["write"].split("_", 2)[2] not in json.dumps([str(getattr(row, c.key)) for c in ApiKey.__table__.columns])


def test_keys_are_compared_in_constant_time(auth_db: Engine, keys, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with session_scope(auth_db) as session:
        assert authenticate(session, keys["search"]) is not None
        assert authenticate(session, keys["wrong"]) is None
        assert authenticate(session, "imsrc_00000000_" + "B" * 43) is None  # no such prefix: compared all the same
        assert authenticate(session, keys["revoked"]) is None
    assert len(calls) == 4


def test_the_openapi_schema_declares_keys_where_they_are_needed(clients) -> None:
    writes = clients["writes"].get("/openapi.json").json()
    schemes = writes["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {**schemes["APIKeyHeader"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"]["scheme"] == "bearer"
    assert "security" in writes["paths"]["/upload"]["post"] and "401" in writes["paths"]["/upload"]["post"]["responses"]
    assert "security" not in writes["paths"]["/search"]["post"] and "401" not in writes["paths"]["/search"]["post"]["responses"]
    everything = clients["all"].get("/openapi.json", headers={}).json()
    assert "security" in everything["paths"]["/search"]["post"]


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({"Origin": "https://evil.example"}, True),
        ({"Origin": "null"}, True),  # sandboxed frames and some redirects
        ({"Origin": "http://testserver.evil.example"}, True),
        ({"Sec-Fetch-Site": "cross-site"}, True),  # a browser that sent no Origin
        ({"Origin": "http://testserver"}, False),  # the page itself
        ({"Origin": "https://app.example.com"}, False),  # listed in CORS_ORIGINS
        ({"Sec-Fetch-Site": "same-origin"}, False),
        ({}, False),  # curl, scripts
    ],
)
def test_cross_site_writes_are_refused_whatever_the_mode(
    auth_db: Engine, embedder, tmp_path: Path, png: bytes, headers: dict, refused: bool
) -> None:
    settings = make_settings(tmp_path, auth_db, auth_mode="off", cors_origins="https://app.example.com")
    with TestClient(create_app(service=SearchService(settings, auth_db, embedder))) as c:
        before = c.get("/status").json()["database"]["images"]
        r = c.post("/categories", json={"name": "evil"}, headers=headers)
        assert (r.status_code == 403) == refused, r.text
        if refused:
            assert "cross-site" in r.json()["detail"]
            assert "evil" not in [x["name"] for x in c.get("/categories").json()]
        r = c.post("/upload", files={"file": ("x.png", png)}, data={"category": "cat"}, headers=headers)
        assert (r.status_code == 403) == refused
        assert c.get("/status", headers=headers).status_code == 200  # reading is never refused for its origin
        if refused:
            assert c.get("/status").json()["database"]["images"] == before
    # CORS headers go to listed origins only.
    with TestClient(create_app(service=SearchService(settings, auth_db, embedder))) as c:
        listed = c.options("/upload", headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"})
        assert listed.headers.get("access-control-allow-origin") == "https://app.example.com"
        other = c.options("/upload", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers


def test_metrics_show_the_search_stages(clients, png: bytes) -> None:
    c = clients["writes"]
    assert c.post("/search", files={"file": ("q.png", png)}).status_code == 200
    text = c.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    for stage in ("prototypes", "search", "fetch"):
        assert values[f'imsrc_search_stage_seconds_count{{stage="{stage}"}}'] >= 1
    assert values["imsrc_embed_seconds_count"] >= 1
    assert any(k.startswith("imsrc_index_vectors{") and v >= 30 for k, v in values.items())
    assert any(k.startswith("http_requests_total{") and 'handler="/search"' in k for k in values)
    assert "imsrc_database_errors_total" in text and "imsrc_index_refreshes_total" in text


def test_one_log_line_per_request_with_its_id(clients, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="imsrc.access"):
        r = clients["writes"].get("/categories", headers={"X-Request-ID": "abc-123"})
        fresh = clients["writes"].get("/health")
        bad = clients["writes"].get("/health", headers={"X-Request-ID": "no spaces or <tags> please"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(fresh.headers["x-request-id"]) == 16 and bad.headers["x-request-id"] != "no spaces or <tags> please"
    lines = [rec for rec in caplog.records if rec.name == "imsrc.access"]
    assert len(lines) == 3
    first = json.loads(JsonFormatter().format(lines[0]))  # LOG_FORMAT=json
    assert first["request_id"] == "abc-123" and first["method"] == "GET" and first["path"] == "/categories"
    assert first["status"] == 200 and first["duration_ms"] >= 0 and first["level"] == "info"
    assert "abc-123 GET /categories 200" in lines[0].getMessage()
