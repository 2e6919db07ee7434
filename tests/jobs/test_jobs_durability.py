"""Catalogue jobs survive a crash at any step (issue 19): a real server killed with SIGKILL while it extracts
an archive, or between two staged chunks, then started again; a job ends with exact counts and leaves no
files. A download that trickles fails within its deadline without holding up another job. One bad entry in
an archive is one counted failure. The kill lands at an exact step through a failpoint (IMSRC_FAILPOINT)."""

import io
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select

from backend import jobs
from backend.sources.archives import extract_archive
from backend.sources.datasets import load_cifar10
from backend.storage.engine import session_scope
from backend.storage.schema import CatalogueJob, CatalogueJobItem, Image
from tests.utils.http_images import Reply, serving
from tests.utils.server import running_server
from tests.utils.settings import CIFAR_SUBSET, make_settings

pytestmark = pytest.mark.model  # servers and workers load the real weights


@pytest.fixture(scope="module")
def cifar() -> list[tuple[str, bytes]]:
    return [(s.label, s.load()) for s in load_cifar10(CIFAR_SUBSET, "test")[:40]]


def make_tar(path: Path, images: list[tuple[str, bytes]], junk: int) -> Path:
    """The images, one entry whose name is too long for any file system (300 bytes), and `junk` text files."""
    with tarfile.open(path, "w") as tf:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for i, (label, data) in enumerate(images):
            add(f"{label}/img{i}.png", data)
        add(f"cat/{'x' * 300}.png", images[0][1])
        for i in range(junk):
            add(f"dog/notes{i}.txt", b"not an image")
    return path


def test_one_bad_entry_is_one_counted_failure(tmp_path: Path, cifar) -> None:
    report = extract_archive(make_tar(tmp_path / "a.tar", cifar[:20], junk=0), tmp_path / "out")
    assert report.files == 20 and len(report.failures) == 1 and "too long" in report.failures[0][1].lower()


def count(engine: Engine, model: type) -> int:
    with session_scope(engine) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def server_env(engine: Engine, data: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(data),
        "ONNX_CACHE_DIR": str(data.parent / "onnx"),
        "AUTH_MODE": "off",
        "JOB_CHUNK_SIZE": "4",
        **extra,
    }


def post_and_die(env: dict[str, str], archive: Path) -> None:
    """Hand the archive over to a server that the failpoint kills while it stages (maybe before it answers)."""
    with running_server(env) as server:
        try:
            with open(archive, "rb") as f:
                httpx.post(f"{server.url}/jobs/archive", files={"file": ("a.tar", f, "application/x-tar")}, timeout=60)
        except httpx.HTTPError:
            pass  # killed before it answered: the job row and its input were saved first
        assert server.process.wait(60) == -9, "the failpoint did not kill the server"


@pytest.mark.parametrize("failpoint", ["extracted-entry:30", "staged-chunk:2"])
def test_a_server_killed_while_staging_finishes_the_job_after_a_restart(databases, tmp_path: Path, cifar, failpoint) -> None:
    engine = databases.new()
    data = tmp_path / "data"
    archive = make_tar(tmp_path / "a.tar", cifar[:20], junk=40)
    post_and_die(server_env(engine, data, IMSRC_FAILPOINT=failpoint), archive)
    with session_scope(engine) as session:
        job_id, staged = session.execute(select(CatalogueJob.id, CatalogueJob.params["staged"])).one()
    assert staged is False and (data / "jobs" / str(job_id) / "input").is_file()  # died mid-staging
    with running_server(server_env(engine, data)):  # the restart resumes staging; its own worker runs the chunks
        job = jobs.wait_for(engine, job_id, 240)
        time.sleep(0.5)
    assert job.state == "succeeded", job.message
    assert (job.total, job.done, job.added, job.duplicates, job.failed, job.skipped) == (21, 21, 20, 0, 1, 40)
    assert count(engine, Image) == 20 and count(engine, CatalogueJobItem) == 0
    assert not any((data / "jobs").iterdir()), list((data / "jobs").iterdir())  # no files left


def test_files_of_ended_jobs_are_swept_at_start(databases, tmp_path: Path) -> None:
    engine = databases.new()
    settings = make_settings(tmp_path / "data", engine)
    ended = jobs.create_job(settings, engine, "archive", "m", {}, None)
    jobs.cancel_job(engine, ended)
    for name in (str(ended), "999999", "uploads"):  # a cancelled job, one that no longer exists, an old upload folder
        (settings.data_dir / "jobs" / name).mkdir(parents=True)
        (settings.data_dir / "jobs" / name / "input").write_bytes(b"x" * 1000)
    live = jobs.create_job(settings, engine, "archive", "m", {}, None)
    jobs.save_input(settings, live, lambda part: part.write_bytes(b"kept until staged"))
    assert jobs.sweep_job_files(settings, engine) == 3
    assert [p.name for p in (settings.data_dir / "jobs").iterdir()] == [str(live)]


@pytest.fixture
def trickle_server(cifar) -> Iterator[str]:
    """`/slow.png` sends a byte a second; `/img<N>` answers at once."""
    routes = {f"/img{i}": data for i, (_label, data) in enumerate(cifar)}
    with serving({**routes, "/slow.png": Reply(cifar[0][1], trickle_s=1)}) as url:
        yield url


def test_a_trickling_download_fails_in_time_and_does_not_hold_up_another_job(databases, tmp_path: Path, trickle_server) -> None:
    engine = databases.new()
    env = server_env(engine, tmp_path / "data", ALLOW_PRIVATE_URLS="true", URL_TIMEOUT_SECONDS="3", JOB_CHUNK_SIZE="1")
    with running_server(env) as server:
        slow = httpx.post(f"{server.url}/jobs/urls", json={"urls": [f"{trickle_server}/slow.png"]}, timeout=30).json()["id"]
        started = time.monotonic()
        fast_job = {"urls": [f"{trickle_server}/img3"], "category": "cat"}  # named: nothing to predict it from yet
        other = httpx.post(f"{server.url}/jobs/urls", json=fast_job, timeout=30).json()["id"]
        fast = jobs.wait_for(engine, other, 60)
        waited = time.monotonic() - started
        failed = jobs.wait_for(engine, slow, 60)
    assert fast.state == "succeeded" and fast.added == 1
    assert waited < 3 + 15, f"the other job waited {waited:.1f} s"  # at most one deadline behind the slow download
    assert failed.state == "succeeded" and failed.failed == 1 and "took longer than 3 s" in failed.failures[0]["reason"]
