"""Catalogue jobs: durable, resumable ingestion shared by any number of workers (procrastinate, on PostgreSQL).

A job is one request: an uploaded archive, a URL list, a folder on the server's disk, a dataset. Its items
are staged in the database (`catalogue_job_items`), so a worker on any machine that reaches the database
can run any chunk, in chunks of JOB_CHUNK_SIZE. Each chunk is one procrastinate task and one database
transaction: its new images and embeddings, the job's counts and failures, the chunk's done mark and the
deletion of its staged items commit together. A chunk retried after a crash (procrastinate's stalled-worker
recovery) therefore adds and counts nothing twice; images are deduplicated by sha256 as everywhere else.
One bad item fails that item only; an unusable input (not an archive, no images, no URL) fails the job
with one message and stages nothing. Cancelling stops new chunks; finished ones stay.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import procrastinate
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend import catalogue
from backend.core.config import Settings
from backend.core.errors import InvalidInput, NotFound
from backend.datasets import Sample
from backend.db.models import CatalogueJob, CatalogueJobChunk, CatalogueJobItem, Image
from backend.db.session import libpq_url, session_scope
from backend.imaging import DecodedImage, decode_image
from backend.urls import FetchLimits, fetch

log = logging.getLogger(__name__)

QUEUE = "catalogue"
FINAL = ("succeeded", "failed", "cancelled")  # the other states: queued, running
MAX_FAILURES = 100


# --- the queue --------------------------------------------------------------------------------------


def make_app(engine: Engine) -> procrastinate.App:
    """The procrastinate app on our database, with our tasks: deferring from the API or the CLI, running in
    a worker. Its tables were created by migration 0004."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=libpq_url(engine), min_size=1, max_size=4))
    app.task(name="imsrc.ingest_chunk", queue=QUEUE, retry=procrastinate.RetryStrategy(max_attempts=5, wait=2))(
        _ingest_chunk_task
    )
    app.periodic(cron="* * * * * */5", periodic_id="retry_stalled")(
        app.task(name="imsrc.retry_stalled", queue=QUEUE, queueing_lock="retry_stalled", pass_context=True)(_retry_stalled_task)
    )
    return app


def open_queue(engine: Engine) -> procrastinate.App:
    """The app opened for deferring from synchronous code (the API's handler threads, the CLI); close() it."""
    return make_app(engine).open()


async def _retry_stalled_task(context: procrastinate.JobContext, timestamp: int) -> None:
    """Jobs whose worker stopped sending heartbeats (killed, machine gone) go back to the queue."""
    manager = context.app.job_manager
    for job in await manager.get_stalled_jobs(seconds_since_heartbeat=STALLED_AFTER_S):
        if job.id is None:
            continue
        log.warning("chunk task %s was running on a worker that stopped: retrying it", job.id)
        await manager.retry_job_by_id_async(job.id, retry_at=datetime.now(UTC))


STALLED_AFTER_S = 10.0
HEARTBEAT_S = 2.0


def _worker_options(concurrency: int, name: str, install_signal_handlers: bool) -> dict[str, Any]:
    """How every worker runs, the `worker` command's and `serve`'s alike."""
    return {
        "queues": [QUEUE],
        "concurrency": concurrency,
        "name": name,
        "update_heartbeat_interval": HEARTBEAT_S,
        "stalled_worker_timeout": STALLED_AFTER_S,
        "install_signal_handlers": install_signal_handlers,
        "fetch_job_polling_interval": 1.0,
    }


def run_worker(settings: Settings, engine: Engine, concurrency: int) -> None:
    """Run chunks until stopped (SIGINT / SIGTERM): the `worker` command."""
    _WORKER.configure(settings, engine)
    app = make_app(engine)
    with app.open():
        app.run_worker(**_worker_options(concurrency, f"imsrc-{threading.get_native_id()}", install_signal_handlers=True))


# --- creating jobs ------------------------------------------------------------------------------------


@dataclass
class Staged:
    total: int = 0
    chunks: int = 0
    skipped: int = 0
    failures: list[dict] = field(default_factory=list)


def create_job(engine: Engine, kind: str, model: str, params: dict, created_by: str | None) -> int:
    with session_scope(engine) as session:
        job = CatalogueJob(kind=kind, model=model, params={**params, "staged": False}, created_by=created_by, state="queued")
        session.add(job)
        session.flush()
        return job.id


def stage_items(
    engine: Engine,
    app: procrastinate.App,
    job_id: int,
    items: Iterable[CatalogueJobItem],
    chunk_size: int,
    skipped: int = 0,
    failures: Iterable[dict] = (),
    notes: Iterable[dict] = (),
) -> Staged:
    """Write the items in chunks, deferring each chunk's task as soon as it is committed (workers start on
    the first chunk while later ones are still staged). `failures` are items that failed already (counted);
    `notes` say why entries were skipped (listed with the failures, counted as skipped). A job with nothing
    to do fails with one message."""
    failed = list(failures)
    staged = Staged(skipped=skipped, failures=(failed + list(notes))[:MAX_FAILURES])
    chunk: list[CatalogueJobItem] = []

    def flush() -> None:
        with session_scope(engine) as session:
            if _state(session, job_id) == "cancelled":
                raise _Cancelled
            session.add(CatalogueJobChunk(job_id=job_id, chunk=staged.chunks))
            session.flush()
            for n, item in enumerate(chunk):
                item.job_id, item.chunk, item.item = job_id, staged.chunks, n
            session.add_all(chunk)
            session.execute(
                update(CatalogueJob)
                .where(CatalogueJob.id == job_id)
                .values(chunks=staged.chunks + 1, total=staged.total + len(chunk))
            )
        app.configure_task("imsrc.ingest_chunk").defer(job_id=job_id, chunk=staged.chunks)
        staged.chunks += 1
        staged.total += len(chunk)
        chunk.clear()

    try:
        for item in items:
            chunk.append(item)
            if len(chunk) == chunk_size:
                flush()
        if chunk:
            flush()
    except _Cancelled:
        return staged
    bad = len(failed)
    with session_scope(engine) as session:
        values: dict[str, Any] = {
            "skipped": staged.skipped,
            "failures": CatalogueJob.failures.op("||")(_jsonb(staged.failures)),
            "failed": CatalogueJob.failed + bad,
            "total": CatalogueJob.total + bad,
            "done": CatalogueJob.done + bad,
        }
        if not staged.total:
            values |= {"state": "failed", "message": "nothing to do: no images in this input", "finished_at": func.now()}
        session.execute(update(CatalogueJob).where(CatalogueJob.id == job_id).values(**values))
    mark_staged(engine, job_id)
    return staged


def _jsonb(value: object) -> Any:
    from sqlalchemy import cast, literal
    from sqlalchemy.dialects.postgresql import JSONB

    return cast(literal(value, JSONB), JSONB)


class _Cancelled(Exception):
    pass


def fail_job(engine: Engine, job_id: int, message: str) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(CatalogueJob)
            .where(CatalogueJob.id == job_id, CatalogueJob.state.not_in(FINAL))
            .values(state="failed", message=message, finished_at=func.now())
        )


def sample_items(samples: Iterable[Sample]) -> Iterator[CatalogueJobItem]:
    """Staged items of files or dataset samples: their bytes are read now, on the machine that has them."""
    for sample in samples:
        yield CatalogueJobItem(source=sample.source, category=sample.label, data=sample.load())


def cancel_job(engine: Engine, job_id: int) -> CatalogueJob:
    with session_scope(engine) as session:
        job = _get(session, job_id, lock=True)
        if job.state not in FINAL:
            job.state, job.message, job.finished_at = "cancelled", "cancelled by a user", datetime.now(UTC)
            session.execute(delete(CatalogueJobItem).where(CatalogueJobItem.job_id == job_id))
        session.flush()
        session.expunge(job)
        return job


def get_job(engine: Engine, job_id: int) -> CatalogueJob:
    with session_scope(engine) as session:
        job = _get(session, job_id)
        session.expunge(job)
        return job


def list_jobs(engine: Engine, limit: int = 50) -> list[CatalogueJob]:
    with session_scope(engine) as session:
        jobs = list(session.scalars(select(CatalogueJob).order_by(CatalogueJob.id.desc()).limit(limit)))
        for job in jobs:
            session.expunge(job)
        return jobs


def _get(session: Session, job_id: int, lock: bool = False) -> CatalogueJob:
    query = select(CatalogueJob).where(CatalogueJob.id == job_id)
    job = session.scalars(query.with_for_update() if lock else query).first()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def _state(session: Session, job_id: int) -> str | None:
    return session.scalar(select(CatalogueJob.state).where(CatalogueJob.id == job_id))


def images_per_second(job: CatalogueJob) -> float | None:
    if job.started_at is None or not job.done:
        return None
    end = job.finished_at or datetime.now(UTC)
    seconds = (end - job.started_at).total_seconds()
    return job.done / seconds if seconds > 0 else None


# --- running a chunk (in a worker) -------------------------------------------------------------------


class _WorkerState:
    """What a worker process holds between chunks: settings, engine and the embedding model (lazy)."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.engine: Engine | None = None
        self._embedders: dict[str | None, Any] = {}
        self._lock = threading.Lock()
        self.after_commit: Callable[[], None] | None = None

    def configure(self, settings: Settings, engine: Engine, after_commit: Callable[[], None] | None = None) -> None:
        self.settings, self.engine, self.after_commit = settings, engine, after_commit

    def embedder(self, model_name: str | None = None) -> Any:
        """The settings' model (None), or the one a re-embedding job names; each loaded once."""
        with self._lock:
            if model_name not in self._embedders:
                from backend.embedding.registry import create_embedder

                assert self.settings is not None
                embedder = create_embedder(self.settings, model_name)
                embedder.load()
                self._embedders[model_name] = embedder
            return self._embedders[model_name]


_WORKER = _WorkerState()


def _ingest_chunk_task(job_id: int, chunk: int) -> None:
    settings, engine = _WORKER.settings, _WORKER.engine
    assert settings is not None and engine is not None, "run_worker configures the worker first"
    result = ingest_chunk(settings, engine, _WORKER.embedder, job_id, chunk)
    if result.added and _WORKER.after_commit is not None:
        _WORKER.after_commit()  # serve's own worker: its images are searchable before the next chunk starts


@dataclass
class ChunkResult:
    added: int = 0
    duplicates: int = 0
    failures: list[dict] = field(default_factory=list)
    skipped: bool = False  # already done, or the job was cancelled


def ingest_chunk(
    settings: Settings, engine: Engine, embedders: Callable[[str | None], Any], job_id: int, chunk: int
) -> ChunkResult:
    """Decode (or download), embed and store one chunk, then account for it, all in one transaction."""
    with session_scope(engine) as session:
        job = session.execute(select(CatalogueJob.state, CatalogueJob.params).where(CatalogueJob.id == job_id)).first()
        state, job_params = (job.state, job.params) if job is not None else (None, {})
        done = session.scalar(
            select(CatalogueJobChunk.finished_at).where(CatalogueJobChunk.job_id == job_id, CatalogueJobChunk.chunk == chunk)
        )
        if state is None or state in FINAL or done is not None:
            return ChunkResult(skipped=True)
        session.execute(
            update(CatalogueJob)
            .where(CatalogueJob.id == job_id, CatalogueJob.state == "queued")
            .values(state="running", started_at=func.now())
        )
        items = list(
            session.scalars(
                select(CatalogueJobItem)
                .where(CatalogueJobItem.job_id == job_id, CatalogueJobItem.chunk == chunk)
                .order_by(CatalogueJobItem.item)
            )
        )
        for item in items:
            session.expunge(item)
        wanted = [i.image_id for i in items if i.image_id is not None]
        stored: dict[int, bytes] = {}
        if wanted:
            for image_id, data in session.execute(select(Image.id, Image.data).where(Image.id.in_(wanted))):
                stored[image_id] = data
    for item in items:  # re-embedding: the stored image's own bytes
        if item.image_id is not None:
            item.data = stored.get(item.image_id, b"")
    embedder = embedders(job_params.get("model_name"))
    result = ChunkResult()
    decoded = _decode_items(items, settings, result)
    for attempt in range(2):
        with session_scope(engine) as session:
            try:
                _commit_chunk(session, embedder, job_id, chunk, decoded, result)
                break
            except IntegrityError:
                if attempt:  # the same image stored by another writer twice in a row: give up (the task retries)
                    raise
                session.rollback()
                result.added = 0
    _finish_if_done(engine, job_id)
    if not result.skipped:
        log.info(
            "job %s chunk %s: %d added, %d duplicates, %d failed",
            job_id,
            chunk,
            result.added,
            result.duplicates,
            len(result.failures),
        )
    return result


def _decode_items(
    items: list[CatalogueJobItem], settings: Settings, result: ChunkResult
) -> list[tuple[CatalogueJobItem, DecodedImage]]:
    limits = FetchLimits(settings.url_timeout_seconds, settings.max_upload_size, allow_private=settings.allow_private_urls)

    def load(item: CatalogueJobItem) -> tuple[CatalogueJobItem, DecodedImage | str]:
        try:
            data = item.data if item.data is not None else fetch(item.url or "", limits)
            return item, decode_image(data, settings.max_image_pixels, name=item.source)
        except InvalidInput as exc:  # not an image, a failed download, a refused URL: this item only
            return item, exc.message

    with ThreadPoolExecutor(max_workers=max(1, settings.url_concurrency)) as pool:
        loaded = list(pool.map(load, items))
    out, seen = [], set()
    for item, image in loaded:
        if isinstance(image, str):
            result.failures.append({"source": item.source[:500], "reason": image[:500]})
        elif image.sha256 in seen:
            result.duplicates += 1
        else:
            seen.add(image.sha256)
            out.append((item, image))
    return out


def _commit_chunk(
    session: Session,
    embedder: Any,
    job_id: int,
    chunk: int,
    decoded: list[tuple[CatalogueJobItem, DecodedImage]],
    result: ChunkResult,
) -> None:
    """Store the chunk's vectors (new images, or another model's embeddings of stored ones) and account for
    it, in the caller's one transaction."""
    # Lock this chunk's row: if another delivery of the same chunk committed meanwhile, do nothing.
    mark = session.scalars(
        select(CatalogueJobChunk).where(CatalogueJobChunk.job_id == job_id, CatalogueJobChunk.chunk == chunk).with_for_update()
    ).first()
    job = _get(session, job_id)
    if mark is None or mark.finished_at is not None or job.state in FINAL:
        result.skipped = True
        return
    store = _store_embeddings if any(item.image_id is not None for item, _ in decoded) else _store_images
    result.added = store(session, embedder, job.model, decoded)
    duplicates = result.duplicates + len(decoded) - result.added
    session.execute(
        update(CatalogueJob)
        .where(CatalogueJob.id == job_id)
        .values(
            done=CatalogueJob.done + result.added + duplicates + len(result.failures),
            added=CatalogueJob.added + result.added,
            duplicates=CatalogueJob.duplicates + duplicates,
            failed=CatalogueJob.failed + len(result.failures),
            failures=(job.failures + result.failures)[:MAX_FAILURES],
        )
    )
    mark.finished_at = datetime.now(UTC)
    session.execute(delete(CatalogueJobItem).where(CatalogueJobItem.job_id == job_id, CatalogueJobItem.chunk == chunk))


def _store_images(session: Session, embedder: Any, model: str, decoded: list[tuple[CatalogueJobItem, DecodedImage]]) -> int:
    """New images with their embeddings; those already stored (by sha256) are left as they are."""
    stored = catalogue.existing_by_sha(session, (img.sha256 for _, img in decoded))
    fresh = [(item, img) for item, img in decoded if img.sha256 not in stored]
    if fresh:
        cats = catalogue.ensure_categories(session, {item.category or "uncategorised" for item, _ in fresh})
        vectors = embedder.embed([img.rgb for _, img in fresh])
        new = [
            catalogue.NewImage(
                img, cats[item.category or "uncategorised"], label_given=True, source=item.source, description=item.description
            )
            for item, img in fresh
        ]
        catalogue.add_images(session, model, new, vectors)
    return len(fresh)


def _store_embeddings(session: Session, embedder: Any, model: str, decoded: list[tuple[CatalogueJobItem, DecodedImage]]) -> int:
    """Re-embedding: `model`'s embeddings of stored images; an image that has one already keeps it."""
    vectors = embedder.embed([img.rgb for _, img in decoded])
    return catalogue.add_embeddings(session, model, [item.image_id or 0 for item, _ in decoded], vectors)


def _finish_if_done(engine: Engine, job_id: int) -> None:
    with session_scope(engine) as session:
        job = _get(session, job_id, lock=True)
        if job.state in FINAL:
            return
        open_chunks = session.scalar(
            select(func.count())
            .select_from(CatalogueJobChunk)
            .where(CatalogueJobChunk.job_id == job_id, CatalogueJobChunk.finished_at.is_(None))
        )
        if not open_chunks and job.chunks and job.params.get("staged"):
            job.state, job.finished_at = "succeeded", datetime.now(UTC)


def mark_staged(engine: Engine, job_id: int) -> None:
    """Staging is over: the job may finish when its last chunk does (which may have happened already)."""
    with session_scope(engine) as session:
        job = _get(session, job_id, lock=True)
        job.params = {**job.params, "staged": True}
    _finish_if_done(engine, job_id)


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


def job_dir(settings: Settings, job_id: int) -> Path:
    return settings.data_dir / "jobs" / str(job_id)


# --- staging each kind of input -------------------------------------------------------------------------


def stage_archive(settings: Settings, engine: Engine, app: procrastinate.App, job_id: int, archive: Path) -> None:
    """Extract (safely) on this machine, stage the images in the database, defer the chunks; the archive
    and its extracted files are removed afterwards, whatever happens."""
    from backend.archives import Limits, extract_archive
    from backend.datasets import load_folder

    folder = job_dir(settings, job_id) / "files"
    try:
        limits = Limits(settings.max_archive_entries, settings.max_archive_expanded, settings.max_upload_size)
        extracted = extract_archive(archive, folder, limits)
        archive.unlink(missing_ok=True)
        samples, skipped, notes = load_folder(folder, settings.max_upload_size)
        listed = [{"source": "archive", "reason": note} for note in extracted.notes + notes]
        stage_items(
            engine, app, job_id, sample_items(samples), settings.job_chunk_size, extracted.skipped + skipped, notes=listed
        )
    except InvalidInput as exc:
        fail_job(engine, job_id, exc.message)
    except Exception as exc:  # a job never stays queued forever because staging broke
        log.exception("job %s: staging failed", job_id)
        fail_job(engine, job_id, f"staging failed: {exc}")
    finally:
        import shutil

        shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)


def stage_urls(settings: Settings, engine: Engine, app: procrastinate.App, job_id: int, text: str) -> None:
    from backend.urls import parse_url_list, shown

    try:
        items, problems = parse_url_list(text, settings.max_url_list_items)
    except InvalidInput as exc:
        fail_job(engine, job_id, exc.message)
        return
    staged = (CatalogueJobItem(source=shown(i.url), url=i.url, category=i.category, description=i.description) for i in items)
    failures = [{"source": "URL list", "reason": p} for p in problems]
    stage_items(engine, app, job_id, staged, settings.job_chunk_size, failures=failures)


def stage_folder(settings: Settings, engine: Engine, app: procrastinate.App, job_id: int, folder: Path) -> None:
    from backend.datasets import load_folder

    try:
        samples, skipped, notes = load_folder(folder, settings.max_upload_size)
    except InvalidInput as exc:
        fail_job(engine, job_id, exc.message)
        return
    listed = [{"source": str(folder), "reason": note} for note in notes]
    stage_items(engine, app, job_id, sample_items(samples), settings.job_chunk_size, skipped, notes=listed)


def stage_reembed(settings: Settings, engine: Engine, app: procrastinate.App, job_id: int, model_id: str) -> None:
    """Every stored image without a `model_id` embedding, by id: workers read its bytes from the database."""
    with session_scope(engine) as session:
        ids = catalogue.images_without(session, model_id)
    items = (CatalogueJobItem(source=f"image {i}", image_id=i) for i in ids)
    stage_items(engine, app, job_id, items, settings.job_chunk_size)


class WorkerThread:
    """`serve`'s in-process worker (SERVE_WORKER): procrastinate's worker on an event loop of its own thread,
    so that `./setup.sh all` needs no second process; stopped with the server."""

    def __init__(self, settings: Settings, engine: Engine, after_commit: Callable[[], None] | None = None) -> None:
        self.settings, self.engine, self.after_commit = settings, engine, after_commit
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="catalogue-worker", daemon=True)
        self.task: Any = None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        _WORKER.configure(self.settings, self.engine, self.after_commit)
        app = make_app(self.engine)

        async def main() -> None:
            async with app.open_async():
                await app.run_worker_async(**_worker_options(self.settings.worker_concurrency, "imsrc-serve", False))

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
