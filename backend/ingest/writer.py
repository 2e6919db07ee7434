"""The one way an image enters the catalogue: decode -> de-duplicate by sha256 -> embed -> store, one
transaction per batch, retried once without what another writer stored meanwhile. `POST /upload`,
`populate` and job chunks all go through `BatchWriter` (the batched ones with its stages overlapped by
`backend.ingest.pipeline`). Making the committed images searchable is the caller's next, visible step:
`LiveIndex.after_write()` in the server."""

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.core.errors import InvalidInput
from backend.embedding.embedder import Embedder
from backend.imaging import DecodedImage, ImageBytes, decode_image
from backend.ingest.categories import NO_PROTOTYPES, Prediction, Predictor
from backend.storage import catalogue
from backend.storage.engine import session_scope

REASON_CHARS = 500  # of a failure's source and reason


class Source(Protocol):
    """Something to ingest: where it came from, its category (None: predicted), and its bytes."""

    @property
    def source(self) -> str: ...
    @property
    def category(self) -> str | None: ...
    @property
    def description(self) -> str | None: ...
    @property
    def image_id(self) -> int | None: ...  # a stored image to embed with another model (re-embedding)
    def load(self) -> bytes: ...


@dataclass
class IngestReport:
    """What an ingestion did: of one batch, one chunk, one upload or a whole populate run."""

    added: int = 0  # images stored (or, re-embedding, embeddings added)
    duplicates: int = 0  # the same bytes stored already, or twice in the input
    failed: int = 0  # unreadable, not an image, a failed download, no category to give it
    failures: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason"}, the first ones
    ids: list[int] = field(default_factory=list)  # the images stored, in input order
    requested: int = 0
    skipped: int = 0  # files never read (populate's folder walk: not images, too large)
    seconds: float = 0.0

    def fail(self, source: str | None, reason: str) -> None:
        self.failed += 1
        self.failures.append({"source": (source or "")[:REASON_CHARS], "reason": reason[:REASON_CHARS]})

    def merge(self, other: "IngestReport", keep: int | None = None) -> None:
        """Add `other`'s counts; keep at most `keep` failures in all."""
        self.added += other.added
        self.duplicates += other.duplicates
        self.failed += other.failed
        self.failures = (self.failures + other.failures)[:keep]
        self.ids += other.ids

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


@dataclass
class Item:
    image: ImageBytes  # what is stored (the full-size pixels are dropped once the model's input is made)
    category: str | None  # None: stage 1 predicts one
    source: str | None = None
    description: str | None = None
    image_id: int | None = None  # re-embedding: the stored image this vector is for
    pixels: np.ndarray | None = None  # the model's input, until embedded
    category_id: int | None = None  # set when stored
    prediction: Prediction | None = None  # set when stored without a category


@dataclass
class Batch:
    """One batch on its way through the stages; `report` holds what the stages before the store counted."""

    size: int  # inputs it came from (progress)
    items: list[Item] = field(default_factory=list)
    vectors: np.ndarray | None = None
    report: IngestReport = field(default_factory=IngestReport)
    embed_seconds: float = 0.0


class NearDuplicateHook(Protocol):
    """An upload's near-duplicate check (`backend.search.near_duplicates.UploadLinks`): searched once the
    image is embedded (it may refuse by raising), stored in the image's own transaction."""

    def check(self, vector: np.ndarray) -> None: ...
    def store(self, session: Session, image_id: int) -> None: ...


@dataclass
class Uploaded:
    """What `BatchWriter.upload` did: `item` is None when the bytes were stored already (`report.ids` empty)."""

    report: IngestReport
    item: Item | None
    embed_seconds: float


class BatchWriter:
    """One ingestion run's stages. `new_categories`: a category name not in the catalogue is created (jobs,
    populate) or refused (upload: Unprocessable)."""

    def __init__(
        self,
        engine: Engine,
        embedder: Embedder,
        predictor: Predictor,
        max_pixels: int,
        model: str | None = None,
        *,
        new_categories: bool = True,
    ) -> None:
        self.engine, self.embedder, self.predictor, self.max_pixels = engine, embedder, predictor, max_pixels
        self.model = model or embedder.model_id
        self.new_categories = new_categories
        self._earlier: set[str] = set()  # what this run's earlier batches hold: maybe not written yet when pipelined

    # --- decode ---------------------------------------------------------------------------------

    def decode(self, sources: Sequence[Source], pool: Executor | None = None) -> Batch:
        """Read, decode and resize to the model's input (in `pool` if given: downloads); one bad input fails
        itself only. A bug (not bad data) is raised."""
        done = list(pool.map(self._decode_one, sources)) if pool is not None else [self._decode_one(s) for s in sources]
        batch = Batch(len(sources))
        for source, item in zip(sources, done, strict=True):
            if isinstance(item, str):
                batch.report.fail(source.source, item)
            else:
                batch.items.append(item)
        return self._unique(batch)

    def _decode_one(self, source: Source) -> Item | str:
        try:
            image = decode_image(source.load(), self.max_pixels, name=source.source)
        except (InvalidInput, OSError) as exc:  # not an image, a failed download, a refused URL, a vanished file
            return str(getattr(exc, "message", exc))
        return self._item(image, source.category, source.source, source.description, source.image_id)

    def _item(
        self, image: DecodedImage, category: str | None, source: str | None, description: str | None, image_id: int | None
    ) -> Item:
        kept = ImageBytes(image.data, image.sha256, image.format, image.width, image.height)
        return Item(kept, category, source, description, image_id, pixels=self.embedder.preprocess(image.rgb))

    def decoded(self, image: DecodedImage, category: str | None, description: str | None = None) -> Batch:
        """A batch of one image decoded already (an upload)."""
        return Batch(1, [self._item(image, category, None, description, None)])

    def _unique(self, batch: Batch) -> Batch:
        """The same bytes twice in one batch: the first one only."""
        seen: set[str] = set()
        kept = []
        for item in batch.items:
            if item.image_id is None and item.image.sha256 in seen:
                batch.report.duplicates += 1
            else:
                seen.add(item.image.sha256)
                kept.append(item)
        batch.items = kept
        return batch

    # --- de-duplicate, embed ----------------------------------------------------------------------

    def embed(self, batch: Batch) -> Batch:
        """Only what is not stored yet is embedded (a rerun resumes without re-embedding)."""
        return self.vectorise(self.unseen(batch))

    def unseen(self, batch: Batch) -> Batch:
        """Drop what is stored already, or held by this run's earlier batches (counted as duplicates)."""
        new = [it.image.sha256 for it in batch.items if it.image_id is None]
        with session_scope(self.engine) as session:
            stored = catalogue.existing_by_sha(session, new).keys() | self._earlier
        keep = [it for it in batch.items if it.image_id is not None or it.image.sha256 not in stored]
        self._earlier.update(it.image.sha256 for it in keep if it.image_id is None)
        batch.report.duplicates += len(batch.items) - len(keep)
        batch.items = keep
        return batch

    def vectorise(self, batch: Batch) -> Batch:
        """The model's vectors of the batch's items; their pixels are dropped."""
        start = time.perf_counter()
        if batch.items:
            batch.vectors = self.embedder.embed_pixels(np.stack([it.pixels for it in batch.items if it.pixels is not None]))
        for item in batch.items:
            item.pixels = None
        batch.embed_seconds += time.perf_counter() - start
        return batch

    # --- an upload: one call ------------------------------------------------------------------------

    def upload(self, image: DecodedImage, category: str | None, description: str | None, near: NearDuplicateHook) -> Uploaded:
        """One decoded image: de-duplicated by sha256, embedded, checked for near-duplicates (`near` may refuse:
        nothing is written), then stored with its near-duplicate links in one transaction."""
        batch = self.unseen(self.decoded(image, category, description))
        if not batch.items:
            return Uploaded(batch.report, None, 0.0)
        self.vectorise(batch)
        assert batch.vectors is not None
        near.check(batch.vectors[0])

        def linked(session: Session, ids: list[int]) -> None:
            for image_id in ids:
                near.store(session, image_id)

        report = self.write(batch, linked)
        return Uploaded(report, batch.items[0] if report.ids else None, batch.embed_seconds)

    # --- store ----------------------------------------------------------------------------------

    def write(self, batch: Batch, linked: Callable[[Session, list[int]], object] | None = None) -> IngestReport:
        """Store the batch in one transaction (with `linked`'s writes for the new ids: an upload's near-duplicate
        links); if another writer stored some of it meanwhile (a unique violation), drop those and retry once.
        Returns the batch's whole report; the caller makes the images searchable (`LiveIndex.after_write()`)."""
        for attempt in range(2):
            try:
                with session_scope(self.engine) as session:
                    stored = self.store(session, batch)
                    if linked is not None and stored.ids:
                        linked(session, stored.ids)
                break
            except IntegrityError:
                if attempt:
                    raise
                self.drop_stored(batch)
        batch.report.merge(stored)
        return batch.report

    def store(self, session: Session, batch: Batch) -> IngestReport:
        """Store the embedded batch in the caller's transaction: new images (categories created or looked up,
        missing ones predicted) and re-embeddings. Returns what this step did; `batch.report` is untouched, so
        a rolled-back transaction can be retried."""
        report = IngestReport()
        if not batch.items or batch.vectors is None:
            return report
        again = [i for i, it in enumerate(batch.items) if it.image_id is not None]
        if again:  # idempotent: an image that has this model's embedding keeps it (counted a duplicate)
            ids = [batch.items[i].image_id or 0 for i in again]
            report.added = catalogue.add_embeddings(session, self.model, ids, batch.vectors[again])
            report.duplicates = len(again) - report.added
        new = [i for i, it in enumerate(batch.items) if it.image_id is None]
        new = self._categorise(session, batch, new, report)
        items = [batch.items[i] for i in new]
        rows = [
            catalogue.NewImage(it.image, it.category_id, it.prediction is None, source=it.source, description=it.description)
            for it in items
        ]
        report.ids = catalogue.add_images(session, self.model, rows, batch.vectors[new]) if rows else []
        report.added += len(rows)
        return report

    def _categorise(self, session: Session, batch: Batch, new: list[int], report: IngestReport) -> list[int]:
        """Give each new item its category id: the named one, or stage 1's prediction (label not given).
        Returns the items that can be stored; one that needs a prediction while there is none fails."""
        named = {c for i in new if (c := batch.items[i].category)}
        if self.new_categories:
            ids = catalogue.ensure_categories(session, named)
        else:
            ids = {name: catalogue.category_by_name(session, name).id for name in sorted(named)}
        unnamed = [i for i in new if not batch.items[i].category]
        assert batch.vectors is not None
        predictions = self.predictor.predict(session, batch.vectors[unnamed]) if unnamed else []
        for i in new:
            item = batch.items[i]
            item.prediction = None
            if item.category:
                item.category_id = ids[item.category]
        if predictions is None:
            for i in unnamed:
                report.fail(batch.items[i].source, NO_PROTOTYPES)
            return [i for i in new if batch.items[i].category]
        for i, prediction in zip(unnamed, predictions, strict=True):
            batch.items[i].category_id, batch.items[i].prediction = prediction.category_id, prediction
        return new

    def drop_stored(self, batch: Batch) -> None:
        """After a unique violation: what another writer stored meanwhile becomes a duplicate."""
        with session_scope(self.engine) as session:
            stored = catalogue.existing_by_sha(session, (it.image.sha256 for it in batch.items if it.image_id is None))
        keep = [i for i, it in enumerate(batch.items) if it.image_id is not None or it.image.sha256 not in stored]
        batch.report.duplicates += len(batch.items) - len(keep)
        batch.items = [batch.items[i] for i in keep]
        batch.vectors = batch.vectors[keep] if batch.vectors is not None and keep else None

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """Sub-batches as one (a job chunk's, stored in one transaction)."""
        whole = Batch(sum(b.size for b in batches))
        for b in batches:
            whole.items += b.items
            whole.report.merge(b.report)
        vectors = [b.vectors for b in batches if b.vectors is not None and len(b.vectors)]
        whole.vectors = np.concatenate(vectors) if vectors else None
        return whole
