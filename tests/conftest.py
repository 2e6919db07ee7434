"""Shared fixtures: a real PostgreSQL, the real Lite0 weights and the real CIFAR-10 subset.

The database is the embedded pgserver by default, or the server in TEST_DATABASE_URL when set; each
test session (and each test that writes) gets a database of its own, dropped afterwards.
"""

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url

from backend.core.config import PROJECT_ROOT, Settings
from backend.datasets import Dataset, balanced, load_cifar10
from backend.db import migrate
from backend.db.session import make_engine
from backend.embedding.efficientnet import EfficientNetLiteEmbedder

CIFAR_SUBSET = Path(os.environ.get("CIFAR10_SUBSET", PROJECT_ROOT.parent / "shared/datasets/cifar-10-subset/cifar-10-batches-py"))
CATALOGUE_SIZE = 600  # train-split images in the shared catalogue: 60 per category
QUERY_COUNT = 100  # test-split query images: 10 per category


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> URL:
    """Admin URL of the PostgreSQL server the tests run against."""
    if os.environ.get("TEST_DATABASE_URL"):
        return make_url(os.environ["TEST_DATABASE_URL"]).set(drivername="postgresql+psycopg2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "pgdata", cleanup_mode="stop")
    return make_url(server.get_uri()).set(drivername="postgresql+psycopg2")


class Databases:
    def __init__(self, server_url: URL) -> None:
        self.server_url = server_url
        self.admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []

    def new(self) -> Engine:
        """A fresh database at the newest schema revision."""
        name = f"imsrc_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        engine = make_engine(self.server_url.set(database=name))
        migrate.upgrade(engine)
        return engine

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.created:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def databases(server_url: URL) -> Iterator[Databases]:
    dbs = Databases(server_url)
    yield dbs
    dbs.drop_all()


@pytest.fixture
def engine(databases: Databases) -> Iterator[Engine]:
    """An empty database of this test's own."""
    eng = databases.new()
    yield eng
    eng.dispose()


def make_settings(tmp: Path, engine: Engine | None = None, **overrides: object) -> Settings:
    url = engine.url.render_as_string(hide_password=False) if engine is not None else None
    return Settings(_env_file=None, database_url=url, data_dir=tmp, cifar10_dir=CIFAR_SUBSET, **overrides)


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> EfficientNetLiteEmbedder:
    """The real pretrained EfficientNet-Lite0 (on ONNX Runtime, as the server runs it), loaded once."""
    onnx_dir = tmp_path_factory.mktemp("onnx")
    model = EfficientNetLiteEmbedder("efficientnet_lite0", None, "cpu", 32, runtime="onnx", onnx_dir=onnx_dir)
    model.load()
    return model


@pytest.fixture(scope="session")
def cifar_train() -> Dataset:
    return Dataset("cifar10", balanced(load_cifar10(CIFAR_SUBSET, "train"), CATALOGUE_SIZE))


@pytest.fixture(scope="session")
def cifar_queries() -> Dataset:
    return Dataset("cifar10", balanced(load_cifar10(CIFAR_SUBSET, "test"), QUERY_COUNT))


@pytest.fixture(scope="session")
def catalogue_engine(databases: Databases, embedder: EfficientNetLiteEmbedder, cifar_train: Dataset) -> Engine:
    """A database holding the CIFAR-10 train catalogue, embedded once. Tests must not write to it."""
    from backend.ingest import ingest

    eng = databases.new()
    report = ingest(cifar_train, embedder, eng, max_pixels=10**7, progress=False)
    assert report.added == CATALOGUE_SIZE
    return eng


@pytest.fixture(scope="session")
def query_vectors(embedder: EfficientNetLiteEmbedder, cifar_queries: Dataset) -> tuple[np.ndarray, list[str]]:
    from backend.imaging import decode_image

    images = [decode_image(s.load(), 10**7).rgb for s in cifar_queries.samples]
    return embedder.embed(images), [s.label for s in cifar_queries.samples]
