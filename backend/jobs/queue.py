"""The job queue: procrastinate on our own database (its tables come from migration 0004).

Two apps with the same tasks: workers run them on procrastinate's async psycopg 3 connector; the API and
the CLI defer them through procrastinate's SQLAlchemy connector on our engine, so a chunk's task is
inserted in the very transaction that stages the chunk (`configure_task(connection=...)`): both commit, or
neither. Stalled workers (killed, machine gone) are found by their heartbeats and their chunks retried."""

import asyncio
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import procrastinate
from procrastinate.contrib.sqlalchemy import SQLAlchemyPsycopg2Connector
from sqlalchemy import Engine

from backend.core.config import Settings
from backend.jobs.chunks import ChunkRunner
from backend.storage.engine import libpq_url

log = logging.getLogger("backend.jobs")

QUEUE = "catalogue"
CHUNK_TASK = "imsrc.ingest_chunk"
STALLED_AFTER_S = 10.0
HEARTBEAT_S = 2.0


def _ingest_chunk_task(context: procrastinate.JobContext, job_id: int, chunk: int) -> None:
    runner: ChunkRunner = context.additional_context["runner"]
    runner.run(job_id, chunk)


async def _retry_stalled_task(context: procrastinate.JobContext, timestamp: int) -> None:
    """Chunks whose worker stopped sending heartbeats go back to the queue; staging that stopped with its
    machine is noticed (and, if it never resumes, ends the job: see staging.sweep_orphans)."""
    from backend.jobs.staging import sweep_orphans

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


def defer_chunk(queue: procrastinate.App, connection: Any, job_id: int, chunk: int) -> None:
    """Queue a chunk's task inside the caller's transaction (`connection`: the session's connection)."""
    queue.configure_task(CHUNK_TASK, connection=connection).defer(job_id=job_id, chunk=chunk)


def _worker_options(runner: ChunkRunner, concurrency: int, name: str, install_signal_handlers: bool) -> dict[str, Any]:
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


def run_worker(settings: Settings, engine: Engine, concurrency: int) -> None:
    """Run chunks until stopped (SIGINT / SIGTERM): the `worker` command."""
    app = worker_app(engine)
    with app.open():
        runner = ChunkRunner(settings, engine)
        app.run_worker(**_worker_options(runner, concurrency, f"imsrc-{threading.get_native_id()}", install_signal_handlers=True))


class WorkerThread:
    """`serve`'s in-process worker (SERVE_WORKER): procrastinate's worker on an event loop of its own thread,
    so that `./setup.sh all` needs no second process; stopped with the server."""

    def __init__(self, settings: Settings, engine: Engine, after_commit: Callable[[], None] | None = None) -> None:
        self.runner = ChunkRunner(settings, engine, after_commit)
        self.concurrency = settings.worker_concurrency
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="catalogue-worker", daemon=True)
        self.task: Any = None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = worker_app(self.runner.engine)

        async def main() -> None:
            async with app.open_async():
                await app.run_worker_async(**_worker_options(self.runner, self.concurrency, "imsrc-serve", False))

        self.task = self.loop.create_task(main())
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass  # stopped with the server
        except Exception as exc:  # the database went away for good, say
            log.warning("in-process worker stopped: %s", exc)
        finally:  # let the pool's own tasks finish before the loop goes
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.task is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout_s)
