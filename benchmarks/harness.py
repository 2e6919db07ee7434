"""What every benchmark section shares: the machine, timing, data (real CIFAR-10 and synthetic clustered
vectors) and a throwaway database seeded through the catalogue's own functions."""

import atexit
import os
import platform
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url

from backend.core.config import Settings
from backend.core.vectors import l2_normalise
from backend.embedding import quantize
from backend.sources.datasets import Dataset, balanced, find_cifar10, load_cifar10
from backend.storage import bulk_load, catalogue
from backend.storage.engine import session_scope

DIM = 1280
N_CATEGORIES = 10


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {f"p{p}": float(np.percentile(ms, p)) for p in (50, 95, 99)}


def throughput(run: Callable[[], object], items: int, min_seconds: float = 1.0) -> float:
    """Best items/s over repeated runs lasting at least `min_seconds` together (at least two runs)."""
    rates: list[float] = []
    spent = 0.0
    while spent < min_seconds or len(rates) < 2:
        t = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t
        rates.append(items / elapsed)
        spent += elapsed
    return max(rates)


def hardware() -> dict:
    import faiss
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "cuda": torch.cuda.is_available(),
        "int8_dot_product": quantize.int8_cpu(),  # VNNI/AMX/dotprod: what makes EMBED_PRECISION=int8 pay
    }


def cifar_samples(settings: Settings, n: int, split: str = "train") -> Dataset:
    return Dataset("cifar10", balanced(load_cifar10(find_cifar10(None, settings, download=False), split), n))


def clustered(n: int, seed: int = 0, n_queries: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n unit vectors in N_CATEGORIES clusters (balanced), plus queries drawn from the same clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CATEGORIES, DIM), dtype=np.float32)
    labels = np.arange(n, dtype=np.int64) % N_CATEGORIES
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: 1M x 1280 floats is 5 GB already
        stop = min(n, start + 100_000)
        chunk = centres[labels[start:stop]] + 1.5 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        x[start:stop] = l2_normalise(chunk)
    q = centres[rng.integers(0, N_CATEGORIES, n_queries)] + 1.5 * rng.standard_normal((n_queries, DIM), dtype=np.float32)
    return x, labels, l2_normalise(q)


class _Server:
    """One embedded PostgreSQL per benchmark process (starting one costs seconds); sections get databases."""

    url: URL | None = None

    @classmethod
    def admin_url(cls) -> URL:
        if cls.url is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver

            tmp = tempfile.TemporaryDirectory(prefix="imsrc-bench-pg-")
            server = pgserver.get_server(Path(tmp.name) / "pgdata", cleanup_mode="delete")
            atexit.register(tmp.cleanup)
            atexit.register(server.cleanup)  # runs first: stop the server, then remove its folder
            cls.url = make_url(server.get_uri()).set(drivername="postgresql+psycopg2")
        return cls.url


class TempDatabase:
    """A throwaway database with the schema applied, on the process's embedded PostgreSQL."""

    url: URL
    engine: Engine
    data_dir: Path

    def __enter__(self) -> "TempDatabase":
        from backend.storage import migrate
        from backend.storage.engine import make_engine

        admin = _Server.admin_url()
        self.name = f"bench_{uuid.uuid4().hex[:12]}"
        self.admin = create_engine(admin, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.tmp = tempfile.TemporaryDirectory(prefix="imsrc-bench-")
        self.url = admin.set(database=self.name)
        self.engine = make_engine(self.url)
        migrate.upgrade(self.engine)
        self.data_dir = Path(self.tmp.name) / "data"
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.dispose()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()
        self.tmp.cleanup()


def seed_vectors(engine: Engine, model: str, x: np.ndarray, labels: np.ndarray, first: int = 0, chunk: int = 5000) -> None:
    """Store vectors as images of categories c0..c9 with their prototype sums, by binary COPY through
    `storage.bulk_load` (every trigger runs as for `catalogue.add_images`). The images carry no pixels: only
    their vectors matter to the index. `first` keeps hashes unique."""
    with session_scope(engine) as s:
        cats = catalogue.ensure_categories(s, [f"c{i}" for i in range(N_CATEGORIES)])
    category_of = np.array([cats[f"c{i}"] for i in range(N_CATEGORIES)], dtype=np.int64)
    copying = bulk_load.copy_engine(engine)
    for start in range(0, len(x), chunk):
        stop = min(len(x), start + chunk)
        shas = [f"{first + i:064x}" for i in range(start, stop)]
        with session_scope(copying) as s:
            bulk_load.add_vectors(s, model, shas, category_of[labels[start:stop]], x[start:stop])
    copying.dispose()
