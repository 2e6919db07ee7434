"""Running one chunk of a job in a worker: decode (or download) its items, embed the new ones, then store
them and account for the chunk in one transaction.

That transaction locks the chunk's done mark (a second delivery of the same chunk does nothing) and the
job's row (a cancel and a chunk commit never interleave: a chunk that commits before a cancel stays, one
after it adds nothing). Embedding happens before it, so workers embed in parallel and hold the job's row
only while they write."""

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.core.config import Settings
from backend.core.errors import InvalidInput
from backend.imaging import DecodedImage, decode_image
from backend.queries import fetch_limits
from backend.storage import catalogue
from backend.storage.engine import session_scope
from backend.storage.jobs import FINAL, MAX_FAILURES, delete_chunk_items, finish_if_done, load_chunk, lock_chunk_mark, lookup
from backend.storage.schema import CatalogueJobItem
from backend.urls import fetch

log = logging.getLogger("backend.jobs")

Decoded = list[tuple[CatalogueJobItem, DecodedImage]]


class ChunkRunner:
    """What a worker holds between chunks: settings, engine, the embedding models (from the process's model
    cache) and what to do after a commit (serve's own worker makes the images searchable at once)."""

    def __init__(self, settings: Settings, engine: Engine, after_commit: Callable[[], None] | None = None) -> None:
        self.settings, self.engine, self.after_commit = settings, engine, after_commit

    def embedder(self, model_name: str | None = None) -> Any:
        """The settings' model (None), or the one a re-embedding job names: from the process's one model
        cache, so serve's own worker shares the server's loaded model."""
        from backend.embedding.cache import model_cache

        embedder = model_cache.get(self.settings, model_name)
        embedder.load()
        return embedder

    def run(self, job_id: int, chunk: int) -> "ChunkResult":
        result = ingest_chunk(self.settings, self.engine, self.embedder, job_id, chunk)
        if result.added and self.after_commit is not None:
            self.after_commit()
        return result


@dataclass
class ChunkResult:
    added: int = 0
    duplicates: int = 0
    failures: list[dict] = field(default_factory=list)
    skipped: bool = False  # already done, or the job ended


def ingest_chunk(
    settings: Settings, engine: Engine, embedders: Callable[[str | None], Any], job_id: int, chunk: int
) -> ChunkResult:
    """Decode (or download), embed and store one chunk, then account for it, all in one transaction."""
    loaded = load_chunk(engine, job_id, chunk)
    if loaded is None:
        return ChunkResult(skipped=True)
    items, model_name = loaded
    result = ChunkResult()
    decoded = _decode_items(items, settings, result)
    embedder = embedders(model_name)
    for attempt in range(2):
        try:
            with session_scope(engine) as session:
                _commit_chunk(session, embedder, job_id, chunk, decoded, result)
            break
        except IntegrityError:
            if attempt:  # the same image stored by another writer twice in a row: give up (the task retries)
                raise
            result.added = 0
    finish_if_done(engine, job_id)
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


def _decode_items(items: list[CatalogueJobItem], settings: Settings, result: ChunkResult) -> Decoded:
    limits = fetch_limits(settings)

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


def _commit_chunk(session: Session, embedder: Any, job_id: int, chunk: int, decoded: Decoded, result: ChunkResult) -> None:
    """Store the chunk's vectors (new images, or another model's embeddings of stored ones) and account for
    it, in the caller's one transaction."""
    mark = lock_chunk_mark(session, job_id, chunk)
    fresh = _to_embed(session, decoded)
    vectors = embedder.embed([img.rgb for _, img in fresh]) if fresh else None  # before the job's row is locked
    job = lookup(session, job_id, lock=True)  # a cancel waits for this commit, or this sees the cancel
    if mark is None or mark.finished_at is not None or job.state in FINAL:
        result.skipped = True
        return
    result.added = _store(session, job.model, fresh, vectors) if vectors is not None else 0
    duplicates = result.duplicates + len(decoded) - result.added
    job.done += result.added + duplicates + len(result.failures)
    job.added += result.added
    job.duplicates += duplicates
    job.failed += len(result.failures)
    job.failures = (job.failures + result.failures)[:MAX_FAILURES]
    mark.finished_at = datetime.now(UTC)
    delete_chunk_items(session, job_id, chunk)


def _to_embed(session: Session, decoded: Decoded) -> Decoded:
    """New images (not stored by sha256), or for re-embedding every item (an image that has the model's
    embedding already keeps it: `add_embeddings` is idempotent)."""
    if any(item.image_id is not None for item, _ in decoded):
        return decoded
    stored = catalogue.existing_by_sha(session, (img.sha256 for _, img in decoded))
    return [(item, img) for item, img in decoded if img.sha256 not in stored]


def _store(session: Session, model: str, fresh: Decoded, vectors: Any) -> int:
    if any(item.image_id is not None for item, _ in fresh):
        return catalogue.add_embeddings(session, model, [item.image_id or 0 for item, _ in fresh], vectors)
    cats = catalogue.ensure_categories(session, {item.category or "uncategorised" for item, _ in fresh})
    new = [
        catalogue.NewImage(
            img, cats[item.category or "uncategorised"], label_given=True, source=item.source, description=item.description
        )
        for item, img in fresh
    ]
    catalogue.add_images(session, model, new, vectors)
    return len(fresh)
