"""The service at catalogue size N (issue 29): N vectors stored straight into a fresh database (`scale_seed`),
a real `serve` process on it, and per N:

- start-up: ready (`/ready` 200) from the database (no cache file) and from the cache file it saved;
- every GET endpoint's latency: the first call (cold), p50/p99 of repeats, and p50/p99 right after a write;
- upload latency p50/p99; search p50 with images never stored nor searched before, and with stored ones
  (the first size, 2,000 by default, is the baseline for the ratios), with the server's per-stage timings;
- 16 readers cycling through every GET endpoint while a 1,000-image folder job runs and uploads go on:
  non-2xx answers per endpoint, and the server's RSS idle against its peak.

`python benchmarks/run.py --sections scale [--scale-sizes 2000,100000] [--scale-database-url URL]`;
with a database URL, the largest size runs on that database (seeded up to N, resumably) instead of a fresh one.
"""

import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, make_url

from backend.core.config import Settings
from backend.embedding.registry import model_id
from backend.storage import catalogue, migrate
from backend.storage.engine import make_engine, session_scope
from benchmarks.harness import TempDatabase, cifar_samples, hardware, percentiles
from benchmarks.sections import scale_seed
from tests.utils.server import RunningServer, running_server

READERS = 16
JOB_IMAGES = 1_000
UPLOAD_POOL = 200  # CIFAR-10 test images the uploads cycle through
NOVEL_QUERIES = 40


def server_env(settings: Settings, url: URL, data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": url.render_as_string(hide_password=False),
        "DATA_DIR": str(data_dir),
        "ONNX_CACHE_DIR": str(settings.onnx_dir),  # the exported graph is cached by model id
        "AUTH_MODE": "off",  # loopback only; keys are not what this measures
        "LOG_FORMAT": "text",
    }


def anon_mb(pid: int) -> float:
    """The server's resident memory less its file-backed pages (the mapped re-rank file, the libraries): its
    heap, what readers and jobs could make grow; mapped file pages are the page cache's to drop."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss - p.memory_info().shared for p in (proc, *proc.children(recursive=True))) / 2**20


def rss_mb(pid: int) -> float:
    """The server's resident memory (its own process; the job worker runs inside it)."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in (proc, *proc.children(recursive=True))) / 2**20


def wait_ready(server: RunningServer, started: float, limit_s: float = 1800) -> float:
    """Seconds from `started` until /ready answers 200 (model loaded, index current)."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        while time.perf_counter() - started < limit_s:
            if http.get("/ready").status_code == 200:
                return time.perf_counter() - started
            time.sleep(0.1)
    raise RuntimeError(f"not ready within {limit_s:.0f} s:\n{server.log()[-3000:]}")


def get_endpoints(http: httpx.Client) -> dict[str, str]:
    """Every GET endpoint that reads the catalogue, with real ids from this catalogue."""
    categories = http.get("/categories").json()
    category = max(categories, key=lambda c: c["images"])
    image = http.get(f"/categories/{category['id']}/images?limit=1").json()["items"][0]["id"]
    return {
        "status": "/status",
        "categories": "/categories",
        "category page": f"/categories/{category['id']}/images?limit=50",
        "image info": f"/images/{image}/info",
        "similar": f"/images/{image}/similar?limit=10",
        "duplicates": "/duplicates?limit=20",
        "map": "/map",
        "gallery": "/prototypes/gallery",
        "jobs": "/jobs",
    }


def timed(call: Callable[[], httpx.Response]) -> tuple[float, int]:
    t = time.perf_counter()
    try:
        status = call().status_code
    except httpx.HTTPError:
        status = 0  # no answer (timeout, connection closed)
    return time.perf_counter() - t, status


def summary(seconds: list[float], statuses: list[int]) -> dict:
    bad = sum(1 for s in statuses if not 200 <= s < 300)
    return {**{k: round(v, 1) for k, v in percentiles(seconds).items()}, "non_2xx": bad}


class Uploads:
    """Distinct real images to upload (CIFAR-10 test split), one after another."""

    def __init__(self, settings: Settings, n: int) -> None:
        self.images = [s.load() for s in cifar_samples(settings, n, "test").samples]
        self.next = 0
        self.duplicates = 0  # uploads the server already held (a kept database with images from elsewhere)
        self.lock = threading.Lock()

    def one(self, http: httpx.Client) -> httpx.Response:
        with self.lock:
            data = self.images[self.next % len(self.images)]
            self.next += 1
        answer = http.post("/upload", files={"file": ("u.png", data)}, data={"category": "c0"})
        if answer.status_code == 200 and answer.json().get("duplicate"):
            with self.lock:  # answered by its sha256 alone: not an upload's real cost
                self.duplicates += 1
        return answer


def endpoint_latencies(http: httpx.Client, endpoints: dict[str, str], uploads: Uploads, repeats: int) -> dict:
    """Per endpoint: the first call, repeats, and repeats each right after one upload."""
    out = {}
    for name, path in endpoints.items():
        cold, cold_status = timed(lambda p=path: http.get(p))
        warm = [timed(lambda p=path: http.get(p)) for _ in range(repeats)]
        after: list[tuple[float, int]] = []
        for _ in range(repeats):
            uploads.one(http)
            after.append(timed(lambda p=path: http.get(p)))
        out[name] = {
            "cold_ms": round(cold * 1000, 1),
            "cold_status": cold_status,
            "again": summary([s for s, _ in warm], [c for _, c in warm]),
            "after_write": summary([s for s, _ in after], [c for _, c in after]),
        }
        print(
            f"    {name:14s} cold {cold * 1000:8.1f} ms | again p50 {out[name]['again']['p50']:8.1f} p99 "
            f"{out[name]['again']['p99']:8.1f} | after a write p50 {out[name]['after_write']['p50']:8.1f} p99 "
            f"{out[name]['after_write']['p99']:8.1f} ms",
            file=sys.stderr,
        )
    return out


def novel_queries(settings: Settings, n: int) -> list[bytes]:
    """n CIFAR-10 test images that `Uploads` never stores: queries that neither the catalogue nor a warm-up holds."""
    uploaded = {s.source for s in cifar_samples(settings, UPLOAD_POOL, "test").samples}
    return [s.load() for s in cifar_samples(settings, UPLOAD_POOL + 2 * n, "test").samples if s.source not in uploaded][:n]


def timed_searches(http: httpx.Client, queries: list[bytes]) -> dict:
    """Search latency over `queries`, one at a time, and where its time goes (the server's own per-stage
    timings, p50 of each)."""
    answers: list[httpx.Response] = []

    def search(q: bytes) -> httpx.Response:
        answers.append(http.post("/search?limit=10", files={"file": ("q.png", q)}))
        return answers[-1]

    timings = [timed(lambda q=q: search(q)) for q in queries]
    stages: dict[str, list[float]] = {}
    for answer in answers:
        for stage, ms in answer.json().get("timings_ms", {}).items() if answer.status_code == 200 else ():
            stages.setdefault(stage, []).append(ms)
    return {
        **summary([s for s, _ in timings], [c for _, c in timings]),
        "stages_p50_ms": {stage: round(float(np.median(ms)), 2) for stage, ms in stages.items()},
    }


def stage1_settled(http: httpx.Client, tick_s: float, limit_s: float = 600) -> float:
    """Seconds until no stage-1 retrain runs in the background. The uploads above can start one (at 2,000
    images, 90 labels are enough); it shares the CPUs with the queries (on 2 cores even in the idle class:
    query embedding measured 11 ms against 8 ms), so searches are timed after it, at every size alike. A
    retrain starts on the server's tick, so "none" must hold on two answers a tick apart (one after the last
    write's tick, one after a retrain that the end of another could start)."""
    start = time.perf_counter()
    quiet = 0
    while time.perf_counter() - start < limit_s and quiet < 2:
        time.sleep(tick_s + 0.5)
        quiet = 0 if http.get("/status").json()["stage1"].get("training") else quiet + 1
    return round(time.perf_counter() - start, 1)


def search_and_upload(http: httpx.Client, settings: Settings, uploads: Uploads, repeats: int) -> dict:
    """Search p50 with NOVEL_QUERIES images never stored nor searched before (each once), and with 20 stored
    ones (uploaded above; twice each: their bytes find the stored copy); upload latency."""
    stored = [s.load() for s in cifar_samples(settings, 20, "test").samples]
    http.post("/search", files={"file": ("q.png", stored[0])})  # the route's first call (not a query's cache)
    settled_s = stage1_settled(http, settings.index_refresh_seconds)
    novel = timed_searches(http, novel_queries(settings, NOVEL_QUERIES))
    again = timed_searches(http, stored * 2)
    upload = [timed(lambda: uploads.one(http)) for _ in range(repeats)]
    return {
        "upload_duplicates": uploads.duplicates,
        "waited_for_stage1_training_s": settled_s,
        "search": novel,
        "search_stored": again,
        "upload": summary([s for s, _ in upload], [c for _, c in upload]),
    }


def job_folder(settings: Settings, root: Path, n: int) -> Path:
    """n CIFAR-10 images laid out as `<category>/<image>.png`, for a folder job."""
    folder = root / "job"
    for i, sample in enumerate(cifar_samples(settings, n, "train").samples):
        (folder / sample.label).mkdir(parents=True, exist_ok=True)
        (folder / sample.label / f"{i}.png").write_bytes(sample.load())
    return folder


def under_load(server: RunningServer, endpoints: dict[str, str], uploads: Uploads, folder: Path, limit_s: float) -> dict:
    """READERS threads cycling through every GET endpoint and one uploader, while a folder job runs."""
    pid = server.process.pid
    idle, idle_anon = rss_mb(pid), anon_mb(pid)
    stop = threading.Event()
    answers: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    lock = threading.Lock()
    peak = [idle, idle_anon]

    def reader(offset: int) -> None:
        names = list(endpoints)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            i = offset
            while not stop.is_set():
                name = names[i % len(names)]
                _, status = timed(lambda n=name: http.get(endpoints[n]))
                with lock:
                    answers[name] += 1
                    if not 200 <= status < 300:
                        failures[f"{name} {status}"] += 1
                i += 1

    def uploader() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while not stop.is_set():
                _, status = timed(lambda: uploads.one(http))
                with lock:
                    answers["upload"] += 1
                    if not 200 <= status < 300:
                        failures[f"upload {status}"] += 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(READERS)] + [threading.Thread(target=uploader)]
    with httpx.Client(base_url=server.url, timeout=120) as http:
        job = http.post("/jobs/folder", json={"path": str(folder)}).json()
        start = time.perf_counter()
        for t in threads:
            t.start()
        state = job
        while time.perf_counter() - start < limit_s and state["state"] in ("queued", "running"):
            peak = [max(peak[0], rss_mb(pid)), max(peak[1], anon_mb(pid))]
            time.sleep(0.2)
            state = http.get(f"/jobs/{job['id']}").json()
        job_s = time.perf_counter() - start
        stop.set()
        for t in threads:
            t.join()
    return {
        "readers": READERS,
        "job": {k: state[k] for k in ("state", "total", "added", "failed")} | {"seconds": round(job_s, 1)},
        "requests": dict(answers),
        "non_2xx": dict(failures),
        "rss_idle_mb": round(idle),
        "rss_peak_mb": round(peak[0]),
        "rss_peak_over_idle": round(peak[0] / idle, 2),
        "anon_idle_mb": round(idle_anon),
        "anon_peak_mb": round(peak[1]),
        "anon_peak_over_idle": round(peak[1] / idle_anon, 2),
    }


def remove_added(engine: Engine, seeded_through: int) -> int:
    """Delete what the run added (uploads, the job's images), so a kept database holds N vectors again and the
    next run's uploads and job are new images, not duplicates answered by their sha256 alone."""
    with session_scope(engine) as session:
        added = catalogue.image_ids_after(session, seeded_through)
    for image_id in added:
        with session_scope(engine) as session:
            catalogue.delete_image(session, image_id)
    return len(added)


def one_size(settings: Settings, url: URL, n: int, quick: bool) -> dict:
    """Seed, then every measurement of the module's docstring, at n vectors."""
    engine = make_engine(url, 3600)  # VACUUM ANALYZE of a 1M catalogue outlasts DB_TIMEOUT_SECONDS
    migrate.upgrade(engine)
    model = model_id(settings)
    seeded = scale_seed.seed(engine, settings, model, n, progress=True)
    with engine.connect() as conn:  # fresh statistics: the planner sees the catalogue as it is
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    repeats = 5 if quick else 10
    row: dict = {"vectors": n, "seed": seeded}
    with session_scope(engine) as session:
        seeded_through = catalogue.newest_image_id(session)
    with tempfile.TemporaryDirectory(prefix="imsrc-scale-") as tmp:
        env = server_env(settings, url, Path(tmp) / "data")
        uploads = Uploads(settings, UPLOAD_POOL)
        started = time.perf_counter()
        with running_server(env, start_timeout_s=3600) as server:
            row["ready_from_database_s"] = round(wait_ready(server, started), 2)
            row["rss_idle_mb"] = round(rss_mb(server.process.pid))
            with httpx.Client(base_url=server.url, timeout=300) as http:
                endpoints = get_endpoints(http)
                print(f"  scale {n:,}: ready from the database in {row['ready_from_database_s']} s", file=sys.stderr)
                row["endpoints"] = endpoint_latencies(http, endpoints, uploads, repeats)
                row |= search_and_upload(http, settings, uploads, repeats * 2)
            folder = job_folder(settings, Path(tmp), 100 if quick else JOB_IMAGES)
            row["under_load"] = under_load(server, endpoints, uploads, folder, 600)
            row["rss_after_mb"] = round(rss_mb(server.process.pid))
        started = time.perf_counter()  # the server saved its cache file as it stopped
        with running_server(env, start_timeout_s=3600) as server:
            row["ready_from_cache_s"] = round(wait_ready(server, started), 2)
            row["origin"] = next((ln for ln in server.log().splitlines() if "loaded from cache" in ln), "")[-160:]
    row["removed_after"] = remove_added(engine, seeded_through)
    if row["upload_duplicates"]:
        print(
            f"  scale {n:,}: {row['upload_duplicates']} uploads were of images already stored: upload times are off",
            file=sys.stderr,
        )
    engine.dispose()
    print(
        f"  scale {n:,}: ready from cache {row['ready_from_cache_s']} s; search p50 {row['search']['p50']} ms "
        f"(server's stages p50 {row['search']['stages_p50_ms']}), a stored image {row['search_stored']['p50']} ms; upload "
        f"p50 {row['upload']['p50']} p99 {row['upload']['p99']} ms; under load {row['under_load']['non_2xx'] or 'all 2xx'}, "
        f"RSS {row['under_load']['rss_idle_mb']} -> {row['under_load']['rss_peak_mb']} MB (without mapped files "
        f"{row['under_load']['anon_idle_mb']} -> {row['under_load']['anon_peak_mb']} MB)",
        file=sys.stderr,
    )
    return row


def run(settings: Settings, quick: bool, sizes: tuple[int, ...] = (2_000, 100_000), database_url: str | None = None) -> dict:
    """Every size in `sizes` (the first is the baseline for search), each on a fresh database; the largest
    on `database_url` when given."""
    print(f"  scale on {hardware()['cpu']}, {os.cpu_count()} cores", file=sys.stderr)
    rows = []
    for n in sizes:
        if database_url and n == max(sizes):
            rows.append(one_size(settings, make_url(database_url).set(drivername="postgresql+psycopg2"), n, quick))
            continue
        with TempDatabase() as db:
            db.engine.dispose()
            rows.append(one_size(settings, db.url, n, quick))
    base = rows[0]["search"]["p50"]
    for row in rows:
        row["search_p50_over_first"] = round(row["search"]["p50"] / base, 2)
        row["search_stored_p50_over_first"] = round(row["search_stored"]["p50"] / rows[0]["search_stored"]["p50"], 2)
    return {"cpu": hardware()["cpu"], "cores": os.cpu_count(), "sizes": rows}
