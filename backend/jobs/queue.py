"""The job queue: procrastinate on our own database (its tables come from migration 0004).

Two apps with the same tasks: workers run them on procrastinate's async psycopg 3 connector; the API and
the CLI defer them through procrastinate's SQLAlchemy connector on our engine, so a chunk's task is
inserted in the very transaction that stages the chunk (`configure_task(connection=...)`): both commit, or
neither. Stalled workers (killed, machine gone) are found by their heartbeats and their chunks retried.
The workers themselves (the `worker` command, serve's thread) are `backend.jobs.worker`'s."""

import asyncio
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import procrastinate
from procrastinate.contrib.sqlalchemy import SQLAlchemyPsycopg2Connector
from sqlalchemy import Engine

from backend.jobs.staging import sweep_orphans
from backend.jobs.tasks import CHUNK_TASK, QUEUE
from backend.storage.engine import libpq_url

if TYPE_CHECKING:
    from backend.jobs.chunks import ChunkRunner
from backend.jobs.chunks import ChunkRunner

log = logging.getLogger("backend.jobs")

STALLED_AFTER_S = 10.0
HEARTBEAT_S = 2.0


def _ingest_chunk_task(context: procrastinate.JobContext, job_id: int, chunk: int) -> None:
    runner: ChunkRunner = context.additional_context["runner"]
    runner.run(job_id, chunk)


async def _retry_stalled_task(context: procrastinate.JobContext, timestamp: int) -> None:
    """Chunks whose worker stopped sending heartbeats go back to the queue; staging that stopped with its
    machine is noticed (and, if it never resumes, ends the job: see staging.sweep_orphans)."""
    manager = context.app.job_manager
    for job in await manager.get_stalled_jobs(seconds_since_heartbeat=STALLED_AFTER_S):
        if job.id is None:
            continue
        log.warning("chunk task %s was running on a worker that stopped: retrying it", job.id)
        await manager.retry_job_by_id_async(job.id, retry_at=datetime.now(UTC))
    runner: ChunkRunner | None = context.additional_context.get("runner")
    if runner is not None:
        await asyncio.to_thread(sweep_orphans, runner.engine)


def _with_tasks(app: procrastinate.App) -> procrastinate.App:
    app.task(name=CHUNK_TASK, queue=QUEUE, pass_context=True, retry=procrastinate.RetryStrategy(max_attempts=5, wait=2))(
        _ingest_chunk_task
    )
    app.periodic(cron="* * * * * */5", periodic_id="retry_stalled")(
        app.task(name="imsrc.retry_stalled", queue=QUEUE, queueing_lock="retry_stalled", pass_context=True)(_retry_stalled_task)
    )
    return app


def worker_app(engine: Engine) -> procrastinate.App:
    return _with_tasks(
        procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=libpq_url(engine), min_size=1, max_size=4))
    )


def open_queue(engine: Engine) -> procrastinate.App:
    """An app for deferring from synchronous code (the API's threads, the CLI) on our engine; close() it."""
    app = _with_tasks(procrastinate.App(connector=SQLAlchemyPsycopg2Connector()))
    app.open(engine)
    return app


def worker_options(runner: "ChunkRunner", concurrency: int, name: str, install_signal_handlers: bool) -> dict[str, Any]:
    """How every worker runs, the `worker` command's and `serve`'s alike."""
    return {
        "queues": [QUEUE],
        "concurrency": concurrency,
        "name": name,
        "update_heartbeat_interval": HEARTBEAT_S,
        "stalled_worker_timeout": STALLED_AFTER_S,
        "install_signal_handlers": install_signal_handlers,
        "fetch_job_polling_interval": 1.0,
        "additional_context": {"runner": runner},
    }
