"""Catalogue jobs: durable, resumable ingestion shared by any number of workers (procrastinate, on PostgreSQL).

A job is one request: an uploaded archive, a URL list, a folder on the server's disk, a dataset, a
re-embedding. Its items are staged in the database (`catalogue_job_items`), so a worker on any machine that
reaches the database can run any chunk (JOB_CHUNK_SIZE items, one task, one transaction). One bad item
fails that item only; an unusable input fails the job with one message. Cancelling stops new chunks.

- `backend.storage.jobs`: the job's row, counts and final states;
- `sources`: what each kind of job stages, in a fixed order;
- `staging`: chunks and their tasks committed together; resumed after a crash; files swept;
- `chunks`: running one chunk in a worker, through the batch writer (`backend.ingest`);
- `tasks`: the queue's names and deferring a chunk in the staging transaction;
- `queue`: procrastinate's apps and the tasks they run;
- `worker`: the `worker` command and `serve`'s in-process worker thread.
"""

import shutil
from pathlib import Path

import procrastinate
from sqlalchemy import Engine

from backend.core.config import Settings
from backend.jobs.chunks import ChunkRunner, ingest_chunk
from backend.jobs.queue import open_queue
from backend.jobs.sources import input_path, job_dir
from backend.jobs.staging import (
    Staged,
    remove_job_files,
    resume_staging,
    save_input,
    stage_job,
    stager_id,
    start,
    sweep_job_files,
    sweep_orphans,
)
from backend.jobs.tasks import QUEUE
from backend.jobs.worker import WorkerThread, run_worker
from backend.storage.jobs import (
    FINAL,
    cancel_job,
    fail_job,
    get_job,
    images_per_second,
    list_jobs,
    wait_for,
)
from backend.storage.jobs import create_job as _create_row

__all__ = [
    "FINAL",
    "QUEUE",
    "ChunkRunner",
    "Staged",
    "WorkerThread",
    "cancel_job",
    "create_job",
    "fail_job",
    "get_job",
    "images_per_second",
    "ingest_chunk",
    "input_path",
    "job_dir",
    "list_jobs",
    "open_queue",
    "remove_job_files",
    "resume_staging",
    "run_worker",
    "save_input",
    "stage_archive",
    "stage_job",
    "stage_urls",
    "start",
    "sweep_job_files",
    "sweep_orphans",
    "wait_for",
]


def create_job(settings: Settings, engine: Engine, kind: str, model: str, params: dict, created_by: str | None) -> int:
    """A queued job whose input (if any) this machine holds; re-embedding reads the database, so any
    machine may stage it."""
    return _create_row(engine, kind, model, params, created_by, None if kind == "reembed" else stager_id(settings))


def stage_archive(settings: Settings, engine: Engine, queue: procrastinate.App, job_id: int, archive: Path) -> Staged | None:
    """Move an archive in as the job's input, then stage it here and now (the CLI and the tests)."""
    save_input(settings, job_id, lambda part: shutil.move(archive, part))
    return stage_job(settings, engine, queue, job_id)


def stage_urls(settings: Settings, engine: Engine, queue: procrastinate.App, job_id: int, text: str) -> Staged | None:
    save_input(settings, job_id, lambda part: part.write_text(text, encoding="utf-8"))
    return stage_job(settings, engine, queue, job_id)
