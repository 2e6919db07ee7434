"""Job state in the database: one row a job (`catalogue_jobs`), its chunks' done marks, its counts, its
staged items, and the advisory lock held while a job is staged.

States: queued, running, then one of FINAL. A job ends `succeeded` when it is staged and every chunk is
done, `failed` with one message, or `cancelled` by a user."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Select, cast, delete, exists, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from backend.core.errors import NotFound
from backend.storage.catalogue import image_data
from backend.storage.engine import DATABASE_ERRORS, session_scope
from backend.storage.schema import CatalogueJob, CatalogueJobChunk, CatalogueJobItem

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


# --- staging --------------------------------------------------------------------------------------

LOCK_CLASS = 0x4A4F4253  # "JOBS": advisory locks (LOCK_CLASS, job id) mark a job being staged


@contextmanager
def staging_lock(engine: Engine, job_id: int, wait: bool) -> Iterator[bool]:
    """Hold the job's staging lock on a connection of its own for as long as staging runs; yields False
    when another process holds it (and `wait` is off)."""
    with engine.connect() as conn:
        call = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
        got = conn.execute(text(f"SELECT {call}(:c, :j)"), {"c": LOCK_CLASS, "j": job_id}).scalar() is not False
        conn.commit()  # a session-level lock outlives the transaction; no transaction stays open
        try:
            yield got
        finally:
            if got:
                with suppress(*DATABASE_ERRORS):  # a lost connection has released it already
                    conn.execute(text("SELECT pg_advisory_unlock(:c, :j)"), {"c": LOCK_CLASS, "j": job_id})
                    conn.commit()


def staging_is_free(session: Session, job_id: int) -> bool:
    """Whether no process is staging the job; if so, nobody starts until this transaction ends."""
    return bool(session.execute(text("SELECT pg_try_advisory_xact_lock(:c, :j)"), {"c": LOCK_CLASS, "j": job_id}).scalar())


def add_chunk(session: Session, job_id: int, number: int, items: list[CatalogueJobItem]) -> None:
    """A chunk's done mark (open) and its items, numbered in order."""
    session.add(CatalogueJobChunk(job_id=job_id, chunk=number))
    session.flush()
    for n, item in enumerate(items):
        item.job_id, item.chunk, item.item = job_id, number, n
    session.add_all(items)


def _unstaged() -> Select[tuple[int, dict]]:
    staged = CatalogueJob.params["staged"].as_boolean()
    return select(CatalogueJob.id, CatalogueJob.params).where(CatalogueJob.state.not_in(FINAL), staged.is_(False))


def unstaged_jobs(session: Session, stager: str | None = None) -> list[tuple[int, dict]]:
    """(id, params) of unfinished jobs still being staged; with `stager`, only those that machine (or any) may resume."""
    query = _unstaged()
    if stager is not None:
        who = CatalogueJob.params["stager"].as_string()
        query = query.where(who.is_(None) | (who == stager))
    return [(job_id, params) for job_id, params in session.execute(query)]


def unfinished_jobs(session: Session) -> list[tuple[int, dict]]:
    """(id, params) of every job that has not ended."""
    return [
        (job_id, params)
        for job_id, params in session.execute(
            select(CatalogueJob.id, CatalogueJob.params).where(CatalogueJob.state.not_in(FINAL))
        )
    ]


def a_job_is_running(session: Session) -> bool:
    """Whether any catalogue job is running now (on any worker, any machine)."""
    return bool(session.scalar(select(exists().where(CatalogueJob.state == "running"))))


def staged_image_ids(session: Session, job_id: int) -> set[int]:
    """Stored images a re-embedding job has staged already."""
    return set(session.scalars(select(CatalogueJobItem.image_id).where(CatalogueJobItem.job_id == job_id)))


def fail_orphan(session: Session, job_id: int, when: datetime, message: str) -> None:
    """Fail a job whose staging never resumed (unless it ended or finished staging meanwhile)."""
    session.execute(delete(CatalogueJobItem).where(CatalogueJobItem.job_id == job_id))
    session.execute(
        update(CatalogueJob)
        .where(CatalogueJob.id == job_id, CatalogueJob.state.not_in(FINAL))
        .where(CatalogueJob.params["staged"].as_boolean().is_(False))
        .values(state="failed", finished_at=when, message=message, params=CatalogueJob.params.op("||")(jsonb({"staged": True})))
    )


# --- chunks ---------------------------------------------------------------------------------------


def load_chunk(engine: Engine, job_id: int, chunk: int) -> tuple[list[CatalogueJobItem], str, str | None] | None:
    """The chunk's items (a re-embedding item with its stored image's bytes), the job's model id and the model
    name a re-embedding job gives; None
    when the chunk is done or the job has ended. The job is `running` from its first chunk on."""
    with session_scope(engine) as session:
        job = session.execute(
            select(CatalogueJob.state, CatalogueJob.params, CatalogueJob.model).where(CatalogueJob.id == job_id)
        ).first()
        done = session.scalar(
            select(CatalogueJobChunk.finished_at).where(CatalogueJobChunk.job_id == job_id, CatalogueJobChunk.chunk == chunk)
        )
        if job is None or job.state in FINAL or done is not None:
            return None
        session.execute(
            update(CatalogueJob)
            .where(CatalogueJob.id == job_id, CatalogueJob.state == "queued")
            .values(state="running", started_at=datetime.now(UTC))
        )
        items = list(
            session.scalars(
                select(CatalogueJobItem)
                .where(CatalogueJobItem.job_id == job_id, CatalogueJobItem.chunk == chunk)
                .order_by(CatalogueJobItem.item)
            )
        )
        stored = image_data(session, [i.image_id for i in items if i.image_id is not None])
        for item in items:
            session.expunge(item)
            if item.image_id is not None:  # re-embedding: the stored image's own bytes
                item.data = stored.get(item.image_id, b"")
        return items, job.model, job.params.get("model_name")


def lock_chunk_mark(session: Session, job_id: int, chunk: int) -> CatalogueJobChunk | None:
    """The chunk's done mark, locked: a second delivery of the same chunk waits, then sees it finished."""
    query = select(CatalogueJobChunk).where(CatalogueJobChunk.job_id == job_id, CatalogueJobChunk.chunk == chunk)
    return session.scalars(query.with_for_update()).first()


def delete_chunk_items(session: Session, job_id: int, chunk: int) -> None:
    session.execute(delete(CatalogueJobItem).where(CatalogueJobItem.job_id == job_id, CatalogueJobItem.chunk == chunk))
