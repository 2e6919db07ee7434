"""Catalogue jobs as the API and the CLI ask for them: create (archive, URL list, folder, re-embedding),
watch, cancel; the queue, staging resumption and the in-process worker around `backend.jobs`."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import procrastinate
from sqlalchemy import Engine

from backend import jobs
from backend.core.config import Settings
from backend.schemas import JobOut


def job_out(job: Any) -> JobOut:
    """A job row as the API and `jobs show` report it."""
    return JobOut(
        id=job.id,
        kind=job.kind,
        state=job.state,
        message=job.message,
        total=job.total,
        done=job.done,
        added=job.added,
        duplicates=job.duplicates,
        failed=job.failed,
        skipped=job.skipped,
        progress=(job.done / job.total) if job.total else (1.0 if job.state in jobs.FINAL else 0.0),
        images_per_s=jobs.images_per_second(job),
        failures=job.failures,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


class Jobs:
    """The jobs of one catalogue; `open()` connects the queue that chunks are deferred to (the server's)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self._engine = engine
        self._queue: procrastinate.App | None = None

    # --- the server's start and stop ------------------------------------------------------------

    def open(self) -> None:
        self._queue = jobs.open_queue(self._engine)  # defers chunks (handler threads)

    def open_for_work(self) -> None:
        """The start of a server and of a `worker` process alike: the queue opened, and the files of jobs
        that ended while this process was down swept."""
        self.open()
        self.sweep_files()

    def close(self) -> None:
        if self._queue is not None:
            self._queue.close()

    @property
    def queue(self) -> procrastinate.App:
        if self._queue is None:
            raise RuntimeError("the job queue is not open")
        return self._queue

    def sweep_files(self) -> int:
        """Files of jobs that ended while this process was down."""
        return jobs.sweep_job_files(self.settings, self._engine)

    def resume_staging(self) -> list[int]:
        """Staging that a crash (or a database outage) interrupted goes on."""
        return jobs.resume_staging(self.settings, self._engine, self.queue)

    def run_worker(self, concurrency: int) -> None:
        """Run chunks in this process until SIGINT/SIGTERM (the `worker` command)."""
        jobs.run_worker(self.settings, self._engine, concurrency)

    def worker(self, after_write: Callable[[], None]) -> jobs.WorkerThread:
        """An in-process worker (not started) that calls `after_write` after each chunk it commits: the
        server's index and stage 2 (its cluster's shards too) then find the chunk's images at once."""
        return jobs.WorkerThread(self.settings, self._engine, after_write)

    # --- one job ---------------------------------------------------------------------------------

    def create(self, kind: str, model: str, params: dict, created_by: str | None) -> int:
        return jobs.create_job(self.settings, self._engine, kind, model, params, created_by)

    def start_with_input(self, job_id: int, fill: Callable[[Path], object]) -> JobOut:
        """Save the job's input file (a crash from here on is resumed by the next start), then stage it."""
        jobs.save_input(self.settings, job_id, fill)
        return self.start(job_id)

    def start(self, job_id: int) -> JobOut:
        jobs.start(self.settings, self._engine, self.queue, job_id)
        return self.get(job_id)

    def stage_now(self, job_id: int) -> jobs.Staged:
        """Stage the job in this thread and wait (the CLI's `populate --background`): its images and chunks."""
        return jobs.stage_job(self.settings, self._engine, self.queue, job_id) or jobs.Staged()

    def stage_urls(self, job_id: int, text: str) -> JobOut:
        jobs.stage_urls(self.settings, self._engine, self.queue, job_id, text)
        return self.get(job_id)

    def get(self, job_id: int) -> JobOut:
        return job_out(jobs.get_job(self._engine, job_id))

    def newest(self) -> list[JobOut]:
        """The newest 50 jobs, newest first."""
        return [job_out(job) for job in jobs.list_jobs(self._engine)]

    def cancel(self, job_id: int) -> JobOut:
        """No chunk commits after this; chunks that committed before stay in the catalogue. The job's files go."""
        job = jobs.cancel_job(self._engine, job_id)
        jobs.remove_job_files(self.settings, job.id)
        return job_out(job)
