"""Catalogue jobs with real worker processes on a real PostgreSQL and real CIFAR-10 images: an archive job
ends with exact counts, URL jobs against a local HTTP server (private addresses refused by default), two
workers share one job, a worker killed with SIGKILL mid-job loses and duplicates nothing, cancel."""

import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text

from backend import jobs
from backend.core.config import PROJECT_ROOT
from backend.sources.datasets import load_cifar10
from backend.storage import migrate
from backend.storage.engine import make_engine, session_scope
from backend.storage.schema import Image
from tests.utils.http_images import serving
from tests.utils.settings import CIFAR_SUBSET, make_settings

pytestmark = pytest.mark.model  # worker processes load the real Lite0 weights


@pytest.fixture(scope="module")
def cifar() -> list[tuple[str, bytes]]:
    return [(s.label, s.load()) for s in load_cifar10(CIFAR_SUBSET, "test")[:60]]


@pytest.fixture
def db(databases, tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    name = f"imsrc_jobs_{os.getpid()}_{tmp_path.name[-12:]}".replace("-", "_").lower()
    with databases.admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    databases.created.append(name)
    url = databases.server_url.set(database=name)
    engine = make_engine(url)
    migrate.upgrade(engine)
    yield url.render_as_string(hide_password=False), engine
    engine.dispose()


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")  # shared: the first worker exports the graph, the others load it


class Workers:
    def __init__(self, url: str, data_dir: Path, onnx_dir: Path, **env: str) -> None:
        self.env = {**os.environ, "DATABASE_URL": url, "DATA_DIR": str(data_dir), "ONNX_CACHE_DIR": str(onnx_dir), **env}
        self.procs: list[subprocess.Popen] = []
        self.logs = data_dir.parent / f"logs-{id(self)}"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self) -> subprocess.Popen:
        log = open(self.logs / f"worker{len(self.procs)}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "worker"], cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=log
        )
        self.procs.append(proc)
        return proc

    def chunks_done(self, n: int) -> int:
        return (self.logs / f"worker{n}.log").read_text().count(" chunk ")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def workers(db, tmp_path: Path, onnx_dir: Path) -> Iterator[Workers]:
    group = Workers(db[0], tmp_path / "worker-data", onnx_dir, ALLOW_PRIVATE_URLS="true")
    yield group
    group.stop()


def image_count(engine: Engine) -> int:
    with session_scope(engine) as session:
        return session.scalar(select(func.count()).select_from(Image)) or 0


def make_archive(path: Path, images: list[tuple[str, bytes]], extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i, (label, data) in enumerate(images):
            zf.writestr(f"{label}/img{i}.png", data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def test_archive_job_ends_with_exact_counts_and_searchable_images(db, workers: Workers, tmp_path: Path, cifar) -> None:
    _url, engine = db
    settings = make_settings(tmp_path / "server", engine, job_chunk_size=16)
    archive = make_archive(
        tmp_path / "a.zip",
        cifar[:40] + cifar[:3],  # 3 exact duplicates inside the archive
        {"../escape.png": cifar[0][1], "cat/notes.png": b"not an image at all"},
    )
    app = jobs.open_queue(engine)
    job_id = jobs.create_job(settings, engine, "archive", "efficientnet_lite0/imagenet/224px", {}, None)
    jobs.stage_archive(settings, engine, app, job_id, archive)
    assert jobs.get_job(engine, job_id).total == 44 and not archive.exists()
    workers.start()
    job = jobs.wait_for(engine, job_id, 240)
    assert job.state == "succeeded", job.message
    assert (job.total, job.done, job.added, job.duplicates, job.failed, job.skipped) == (44, 44, 40, 3, 1, 1)
    assert [f["source"] for f in job.failures] == ["archive", "cat/notes.png"]  # the skipped entry, then the bad image
    assert "leaves" in job.failures[0]["reason"] and image_count(engine) == 40
    assert jobs.images_per_second(job) and not (settings.data_dir / "jobs" / str(job_id)).exists()


@pytest.fixture(scope="module")
def image_server(cifar) -> Iterator[str]:
    routes = {f"/img{i}": data for i, (_label, data) in enumerate(cifar)}
    with serving({**routes, "/page": b"<html>hello</html>"}) as url:
        yield url


def url_list(base: str) -> str:
    lines = ["url,category,description"] + [f"{base}/img{i},{'cat' if i % 2 else 'dog'},picture {i}" for i in range(12)]
    lines[1] = lines[1].replace("http://", "http://user:secret@").replace("/img0", "/img0?signature=secret")
    return "\n".join([*lines, f"{base}/nothing-here", f"{base}/page", "ftp://example.com/x.png"])


def test_url_job_with_404s_and_non_images(db, workers: Workers, tmp_path: Path, image_server: str) -> None:
    _url, engine = db
    settings = make_settings(tmp_path / "server", engine, job_chunk_size=5, allow_private_urls=True)
    job_id = jobs.create_job(settings, engine, "urls", "efficientnet_lite0/imagenet/224px", {}, None)
    jobs.stage_urls(settings, engine, jobs.open_queue(engine), job_id, url_list(image_server))
    workers.start()
    job = jobs.wait_for(engine, job_id, 240)
    assert job.state == "succeeded", job.message
    assert (job.total, job.added, job.failed) == (15, 12, 3)
    reasons = " ".join(f["reason"] for f in job.failures)
    assert "HTTP 404" in reasons and "not an image" in reasons and "not an http(s) URL" in reasons
    assert image_count(engine) == 12
    with session_scope(engine) as session:  # credentials in a URL are used to download, never kept
        sources = list(session.scalars(select(Image.source)))
    assert f"{image_server.replace('http://', '')}/img0" in " ".join(sources) and "secret" not in " ".join(sources)


def test_the_same_list_is_refused_as_private_by_default(db, tmp_path: Path, image_server: str, onnx_dir: Path) -> None:
    url, engine = db
    strict = Workers(url, tmp_path / "worker-data", onnx_dir)  # ALLOW_PRIVATE_URLS unset
    settings = make_settings(tmp_path / "server", engine, job_chunk_size=8)
    job_id = jobs.create_job(settings, engine, "urls", "efficientnet_lite0/imagenet/224px", {}, None)
    jobs.stage_urls(settings, engine, jobs.open_queue(engine), job_id, url_list(image_server))
    strict.start()
    try:
        job = jobs.wait_for(engine, job_id, 240)
    finally:
        strict.stop()
    assert job.state == "succeeded" and job.added == 0 and job.failed == 15
    assert sum("private, loopback or reserved" in f["reason"] for f in job.failures) == 14
    assert image_count(engine) == 0


class Gate:
    """A local image server that holds every download until it is opened: a worker that has taken a chunk
    of a URL job stays inside that chunk, so the test decides who has which chunk, not the scheduler."""

    def __init__(self, images: list[tuple[str, bytes]]) -> None:
        self.opened = threading.Event()
        self.requested: set[int] = set()
        self.images = images
        self._server = ExitStack()
        self.url = self._server.enter_context(serving(self._answer))

    def _answer(self, path: str) -> bytes:
        number = int(path.strip("/")[3:])
        self.requested.add(number)
        self.opened.wait(120)
        return self.images[number][1]

    def wait_until_chunks_held(self, chunks: int, chunk_size: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while len({n // chunk_size for n in list(self.requested)}) < chunks:
            assert time.monotonic() < deadline, f"only chunks {sorted({n // chunk_size for n in self.requested})} asked for"
            time.sleep(0.1)

    def close(self) -> None:
        self.opened.set()
        self._server.close()


def test_two_workers_share_a_job_and_one_killed_mid_job_loses_nothing(db, tmp_path: Path, cifar, onnx_dir: Path) -> None:
    """Deterministic whoever is faster: each worker runs one chunk at a time, and the gate holds the first
    worker inside its chunk until the second has taken another one."""
    url, engine = db
    gate = Gate(cifar)
    group = Workers(url, tmp_path / "worker-data", onnx_dir, ALLOW_PRIVATE_URLS="true", URL_TIMEOUT_SECONDS="300")
    settings = make_settings(tmp_path / "server", engine, job_chunk_size=4)
    job_id = jobs.create_job(settings, engine, "urls", "efficientnet_lite0/imagenet/224px", {}, None)
    listed = "\n".join(f"{gate.url}/img{i},{label}" for i, (label, _data) in enumerate(cifar))
    jobs.stage_urls(settings, engine, jobs.open_queue(engine), job_id, listed)
    try:
        first = group.start()
        gate.wait_until_chunks_held(1, 4)  # the first worker is inside a chunk and cannot take another
        group.start()
        gate.wait_until_chunks_held(2, 4)  # so the second one has taken a chunk of its own
        gate.opened.set()
        deadline = time.monotonic() + 240
        while jobs.get_job(engine, job_id).done < 12 and time.monotonic() < deadline:
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)  # mid-job: a chunk in flight is lost with it, then retried
        first.wait(10)
        group.start()  # and another one joins
        job = jobs.wait_for(engine, job_id, 300)
    finally:
        gate.close()
        group.stop()
    assert job.state == "succeeded", job.message
    assert (job.total, job.done, job.added, job.duplicates, job.failed) == (60, 60, 60, 0, 0)
    assert image_count(engine) == 60
    assert group.chunks_done(0) >= 1 and group.chunks_done(1) >= 1  # both ran chunks of the one job


def test_cancel_stops_new_chunks_and_keeps_finished_ones(db, tmp_path: Path, cifar, onnx_dir: Path) -> None:
    url, engine = db
    settings = make_settings(tmp_path / "server", engine, job_chunk_size=10)
    job_id = jobs.create_job(settings, engine, "archive", "efficientnet_lite0/imagenet/224px", {}, None)
    jobs.stage_archive(settings, engine, jobs.open_queue(engine), job_id, make_archive(tmp_path / "c.zip", cifar))
    cancelled = jobs.cancel_job(engine, job_id)
    assert cancelled.state == "cancelled"
    group = Workers(url, tmp_path / "wd", onnx_dir)
    group.start()
    try:
        time.sleep(8)  # the worker drains the queued chunks: each finds its job cancelled
    finally:
        group.stop()
    job = jobs.get_job(engine, job_id)
    assert job.state == "cancelled" and job.added == 0 and image_count(engine) == 0


def test_a_server_sees_a_separate_workers_images_within_seconds(db, workers: Workers, tmp_path: Path, cifar) -> None:
    """Through the API: an archive job on a server without its own worker (SERVE_WORKER=false), run by a
    separate worker process; the server's index follows the worker's commits by its refresh tick."""
    import httpx

    from tests.utils.server import running_server

    url, engine = db
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DATA_DIR": str(tmp_path / "server"),
        "SERVE_WORKER": "false",
        "AUTH_MODE": "off",
        "INDEX_REFRESH_SECONDS": "1",
        "JOB_CHUNK_SIZE": "10",
    }
    archive = make_archive(tmp_path / "d.zip", cifar[:20])
    with running_server(env) as server:
        with open(archive, "rb") as f:
            answer = httpx.post(f"{server.url}/jobs/archive", files={"file": ("d.zip", f, "application/zip")}, timeout=60)
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        workers.start()
        job = jobs.wait_for(engine, job_id, 240)
        assert job.state == "succeeded" and job.added == 20
        finished = time.monotonic()
        while True:  # until the server's refresh tick has applied the worker's commits
            hits = httpx.post(
                f"{server.url}/search?limit=1&use_prototypes=false",
                files={"file": ("q.png", cifar[7][1], "image/png")},
                timeout=60,
            ).json()["results"]
            if (hits and hits[0]["score"] > 0.9999) or time.monotonic() - finished > 15:
                break
            time.sleep(0.2)
        assert hits and hits[0]["score"] > 0.9999, hits
        assert httpx.get(f"{server.url}/jobs/{job_id}", timeout=10).json()["progress"] == 1.0
        print(f"\nsearchable on the server {time.monotonic() - finished:.2f} s after the job ended")


def test_populate_in_the_background_is_a_job_the_workers_finish(db, workers: Workers, tmp_path: Path) -> None:
    from tests.utils.cli import run_cli

    url, engine = db
    env = {
        "DATABASE_URL": url,
        "DATA_DIR": str(tmp_path / "cli"),
        "CIFAR10_DIR": str(CIFAR_SUBSET.parent),
        "JOB_CHUNK_SIZE": "25",
    }
    done = run_cli(env, "populate", "--num-images", "50", "--background")
    assert done.returncode == 0, done.stderr
    assert "50 images in 2 chunks queued" in done.stdout
    job_id = int(done.stdout.split()[1].rstrip(":"))
    workers.start()
    job = jobs.wait_for(engine, job_id, 240)
    assert (job.kind, job.state, job.added) == ("dataset", "succeeded", 50) and image_count(engine) == 50
    shown = run_cli(env, "jobs", "show", str(job_id))
    assert f"job {job_id} dataset  succeeded  50/50 done: 50 added" in shown.stdout, shown.stdout


def test_reembedding_with_another_model_keeps_the_vectors_apart(db, workers: Workers, tmp_path: Path, cifar) -> None:
    from backend.embedding.registry import model_id
    from backend.storage import catalogue, vector_reader

    _url, engine = db
    settings = make_settings(tmp_path / "server", engine, job_chunk_size=8)
    queue = jobs.open_queue(engine)
    first = jobs.create_job(settings, engine, "archive", "efficientnet_lite0/imagenet/224px", {}, None)
    jobs.stage_archive(settings, engine, queue, first, make_archive(tmp_path / "e.zip", cifar[:12]))
    workers.start()
    assert jobs.wait_for(engine, first, 240).added == 12
    lite2 = model_id(settings, "efficientnet_lite2")
    again = jobs.create_job(settings, engine, "reembed", lite2, {"model_name": "efficientnet_lite2"}, None)
    jobs.stage_job(settings, engine, queue, again)
    job = jobs.wait_for(engine, again, 300)
    assert (job.state, job.total, job.added) == ("succeeded", 12, 12), job.message
    with session_scope(engine) as session:
        assert dict(catalogue.model_ids(session)) == {"efficientnet_lite0/imagenet/224px": 12, lite2: 12}
        assert catalogue.load_prototypes(session, lite2).counts.sum() == 12
        assert vector_reader.load_vectors(session, lite2).vectors.shape == (12, 1280)
    nothing = jobs.create_job(settings, engine, "reembed", lite2, {"model_name": "efficientnet_lite2"}, None)
    jobs.stage_job(settings, engine, queue, nothing)
    assert jobs.get_job(engine, nothing).state == "failed"  # every image has one already: nothing to do
    queue.close()


def test_a_folder_job_never_follows_links_out_of_the_folder(db, workers: Workers, tmp_path: Path, cifar) -> None:
    _url, engine = db
    settings = make_settings(tmp_path / "server", engine, job_chunk_size=4)
    root = tmp_path / "folder"
    for i, (label, data) in enumerate(cifar[:6]):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.png").write_bytes(data)
    outside = tmp_path / "secret.png"
    outside.write_bytes(cifar[10][1])
    (root / cifar[0][0] / "link.png").symlink_to(outside)  # a link out of the folder: skipped and counted
    job_id = jobs.create_job(settings, engine, "folder", "efficientnet_lite0/imagenet/224px", {"path": str(root)}, None)
    jobs.stage_job(settings, engine, jobs.open_queue(engine), job_id)
    workers.start()
    job = jobs.wait_for(engine, job_id, 240)
    assert (job.state, job.total, job.added, job.skipped) == ("succeeded", 6, 6, 1), job.failures
    nowhere = str(tmp_path / "nowhere")
    missing = jobs.create_job(settings, engine, "folder", "efficientnet_lite0/imagenet/224px", {"path": nowhere}, None)
    jobs.stage_job(settings, engine, jobs.open_queue(engine), missing)
    failed = jobs.get_job(engine, missing)
    assert failed.state == "failed" and "not on this server" in (failed.message or "") and nowhere not in (failed.message or "")
