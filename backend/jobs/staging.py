"""Staging: a job's input turned into chunks of items in the database, each chunk's task queued in the
same transaction as its rows. Durable at every step:

- The input stays on the staging machine's disk (`DATA_DIR/jobs/<id>/input`: an archive, a URL list) or
  where it already is (a folder, a dataset, the catalogue itself) until staging is over.
- Staging runs under a PostgreSQL advisory lock held by the staging process; a crash releases it. The next
  `serve` or `worker` start on that machine (and the server every minute) resumes every unfinished job:
  items are enumerated in a fixed order and the ones already staged (the job's `total`) are skipped.
- If no process stages a job for ORPHANED_AFTER_S (its machine gone), the workers' sweeper fails it.
- Whatever happens, a job's files are removed when staging ends, fails or is cancelled, and at start-up
  every file of a job that has ended or no longer exists is swept.
"""

import logging
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import procrastinate
from sqlalchemy import Engine

from backend.core.config import Settings
from backend.core.errors import InvalidInput
from backend.core.failpoints import failpoint
from backend.jobs.sources import Found, enumerate_input, input_path, job_dir
from backend.jobs.tasks import defer_chunk
from backend.storage.engine import DATABASE_ERRORS, session_scope
from backend.storage.jobs import (
    FINAL,
    MAX_FAILURES,
    add_chunk,
    fail_job,
    fail_orphan,
    finish_if_done,
    get_job,
    lookup,
    set_params,
    staging_is_free,
    staging_lock,
    unfinished_jobs,
    unstaged_jobs,
)
from backend.storage.schema import CatalogueJob, CatalogueJobItem

Queue = procrastinate.App

log = logging.getLogger("backend.jobs")

ORPHANED_AFTER_S = 600.0


def stager_id(settings: Settings) -> str:
    """The machine and DATA_DIR holding a job's input: only there can its staging resume."""
    return f"{socket.gethostname()}:{settings.data_dir.resolve()}"


def save_input(settings: Settings, job_id: int, fill: Callable[[Path], object]) -> None:
    """Write a job's input with `fill(part_path)`, then rename it into place: a crash never leaves half an input."""
    path = input_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    fill(part)
    part.rename(path)


@dataclass
class Staged:
    total: int = 0  # items staged by this run
    chunks: int = 0
    failures: list[dict] = field(default_factory=list)


class _Ended(Exception):
    """The job was cancelled (or failed) while it was being staged."""


def stage_job(settings: Settings, engine: Engine, queue: Queue, job_id: int, wait: bool = True) -> Staged | None:
    """Stage the job, or resume its staging; None when another process is staging it, it needs none, or it
    ended. Ends with the job staged or failed (one message) and its files removed, unless the database
    went away: then the input stays for the next resume."""
    with staging_lock(engine, job_id, wait) as held:
        if not held:
            return None
        try:
            job = get_job(engine, job_id)
            if job.state in FINAL or job.params.get("staged"):
                remove_job_files(settings, job_id)
                return None
            with session_scope(engine) as session:
                set_params(session, job_id, orphaned_since=None)
            staged = _stage(settings, engine, queue, job)
        except DATABASE_ERRORS as exc:
            log.warning("job %s: staging paused, the database is unavailable (%s); it resumes later", job_id, exc)
            return None
        remove_job_files(settings, job_id)
        return staged


def _stage(settings: Settings, engine: Engine, queue: Queue, job: CatalogueJob) -> Staged | None:
    try:
        found = enumerate_input(settings, engine, job)
        staged = _stage_items(engine, queue, job, found.items, settings.job_chunk_size)
        _close(engine, job.id, found)
        return staged
    except _Ended:
        return None
    except InvalidInput as exc:
        fail_job(engine, job.id, exc.message)
    except DATABASE_ERRORS:
        raise
    except Exception as exc:  # a job never stays queued forever because staging broke
        log.exception("job %s: staging failed", job.id)
        fail_job(engine, job.id, f"staging failed: {type(exc).__name__}")
    return None


def _stage_items(engine: Engine, queue: Queue, job: CatalogueJob, items: Iterator[CatalogueJobItem], size: int) -> Staged:
    """Write the items in chunks after the `job.total` already staged; each chunk, its task and the job's
    progress commit together, so workers start on the first chunk while later ones are staged."""
    staged, chunk, first = Staged(), list[CatalogueJobItem](), job.chunks
    for n, item in enumerate(items):
        if n < job.total and job.kind != "reembed":  # staged before a crash (re-embedding lists only what is left)
            continue
        chunk.append(item)
        if len(chunk) == size:
            _flush(engine, queue, job.id, first + staged.chunks, chunk, staged)
    if chunk:
        _flush(engine, queue, job.id, first + staged.chunks, chunk, staged)
    return staged


def _flush(engine: Engine, queue: Queue, job_id: int, number: int, chunk: list[CatalogueJobItem], staged: Staged) -> None:
    with session_scope(engine) as session:
        job = lookup(session, job_id, lock=True)  # a cancel waits for this chunk, or this chunk sees it
        if job.state in FINAL:
            raise _Ended
        add_chunk(session, job_id, number, chunk)
        job.chunks, job.total = number + 1, job.total + len(chunk)
        session.flush()
        defer_chunk(queue, session.connection(), job_id, number)
    staged.chunks += 1
    staged.total += len(chunk)
    chunk.clear()
    failpoint("staged-chunk")


def _close(engine: Engine, job_id: int, found: Found) -> None:
    """Staging is over: the failures and skipped entries found on the way, and `staged`, in one commit; a
    job with nothing to do fails with one message. It may succeed at once (its chunks may all be done)."""
    listed = (found.failures + found.notes)[:MAX_FAILURES]
    bad = len(found.failures)
    with session_scope(engine) as session:
        job = lookup(session, job_id, lock=True)
        if job.state in FINAL:
            return
        job.skipped = found.skipped
        job.failures = (listed + job.failures)[:MAX_FAILURES]
        job.failed, job.total, job.done = job.failed + bad, job.total + bad, job.done + bad
        job.params = {**job.params, "staged": True}
        if job.total == 0:
            job.state, job.message, job.finished_at = "failed", "nothing to do: no images in this input", datetime.now(UTC)
    finish_if_done(engine, job_id)


def start(settings: Settings, engine: Engine, queue: Queue, job_id: int, wait: bool = True) -> threading.Thread:
    """Stage in a thread of this process (the API answers 202 at once)."""
    thread = threading.Thread(target=stage_job, args=(settings, engine, queue, job_id, wait), name="job-staging", daemon=True)
    thread.start()
    return thread


def resume_staging(settings: Settings, engine: Engine, queue: Queue) -> list[int]:
    """Resume, each in a thread, the staging of every unfinished job whose input this machine holds."""
    me = stager_id(settings)
    with session_scope(engine) as session:
        ids = [job_id for job_id, _ in unstaged_jobs(session, stager=me)]
    for job_id in ids:
        start(settings, engine, queue, job_id, wait=False)
    return ids


def remove_job_files(settings: Settings, job_id: int) -> None:
    shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)


def sweep_job_files(settings: Settings, engine: Engine) -> int:
    """At start-up: remove the files of jobs that ended, are staged or no longer exist (and uploads left by
    older versions). Returns how many folders went."""
    root = settings.data_dir / "jobs"
    if not root.is_dir():
        return 0
    with session_scope(engine) as session:
        live = {job_id for job_id, params in unfinished_jobs(session) if not params.get("staged")}
    gone = [entry for entry in root.iterdir() if not (entry.name.isdigit() and int(entry.name) in live)]
    for entry in gone:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return len(gone)


def sweep_orphans(engine: Engine) -> None:
    """Jobs nobody is staging: marked `orphaned_since`; failed once that is ORPHANED_AFTER_S old (their
    machine never came back to resume them)."""
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        unstaged = unstaged_jobs(session)
    for job_id, params in unstaged:
        with session_scope(engine) as session:
            free = staging_is_free(session, job_id)
            since = params.get("orphaned_since")
            if not free:
                continue
            if since is None:
                set_params(session, job_id, orphaned_since=now.isoformat())
            elif (now - datetime.fromisoformat(since)).total_seconds() > ORPHANED_AFTER_S:
                message = f"staging stopped with its machine and did not resume within {ORPHANED_AFTER_S / 60:g} minutes"
                fail_orphan(session, job_id, now, message)
