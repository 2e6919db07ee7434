"""A small real catalogue and the API over it, for route tests (TestClient, no server process)."""

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from backend.api.main import create_app
from backend.ingest.populate import ingest
from backend.services.search import SearchService
from backend.sources.datasets import Dataset, balanced
from tests.utils.settings import make_settings


def small_catalogue(databases, embedder, cifar_train: Dataset, images: int = 100) -> Engine:  # type: ignore[no-untyped-def]
    """A new database holding `images` CIFAR-10 train images, balanced over the categories."""
    engine = databases.new()
    ingest(Dataset("cifar10", balanced(cifar_train.samples, images)), embedder, engine, 10**7, progress=False)
    return engine


def app_client(engine: Engine, embedder, tmp: Path, **settings: object) -> TestClient:  # type: ignore[no-untyped-def]
    """The API without access control (test_auth.py has its own) over `engine`; use it as a context manager."""
    config = make_settings(tmp, engine, auth_mode="off", **settings)
    return TestClient(create_app(service=SearchService(config, engine, embedder)))
