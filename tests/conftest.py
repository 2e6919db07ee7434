"""Shared fixtures: a real PostgreSQL, the real Lite0 weights and the real CIFAR-10 subset.

The database is the embedded pgserver by default, or the server in TEST_DATABASE_URL when set; each
test session (and each test that writes) gets a database of its own, dropped afterwards.
"""

import os
import time
import uuid
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url

from backend.core.config import PROJECT_ROOT
from backend.core.embedding_models import MODELS
from backend.embedding.efficientnet import EfficientNetLiteModel
from backend.embedding.embedder import Embedder
from backend.sources.datasets import Dataset, balanced, load_cifar10
from backend.storage import migrate
from backend.storage.engine import make_engine
from tests.utils.settings import CATALOGUE_SIZE, CIFAR_SUBSET, QUERY_COUNT

_SESSION_STARTED = time.time()

# Tests that need these fixtures are marked, so `pytest -m "not db and not model"` is the fast tier.
_MARKS = {
    "db": {"server_url", "databases", "engine", "catalogue_engine"},
    "model": {"embedder", "query_vectors"},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "db: needs a PostgreSQL server (embedded or TEST_DATABASE_URL)")
    config.addinivalue_line("markers", "model: loads the real embedding weights")
    config.addinivalue_line("markers", "browser: drives Chromium")
    config.addinivalue_line("markers", "large: the large-catalogue tier (a server over >= 100k seeded vectors)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's figures (faults tried, requests, answers by kind, rows lost), when it ran."""
    report = PROJECT_ROOT / "test-artifacts" / "fault-report.txt"
    if report.is_file() and report.stat().st_mtime > _SESSION_STARTED:
        terminalreporter.write_sep("-", "fault suite")
        terminalreporter.write(report.read_text())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for mark, fixtures in _MARKS.items():
            if used & fixtures:
                item.add_marker(mark)


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


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """The real pretrained EfficientNet-Lite0 (on ONNX Runtime, as the server runs it), loaded once."""
    onnx_dir = tmp_path_factory.mktemp("onnx")
    model = Embedder(
        EfficientNetLiteModel(MODELS["efficientnet_lite0"]), device="cpu", batch_size=32, runtime="onnx", onnx_dir=onnx_dir
    )
    model.load()
    return model


@pytest.fixture(scope="session")
def cifar_train() -> Dataset:
    return Dataset("cifar10", balanced(load_cifar10(CIFAR_SUBSET, "train"), CATALOGUE_SIZE))


@pytest.fixture(scope="session")
def cifar_queries() -> Dataset:
    return Dataset("cifar10", balanced(load_cifar10(CIFAR_SUBSET, "test"), QUERY_COUNT))


@pytest.fixture(scope="session")
def catalogue_engine(databases: Databases, embedder: Embedder, cifar_train: Dataset) -> Engine:
    """A database holding the CIFAR-10 train catalogue, embedded once. Tests must not write to it."""
    from tests.utils.catalogue import fill

    eng = databases.new()
    assert fill(eng, embedder, cifar_train.samples, CATALOGUE_SIZE).added == CATALOGUE_SIZE
    return eng


@pytest.fixture(scope="session")
def stored(catalogue_engine: Engine, embedder: Embedder):  # type: ignore[no-untyped-def]
    """What `catalogue_engine` holds (vectors, prototypes, category ids), read once, for checks against NumPy."""
    from tests.utils.catalogue import read_stored

    return read_stored(catalogue_engine, embedder.model_id)


@pytest.fixture(scope="module")
def service(catalogue_engine: Engine, embedder: Embedder, tmp_path_factory: pytest.TempPathFactory):
    """A search service over the shared CIFAR catalogue (read-only); tests that write use `writable_service`."""
    from backend.services.search import SearchService
    from tests.utils.settings import make_settings

    svc = SearchService(make_settings(tmp_path_factory.mktemp("data"), catalogue_engine), catalogue_engine, embedder)
    svc.cache.get()
    return svc


@pytest.fixture
def small(cifar_train: Dataset) -> Dataset:
    """40 images of the CIFAR catalogue, balanced over its categories."""
    return Dataset("cifar10", balanced(cifar_train.samples, 40))


@pytest.fixture
def writable_service(engine: Engine, embedder: Embedder, small: Dataset, tmp_path):
    """A search service over a database of this test's own holding `small`: for tests that write."""
    from backend.services.search import SearchService
    from tests.utils.catalogue import fill
    from tests.utils.settings import make_settings

    fill(engine, embedder, small.samples, len(small.samples))
    return SearchService(make_settings(tmp_path, engine), engine, embedder)


@pytest.fixture(scope="session")
def query_vectors(embedder: Embedder, cifar_queries: Dataset) -> tuple[np.ndarray, list[str]]:
    from backend.imaging import decode_image

    images = [decode_image(s.load(), 10**7).rgb for s in cifar_queries.samples]
    return embedder.embed(images), [s.label for s in cifar_queries.samples]
