"""Job state in the database: one row a job (`catalogue_jobs`), its chunks' done marks, its counts.

States: queued, running, then one of FINAL. A job ends `succeeded` when it is staged and every chunk is
done, `failed` with one message, or `cancelled` by a user."""

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, cast, delete, func, literal, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from backend.core.errors import NotFound
from backend.db.models import CatalogueJob, CatalogueJobChunk, CatalogueJobItem
from backend.db.session import session_scope

FINAL = ("succeeded", "failed", "cancelled")  # the other states: queued, running
MAX_FAILURES = 100


def create_job(engine: Engine, kind: str, model: str, params: dict, created_by: str | None, stager: str | None) -> int:
    """A queued job; `stager` names the machine and DATA_DIR that hold its input (None: any, e.g. the
    database itself), where its staging resumes after a crash."""
    with session_scope(engine) as session:
        job = CatalogueJob(
            kind=kind, model=model, params={**params, "staged": False, "stager": stager}, created_by=created_by, state="queued"
        )
        session.add(job)
        session.flush()
        return job.id


def get_job(engine: Engine, job_id: int) -> CatalogueJob:
    with session_scope(engine) as session:
        job = lookup(session, job_id)
        session.expunge(job)
        return job


def list_jobs(engine: Engine, limit: int = 50) -> list[CatalogueJob]:
    with session_scope(engine) as session:
        jobs = list(session.scalars(select(CatalogueJob).order_by(CatalogueJob.id.desc()).limit(limit)))
        for job in jobs:
            session.expunge(job)
        return jobs


def lookup(session: Session, job_id: int, lock: bool = False) -> CatalogueJob:
    query = select(CatalogueJob).where(CatalogueJob.id == job_id)
    job = session.scalars(query.with_for_update() if lock else query).first()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def state_of(session: Session, job_id: int) -> str | None:
    return session.scalar(select(CatalogueJob.state).where(CatalogueJob.id == job_id))


def cancel_job(engine: Engine, job_id: int) -> CatalogueJob:
    """No chunk commits after this (chunks lock the job row to commit); chunks that committed before stay."""
    with session_scope(engine) as session:
        job = lookup(session, job_id, lock=True)
        if job.state not in FINAL:
            job.state, job.message, job.finished_at = "cancelled", "cancelled by a user", datetime.now(UTC)
            session.execute(delete(CatalogueJobItem).where(CatalogueJobItem.job_id == job_id))
        session.flush()
        session.expunge(job)
        return job


def fail_job(engine: Engine, job_id: int, message: str) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(CatalogueJob)
            .where(CatalogueJob.id == job_id, CatalogueJob.state.not_in(FINAL))
            .values(state="failed", message=message, finished_at=func.now())
        )
        session.execute(delete(CatalogueJobItem).where(CatalogueJobItem.job_id == job_id))


def set_params(session: Session, job_id: int, **values: Any) -> None:
    """Merge `values` into the job's params (JSONB `||`)."""
    session.execute(
        update(CatalogueJob).where(CatalogueJob.id == job_id).values(params=CatalogueJob.params.op("||")(jsonb(values)))
    )


def jsonb(value: object) -> Any:
    return cast(literal(value, JSONB), JSONB)


def finish_if_done(engine: Engine, job_id: int) -> None:
    """A staged job whose every chunk is done has succeeded."""
    with session_scope(engine) as session:
        job = lookup(session, job_id, lock=True)
        if job.state in FINAL:
            return
        open_chunks = session.scalar(
            select(func.count())
            .select_from(CatalogueJobChunk)
            .where(CatalogueJobChunk.job_id == job_id, CatalogueJobChunk.finished_at.is_(None))
        )
        if not open_chunks and job.chunks and job.params.get("staged"):
            job.state, job.finished_at = "succeeded", datetime.now(UTC)


def images_per_second(job: CatalogueJob) -> float | None:
    if job.started_at is None or not job.done:
        return None
    end = job.finished_at or datetime.now(UTC)
    seconds = (end - job.started_at).total_seconds()
    return job.done / seconds if seconds > 0 else None


def wait_for(
    engine: Engine, job_id: int, timeout_s: float, progress: Callable[[CatalogueJob], None] | None = None
) -> CatalogueJob:
    """Poll until the job ends (or the timeout passes): the CLI's `populate` and the tests."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = get_job(engine, job_id)
        if progress:
            progress(job)
        if job.state in FINAL or time.monotonic() > deadline:
            return job
        time.sleep(0.5)
