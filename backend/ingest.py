"""Batched ingestion of a labelled dataset: decode, deduplicate, embed, store; one transaction per batch.

The stages overlap (`backend.pipeline`): while one batch is embedded, the next ones are decoded and
resized in a thread pool and the previous one is written. A crash loses at most the batches in flight;
a rerun skips what is stored (by sha256) without re-embedding.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from backend.core.errors import InvalidImage
from backend.datasets import Dataset, Sample
from backend.embedding.embedder import Embedder
from backend.imaging import ImageBytes, decode_image
from backend.pipeline import DEFAULT_DECODERS, run_pipeline
from backend.storage import catalogue
from backend.storage.engine import session_scope

log = logging.getLogger(__name__)
MAX_ERRORS = 20  # error lines kept in a report


@dataclass
class IngestReport:
    dataset: str
    model: str
    requested: int = 0
    added: int = 0
    already_stored: int = 0
    invalid: int = 0
    skipped_files: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


@dataclass
class _Batch:
    """One batch on its way through the stages; counts are merged into the report by the writer alone."""

    size: int
    images: list[tuple[Sample, ImageBytes]] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)  # the model's input for each image
    vectors: np.ndarray | None = None
    invalid: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)


def _decoder(embedder: Embedder, max_pixels: int) -> Callable[[list[Sample]], _Batch]:
    def decode(samples: list[Sample]) -> _Batch:
        """Decode and resize to the model's input; the full-size pixels are dropped here."""
        batch = _Batch(len(samples))
        seen: set[str] = set()
        for sample in samples:
            try:
                image = decode_image(sample.load(), max_pixels, name=sample.source)
            except (InvalidImage, OSError) as exc:
                batch.invalid += 1
                batch.errors.append(str(getattr(exc, "message", exc)))
                continue
            if image.sha256 in seen:  # the same bytes twice in one batch
                batch.duplicates += 1
                continue
            seen.add(image.sha256)
            batch.pixels.append(embedder.preprocess(image.rgb))
            batch.images.append((sample, ImageBytes(image.data, image.sha256, image.format, image.width, image.height)))
        return batch

    return decode


def _embedder(engine: Engine, embedder: Embedder) -> Callable[[_Batch], _Batch]:
    earlier: set[str] = set()  # what this run's earlier batches hold: maybe not written yet when pipelined

    def embed(batch: _Batch) -> _Batch:
        """Only what is not stored yet is embedded (a rerun resumes without re-embedding)."""
        with session_scope(engine) as session:
            stored = catalogue.existing_by_sha(session, (img.sha256 for _, img in batch.images)).keys() | earlier
        keep = [i for i, (_, img) in enumerate(batch.images) if img.sha256 not in stored]
        earlier.update(batch.images[i][1].sha256 for i in keep)
        batch.duplicates += len(batch.images) - len(keep)
        batch.images = [batch.images[i] for i in keep]
        pixels = np.stack([batch.pixels[i] for i in keep]) if keep else None
        batch.pixels = []
        batch.vectors = embedder.embed_pixels(pixels) if pixels is not None else None
        return batch

    return embed


def _writer(engine: Engine, model: str, report: IngestReport, done: Callable[[int], None]) -> Callable[[_Batch], None]:
    def write(batch: _Batch) -> None:
        _store(engine, model, batch)
        report.added += len(batch.images)
        report.already_stored += batch.duplicates
        report.invalid += batch.invalid
        report.errors += batch.errors[: MAX_ERRORS - len(report.errors)]
        done(batch.size)

    return write


def _store(engine: Engine, model: str, batch: _Batch) -> None:
    """One transaction; if another writer stored some of these meanwhile, drop them and retry once."""
    for attempt in range(2):
        if not batch.images:
            return
        assert batch.vectors is not None
        try:
            with session_scope(engine) as session:
                cats = catalogue.ensure_categories(session, {s.label for s, _ in batch.images})
                items = [catalogue.NewImage(img, cats[s.label], label_given=True, source=s.source) for s, img in batch.images]
                catalogue.add_images(session, model, items, batch.vectors)
            return
        except IntegrityError:
            if attempt:
                raise
            with session_scope(engine) as session:
                stored = catalogue.existing_by_sha(session, (img.sha256 for _, img in batch.images))
            keep = [i for i, (_, img) in enumerate(batch.images) if img.sha256 not in stored]
            batch.duplicates += len(batch.images) - len(keep)
            batch.images = [batch.images[i] for i in keep]
            batch.vectors = batch.vectors[keep]


def ingest(
    dataset: Dataset,
    embedder: Embedder,
    engine: Engine,
    max_pixels: int,
    batch_size: int = 128,
    progress: bool = True,
    pipelined: bool = True,
    decoders: int = DEFAULT_DECODERS,
) -> IngestReport:
    """`pipelined=False`: the same stages one after the other (what the pipeline is checked against)."""
    report = IngestReport(dataset.name, embedder.model_id, requested=len(dataset.samples), skipped_files=dataset.skipped)
    start = time.perf_counter()
    embedder.load()
    samples = dataset.samples
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    with tqdm(total=len(samples), unit="img", desc=f"ingest {dataset.name}", disable=not progress) as bar:
        decode, embed = _decoder(embedder, max_pixels), _embedder(engine, embedder)
        write = _writer(engine, embedder.model_id, report, bar.update)
        if pipelined:
            run_pipeline(batches, decode, embed, write, decoders=decoders)
        else:
            for batch in batches:
                write(embed(decode(batch)))
    report.seconds = time.perf_counter() - start
    return report
