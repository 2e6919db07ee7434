"""The API over a real catalogue (tests/utils/catalogue.py makes one), for route tests (TestClient, no server process)."""

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from backend.api.main import create_app
from backend.services.search import SearchService
from tests.utils.settings import make_settings


def app_client(engine: Engine, embedder, tmp: Path, **settings: object) -> TestClient:  # type: ignore[no-untyped-def]
    """The API without access control (test_auth.py has its own) over `engine`; use it as a context manager."""
    config = make_settings(tmp, engine, auth_mode="off", **settings)
    return TestClient(create_app(service=SearchService(config, engine, embedder)))
