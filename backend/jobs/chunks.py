"""Running one chunk of a job in a worker: its items through the batch writer's stages (decode or download,
de-duplicate, embed: overlapped in sub-batches by `backend.ingest.pipeline`), then stored and accounted for
in ONE transaction.

That transaction locks the chunk's done mark (a second delivery of the same chunk does nothing) and the
job's row (a cancel and a chunk commit never interleave: a chunk that commits before a cancel stays, one
after it adds nothing). Embedding happens before it, so workers embed in parallel and hold the job's row
only while they write. An item without a category gets stage 1's prediction from the stored prototypes
(`StoredPrototypes`: a worker has no index), stored as predicted."""

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.core.config import Settings
from backend.embedding.cache import model_cache
from backend.embedding.embedder import Embedder
from backend.ingest.categories import StoredPrototypes
from backend.ingest.pipeline import run_pipeline
from backend.ingest.writer import Batch, BatchWriter, IngestReport
from backend.sources.query_images import fetch_limits
from backend.sources.urls import FetchLimits, fetch
from backend.storage.engine import session_scope
from backend.storage.jobs import FINAL, MAX_FAILURES, delete_chunk_items, finish_if_done, load_chunk, lock_chunk_mark, lookup
from backend.storage.schema import CatalogueJobItem

log = logging.getLogger("backend.jobs")


class ChunkRunner:
    """What a worker holds between chunks: settings, engine and, in serve's own worker, the server's
    `after_write` (its index, then stage 2 wherever it runs, follow the commit), which makes a chunk's images
    searchable at once. Models come from the process's one model cache."""

    def __init__(self, settings: Settings, engine: Engine, after_write: Callable[[], None] | None = None) -> None:
        self.settings, self.engine, self.after_write = settings, engine, after_write

    def embedder(self, model_name: str | None = None) -> Embedder:
        """The settings' model (None), or the one a re-embedding job names: from the process's model cache,
        so serve's own worker shares the server's loaded model."""
        embedder = model_cache.get(self.settings, model_name)
        embedder.load()
        return embedder

    def run(self, job_id: int, chunk: int) -> IngestReport | None:
        """The chunk's report; None when it was done already or its job had ended."""
        report = ingest_chunk(self.settings, self.engine, self, job_id, chunk)
        if report is not None and report.added and self.after_write is not None:
            self.after_write()  # committed: now searchable in this server, and on its cluster's shards
        return report


@dataclass(frozen=True)
class _JobInput:
    """A staged item as the writer's input: its bytes staged, downloaded, or (re-embedding) read back."""

    item: CatalogueJobItem
    limits: FetchLimits

    @property
    def source(self) -> str:
        return self.item.source

    @property
    def category(self) -> str | None:
        return self.item.category

    @property
    def description(self) -> str | None:
        return self.item.description

    @property
    def image_id(self) -> int | None:
        return self.item.image_id

    def load(self) -> bytes:
        return self.item.data if self.item.data is not None else fetch(self.item.url or "", self.limits)


@dataclass(frozen=True)
class _Chunk:
    items: list[CatalogueJobItem]
    model: str  # the job's model: what its vectors are stored as
    model_name: str | None  # the embedder a re-embedding job names


def ingest_chunk(settings: Settings, engine: Engine, runner: ChunkRunner, job_id: int, chunk: int) -> IngestReport | None:
    """Decode (or download), embed and store one chunk, then account for it, all in one transaction; None
    when the chunk was done already or its job had ended."""
    loaded = _load_chunk(engine, job_id, chunk)
    if loaded is None:
        return None
    writer = BatchWriter(
        engine, runner.embedder(loaded.model_name), StoredPrototypes(loaded.model), settings.max_image_pixels, loaded.model
    )
    batch = _prepare(writer, loaded.items, settings)
    for attempt in range(2):
        try:
            with session_scope(engine) as session:
                report = _commit_chunk(session, writer, job_id, chunk, batch)
            break
        except IntegrityError:
            if attempt:  # the same image stored by another writer twice in a row: give up (the task retries)
                raise
            writer.drop_stored(batch)
    finish_if_done(engine, job_id)
    if report is not None:
        log.info(
            "job %s chunk %s: %d added, %d duplicates, %d failed", job_id, chunk, report.added, report.duplicates, report.failed
        )
    return report


def _prepare(writer: BatchWriter, items: list[CatalogueJobItem], settings: Settings) -> Batch:
    """The chunk's sub-batches decoded (downloads in a pool of URL_CONCURRENCY) while earlier ones are embedded;
    collected, not written: the chunk is stored in one transaction."""
    limits = fetch_limits(settings)
    inputs = [_JobInput(item, limits) for item in items]
    step = settings.embed_batch_size
    embedded: list[Batch] = []
    with ThreadPoolExecutor(max_workers=max(1, settings.url_concurrency), thread_name_prefix="chunk-load") as pool:
        run_pipeline(
            (inputs[i : i + step] for i in range(0, len(inputs), step)),
            lambda part: writer.decode(part, pool),
            writer.embed,
            embedded.append,
        )
    return BatchWriter.concat(embedded)  # a duplicate across sub-batches was dropped by `embed`


def _load_chunk(engine: Engine, job_id: int, chunk: int) -> _Chunk | None:
    """The chunk's items and the job's model; None when the chunk is done or the job has ended."""
    loaded = load_chunk(engine, job_id, chunk)
    return None if loaded is None else _Chunk(*loaded)


def _commit_chunk(session: Session, writer: BatchWriter, job_id: int, chunk: int, batch: Batch) -> IngestReport | None:
    """Store the chunk's vectors (new images, or another model's embeddings of stored ones) and account for
    it, in the caller's one transaction; None (nothing written) when it was done already or its job ended."""
    mark = lock_chunk_mark(session, job_id, chunk)
    job = lookup(session, job_id, lock=True)  # a cancel waits for this commit, or this sees the cancel
    if mark is None or mark.finished_at is not None or job.state in FINAL:
        return None
    report = IngestReport()
    report.merge(batch.report)
    report.merge(writer.store(session, batch))
    job.done += report.added + report.duplicates + report.failed
    job.added += report.added
    job.duplicates += report.duplicates
    job.failed += report.failed
    job.failures = (job.failures + report.failures)[:MAX_FAILURES]
    mark.finished_at = datetime.now(UTC)
    delete_chunk_items(session, job_id, chunk)
    return report
