"""The fault suite: a real server process on a private PostgreSQL that the tests stop, freeze (SIGSTOP)
and bring back, under concurrent load; memory under extreme-aspect images; chunked oversize bodies; and
the embedded PostgreSQL's life tied to `serve` (SIGTERM, kill -9).

Figures (faults tried, requests sent, answers by kind, rows lost) go to test-artifacts/fault-report.txt
and are printed at the end of the run."""

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, make_url

from backend.core.config import PROJECT_ROOT
from backend.sources.datasets import Dataset
from backend.storage import migrate
from backend.storage.engine import make_engine
from tests.utils.catalogue import fill
from tests.utils.server import RunningServer, running_server

DB_TIMEOUT_S = 2.0
REPORT = PROJECT_ROOT / "test-artifacts" / "fault-report.txt"
MAX_UPLOAD = 1024 * 1024


class PrivatePostgres:
    """A pgserver instance of this module's own: stopped, frozen and restarted at will."""

    def __init__(self, root: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        self.server = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
        self.pgdata = self.server.pgdata
        self.user = "pgserver" if os.geteuid() == 0 else None

    def url(self, database: str) -> URL:
        return make_url(self.server.get_uri()).set(drivername="postgresql+psycopg2", database=database)

    def _processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.server.get_pid())
        return [master, *master.children(recursive=True)]

    def freeze(self) -> None:
        for p in self._processes():
            p.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        for p in self._processes():
            p.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.pgdata, user=self.user)

    def start(self) -> None:
        with self.server._lock:
            self.server.ensure_postgres_running()


class Load:
    """Concurrent requests of every kind that needs the database, with what each answered and how fast."""

    def __init__(self, base: str, image_id: int, category_id: int, query: bytes) -> None:
        self.base, self.image_id, self.category_id, self.query = base, image_id, category_id, query
        self.sent = 0
        self.answers: Counter[str] = Counter()
        self.acknowledged: list[int] = []  # uploads answered 201: must all be in the database at the end

    def _requests(self, http: httpx.Client) -> list[Callable[[], httpx.Response]]:
        def upload() -> httpx.Response:
            png = io.BytesIO()
            Image.new("RGB", (24, 24), tuple(uuid.uuid4().bytes[:3])).save(png, "PNG")  # type: ignore[arg-type]
            r = http.post("/upload", files={"file": ("u.png", png.getvalue())}, data={"category": "airplane"})
            if r.status_code == 201:
                self.acknowledged.append(r.json()["image_id"])
            return r

        return [
            lambda: http.get("/categories"),
            lambda: http.get(f"/images/{self.image_id}/info"),
            lambda: http.get("/status"),
            lambda: http.post("/search", files={"file": ("q.png", self.query)}),
            lambda: http.get(f"/images/{self.image_id}/similar"),
            lambda: http.get(f"/categories/{self.category_id}/images"),
            upload,
        ]

    def run(self, rounds: int = 3, workers: int = 8) -> list[tuple[int, float, str, str]]:
        """(status, seconds, detail, connection header) of each request, `workers` at a time."""

        def one(i: int) -> tuple[int, float, str, str]:
            with httpx.Client(base_url=self.base, timeout=60) as http:
                call = self._requests(http)[i % 7]
                t0 = time.monotonic()
                r = call()
                body = r.json() if r.headers.get("content-type") == "application/json" else None
                detail = body.get("detail", "") if isinstance(body, dict) else ""
                return r.status_code, time.monotonic() - t0, str(detail), r.headers.get("connection", "")

        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(one, range(7 * rounds)))
        self.sent += len(out)
        for status, _, detail, _ in out:
            self.answers[f"{status} {detail.split(':')[0]}" if status >= 400 else str(status)] += 1
        return out


def _health_during(base: str, seconds: float) -> list[float]:
    """Answer times of /health polled while a fault lasts."""
    times = []
    end = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=5) as http:
        while time.monotonic() < end:
            t0 = time.monotonic()
            assert http.get("/health").status_code == 200
            times.append(time.monotonic() - t0)
            time.sleep(0.2)
    return times


def _wait_until_serving(server: RunningServer, limit_s: float = 30) -> float:
    t0 = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        while time.monotonic() - t0 < limit_s:
            categories, ready = http.get("/categories"), http.get("/ready")
            if categories.status_code == 200 and ready.status_code == 200:
                return time.monotonic() - t0
            time.sleep(0.3)
    last = f"/categories {categories.status_code} {categories.text[:200]}; /ready {ready.status_code} {ready.text[:200]}"
    raise AssertionError(f"no recovery within {limit_s} s: {last}\nserver log (end):\n{server.log()[-4000:]}")


@pytest.fixture(scope="module", autouse=True)
def _fresh_report() -> None:
    REPORT.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def private_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(tmp_path_factory.mktemp("faultpg"))
    yield pg
    try:
        pg.thaw()
    except Exception:
        pass


@pytest.fixture(scope="module")
def fault_db(private_pg: PrivatePostgres, embedder, cifar_train: Dataset) -> Engine:
    admin = make_engine(private_pg.url("postgres"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("CREATE DATABASE faults"))
    admin.dispose()
    engine = make_engine(private_pg.url("faults"))
    migrate.upgrade(engine)
    fill(engine, embedder, cifar_train.samples, 60)
    return engine


@pytest.fixture(scope="module")
def fault_server(private_pg: PrivatePostgres, fault_db: Engine, tmp_path_factory) -> Iterator[RunningServer]:
    env = {
        **os.environ,
        "DATABASE_URL": private_pg.url("faults").render_as_string(hide_password=False),
        "DATA_DIR": str(tmp_path_factory.mktemp("fault-data")),
        "DB_TIMEOUT_SECONDS": str(DB_TIMEOUT_S),
        "REQUEST_TIMEOUT_SECONDS": "20",
        "INDEX_REFRESH_SECONDS": "0.5",
        "MAX_UPLOAD_SIZE": str(MAX_UPLOAD),
        "AUTH_MODE": "off",  # the load includes uploads; keys are test_auth.py's subject (127.0.0.1 only)
    }
    with running_server(env) as server:
        yield server


def _report(section: str, lines: dict) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    with REPORT.open("a") as f:
        f.write(f"{section}: {json.dumps(lines, default=str)}\n")


def test_database_stopped_and_frozen_under_load(
    private_pg: PrivatePostgres, fault_db: Engine, fault_server: RunningServer, cifar_queries: Dataset
) -> None:
    base = fault_server.url
    with fault_db.connect() as conn:
        image_id, category_id = conn.execute(text("SELECT id, category_id FROM images ORDER BY id LIMIT 1")).one()
        before = conn.execute(text("SELECT count(*) FROM images")).scalar_one()
    load = Load(base, image_id, category_id, cifar_queries.samples[0].load())
    assert {s for s, *_ in load.run(rounds=1)} <= {200, 201}  # healthy first
    recoveries = {}
    worst_503 = {}
    health_worst = 0.0

    for fault, cause, heal in (("stopped", private_pg.stop, private_pg.start), ("frozen", private_pg.freeze, private_pg.thaw)):
        cause()
        try:
            with ThreadPoolExecutor(1) as side:
                health = side.submit(_health_during, base, 4 * DB_TIMEOUT_S)
                answers = load.run(rounds=3)
                health_worst = max(health_worst, *health.result())
            worst_503[fault] = round(max(seconds for _, seconds, _, _ in answers), 2)
            for status, seconds, detail, connection in answers:
                assert status == 503, (fault, status, detail)
                assert detail.startswith("database unavailable"), detail
                assert seconds < 4 * DB_TIMEOUT_S + 2, (fault, seconds)  # a deadline, never a hang
                assert connection.lower() != "close"  # a 503 answer keeps the connection
            with httpx.Client(base_url=base, timeout=10) as http:
                r = http.get("/ready")
                assert r.status_code == 503 and r.json()["checks"]["database"] != "ok", r.text
        finally:
            heal()
        recoveries[fault] = round(_wait_until_serving(fault_server), 2)  # no restart of the server
        assert {s for s, *_ in load.run(rounds=1)} <= {200, 201}

    # Rows lost: every acknowledged upload is stored with its embedding, and nothing is half-written.
    with fault_db.connect() as conn:
        stored = set(conn.execute(text("SELECT id FROM images")).scalars())
        orphans = conn.execute(
            text("SELECT count(*) FROM images i WHERE NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.image_id = i.id)")
        ).scalar_one()
    lost = [i for i in load.acknowledged if i not in stored]
    assert not lost and orphans == 0
    assert len(stored) >= before + len(load.acknowledged)
    assert health_worst < 1.0
    _report(
        "database faults",
        {
            "faults": ["stopped", "frozen"],
            "requests": load.sent,
            "answers": dict(load.answers),
            "acknowledged_uploads": len(load.acknowledged),
            "rows_lost": len(lost),
            "half_written": orphans,
            "slowest_503_s": worst_503,
            "worst_health_s": round(health_worst, 3),
            "recovery_s": recoveries,
            "db_timeout_s": DB_TIMEOUT_S,
        },
    )


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_extreme_aspect_images_keep_memory_bounded(fault_server: RunningServer, cifar_queries: Dataset) -> None:
    pid = fault_server.process.pid
    with httpx.Client(base_url=fault_server.url, timeout=60) as http:
        assert http.post("/search", files={"file": ("q.png", cifar_queries.samples[1].load())}).status_code == 200
        baseline = _peak_rss_mb(pid)
        sizes = [(20_000, 1), (1, 20_000), (40_000, 3), (3, 40_000), (60_000, 1), (1, 60_000)]
        for w, h in sizes:
            png = io.BytesIO()
            Image.new("RGB", (w, h), (200, 30, 30)).save(png, "PNG")
            assert len(png.getvalue()) < 2000  # a few hundred bytes each
            r = http.post("/search", files={"file": ("thin.png", png.getvalue())})
            assert r.status_code == 200, r.text
    growth = _peak_rss_mb(pid) - baseline
    # Scaling the short side up first cost 3-13 GB for these; now only the centred square is resampled.
    assert growth < 150, f"peak memory grew by {growth:.0f} MB"
    _report("extreme aspect", {"images": len(sizes), "peak_rss_growth_mb": round(growth, 1)})


def _bytes_written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar")


def test_chunked_oversize_body_is_refused_without_being_written_out(fault_server: RunningServer) -> None:
    pid = fault_server.process.pid
    sent_mb = 64

    def body() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
        for _ in range(sent_mb):
            yield b"\0" * (1 << 20)

    with httpx.Client(base_url=fault_server.url, timeout=60) as http:
        before_images = http.get("/status").json()["database"]["images"]
        written_before = _bytes_written(pid)
        try:
            r = http.post("/upload", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
            status, detail = r.status_code, r.json()["detail"]
        except httpx.TransportError:  # the server may close the connection as soon as it has answered
            status, detail = 413, "(connection closed after the answer)"
        written = _bytes_written(pid) - written_before
        assert status == 413, detail
        assert written < 2 * MAX_UPLOAD + 256 * 1024, f"{written:,} bytes written for a refused body"
        assert http.get("/status").json()["database"]["images"] == before_images
    _report("chunked oversize", {"sent_mb": sent_mb, "server_wrote_mb": round(written / 2**20, 2), "status": status})


# --- the embedded PostgreSQL lives exactly as long as `serve` -----------------------------------------


def _embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DB_HOST")}
    return {**env, "DATA_DIR": str(data_dir), "INDEX_REFRESH_SECONDS": "0"}


def _postmaster(data_dir: Path) -> int | None:
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE else None


def _gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.db
@pytest.mark.model
def test_embedded_postgres_stops_with_serve_on_sigterm_and_kill(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _embedded_env(data_dir)
    init = subprocess.run(
        [sys.executable, "-m", "backend.cli", "init-db"], check=False, env=env, cwd=PROJECT_ROOT, capture_output=True
    )
    assert init.returncode == 0, init.stderr
    assert _postmaster(data_dir) is None  # a CLI command stops the server it started when it exits
    outcomes = {}

    # SIGTERM: uvicorn shuts down, then the process exits normally and stops its PostgreSQL.
    with running_server(env) as server:
        status = httpx.get(f"{server.url}/status", timeout=30).json()
        assert status["database"]["server"].startswith("embedded PostgreSQL")
        postgres = _postmaster(data_dir)
        assert postgres is not None
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(60)
    outcomes["sigterm"] = _gone_within(postgres, 15)
    assert outcomes["sigterm"], "postgres outlived serve after SIGTERM"

    # kill -9: the watchdog notices its owner is gone and stops the server.
    with running_server(env) as server:
        postgres = _postmaster(data_dir)
        assert postgres is not None
        server.process.kill()
        server.process.wait(10)
    outcomes["kill -9"] = _gone_within(postgres, 20)
    assert outcomes["kill -9"], "postgres outlived serve after kill -9"

    # kill -9 of serve and its watchdog together: the server is left running with a stale handle. The next
    # start adopts it, and the stale handle does not keep a clean stop from stopping it.
    with running_server(env) as server:
        postgres = _postmaster(data_dir)
        watchdogs = [
            p for p in psutil.Process(server.process.pid).children() if "backend.storage.embedded" in " ".join(p.cmdline())
        ]
        assert len(watchdogs) == 1
        for p in [*watchdogs, psutil.Process(server.process.pid)]:
            p.kill()
        server.process.wait(10)
    assert postgres is not None and not _gone_within(postgres, 2)  # left behind, as after a power cut of the parent
    with running_server(env) as server:
        assert _postmaster(data_dir) == postgres  # adopted, not started twice
        assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
        server.process.send_signal(signal.SIGINT)  # Ctrl-C
        server.process.wait(60)
    outcomes["adopted, then Ctrl-C"] = _gone_within(postgres, 15)
    assert outcomes["adopted, then Ctrl-C"], "a stale handle kept the adopted server running"
    _report("embedded postgres", {k: "stopped" if v else "left running" for k, v in outcomes.items()})
