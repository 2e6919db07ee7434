"""The large-catalogue tier (issue 29): a real server over ≥ 100k stored vectors, seeded once per session.

Every read that a page polls must answer within a bound that does not grow with the catalogue, also right
after an upload, and 16 concurrent readers must neither fail nor make the server's memory grow. Select it
with `-m large`, leave it out with `-m "not large"`; LARGE_CATALOGUE_SIZE changes the size (≥ 100k counts).
"""

import os
import re
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import psutil
import pytest
from sqlalchemy import Engine

from backend.embedding.registry import model_id
from backend.sources.datasets import load_cifar10
from benchmarks.harness import clustered, seed_vectors
from tests.utils.server import RunningServer, running_server
from tests.utils.settings import CIFAR_SUBSET, make_settings

pytestmark = pytest.mark.large

SIZE = int(os.environ.get("LARGE_CATALOGUE_SIZE", "100000"))
# Server-side times. The issue asks /status ≤ 20 ms and /map ≤ 50 ms p99 at 1M (the benchmark's job); these
# bounds are loose for a shared 2-core machine, and still far below what counting or reading every vector takes.
STATUS_BOUND_S = 0.2  # median of 5 calls (main: 3.4-8.7 s at 100k)
READ_BOUND_S = 1.5  # any one read (main: /map 500 after its statement timeout)
READERS = 16


@dataclass
class Large:
    engine: Engine
    server: RunningServer
    uploads: Iterator[bytes]

    def rss(self) -> int:
        process = psutil.Process(self.server.process.pid)
        return process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))

    def upload(self) -> None:
        answer = httpx.post(f"{self.server.url}/upload", files={"file": ("u.png", next(self.uploads))}, timeout=60)
        assert answer.status_code == 201, answer.text


@pytest.fixture(scope="session")
def large(databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Large]:
    engine = databases.new()
    data = tmp_path_factory.mktemp("large")
    model = model_id(make_settings(data))
    started = time.perf_counter()
    x, labels, _ = clustered(SIZE, seed=29, n_queries=1)
    seed_vectors(engine, model, x, labels)
    del x
    print(f"\nseeded {SIZE} vectors in {time.perf_counter() - started:.1f} s")
    env = {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(data),
        "AUTH_MODE": "off",
        "SERVE_WORKER": "false",
        "FAISS_INDEX_TYPE": "flat",  # the service around the index is under test; flat builds fastest
        "INDEX_REFRESH_SECONDS": "1",
        "DB_TIMEOUT_SECONDS": "2",  # low: a read that scans the catalogue fails instead of taking its time
        # Stage 1's learned rankers would train once in the background on all 100k labels (about 0.5 GB, a
        # core for a while): one bounded job, not the readers' doing, so it is left out of these figures.
        "STAGE1": "prototype",
    }
    images = (s.load() for s in load_cifar10(CIFAR_SUBSET, "test"))
    with running_server(env, start_timeout_s=600) as server:
        yield Large(engine, server, images)
    engine.dispose()


def _timed_get(server: RunningServer, path: str) -> tuple[int, float]:
    """The answer's status and the seconds the server took (its access log: the client's own time on a
    busy machine says more about the machine than the server)."""
    rid = uuid.uuid4().hex[:16]
    code = httpx.get(server.url + path, headers={"X-Request-ID": rid}, timeout=60).status_code
    deadline = time.monotonic() + 5
    while not (found := re.search(rf"{rid} GET \S+ \d+ ([\d.]+) ms", server.log())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found, f"request {rid} not in the server's log"
    return code, float(found.group(1)) / 1000


def _assert_reads_bounded(large: Large, when: str, paths: tuple[str, ...]) -> None:
    if "/status" in paths:
        statuses = [_timed_get(large.server, "/status") for _ in range(5)]
        assert all(code == 200 for code, _ in statuses), (when, statuses)
        assert statistics.median(s for _, s in statuses) <= STATUS_BOUND_S, (when, "/status", statuses)
    for path in (p for p in paths if p != "/status"):
        code, seconds = _timed_get(large.server, path)
        assert code == 200, (when, path, code, large.server.log()[-3000:])
        assert seconds <= READ_BOUND_S, (when, path, f"{seconds:.2f} s")


def test_status_counts_the_whole_catalogue(large: Large) -> None:
    body = httpx.get(f"{large.server.url}/status", timeout=60).json()
    assert body["database"]["images"] >= SIZE
    assert sum(c["images"] for c in body["database"]["categories"]) >= SIZE


def test_every_polled_read_is_bounded_cold_and_after_an_upload(large: Large) -> None:
    paths = ("/status", "/categories", "/map")
    _assert_reads_bounded(large, "cold", paths)
    _assert_reads_bounded(large, "again", paths)
    large.upload()
    _assert_reads_bounded(large, "after an upload", paths)


def test_the_duplicates_page_is_bounded_cold_and_after_an_upload(large: Large) -> None:
    """Fails until the near-duplicate links are kept in the database (issue 29 item 1, branch scale-db)."""
    _assert_reads_bounded(large, "cold", ("/duplicates?limit=20",))
    _assert_reads_bounded(large, "again", ("/duplicates?limit=20",))
    large.upload()
    _assert_reads_bounded(large, "after an upload", ("/duplicates?limit=20",))


def test_concurrent_readers_neither_fail_nor_grow_the_server(large: Large) -> None:
    base = large.server.url
    large.upload()  # warm: the model's first inference and the index's first addition allocate for good
    for path in ("/map", "/status"):  # each served once: the idle figure includes what is kept
        assert httpx.get(base + path, timeout=60).status_code == 200
    time.sleep(3)  # a map refresh started by the reads above has finished
    idle = large.rss()
    large.upload()  # the catalogue changed: what was kept is stale, so every reader might want to compute
    peak = idle
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, large.rss())
            time.sleep(0.05)

    def read(k: int) -> list[int]:
        with httpx.Client(base_url=base, timeout=60) as client:
            return [client.get("/map" if (k + j) % 2 else "/status").status_code for j in range(6)]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(READERS) as pool:
            codes = [c for cs in pool.map(read, range(READERS)) for c in cs]
    finally:
        done.set()
        watcher.join()
    print(f"\nserver RSS {idle / 2**20:.0f} MB idle, {peak / 2**20:.0f} MB at most with {READERS} readers ({len(codes)} reads)")
    failed = [c for c in codes if not 200 <= c < 300]
    assert not failed, (len(failed), large.server.log()[-3000:])
    assert peak <= 1.2 * idle, f"server RSS {idle / 2**20:.0f} MB idle, {peak / 2**20:.0f} MB with {READERS} readers"
