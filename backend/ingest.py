"""Batched ingestion of a labelled dataset: decode, deduplicate, embed, store; one transaction per batch.

A crash loses at most the batch in flight; a rerun skips what is stored (by sha256) without re-embedding.
"""

import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from backend import catalogue
from backend.core.errors import InvalidImage
from backend.datasets import Dataset, Sample
from backend.db.session import session_scope
from backend.embedding.base import Embedder
from backend.imaging import DecodedImage, decode_image

log = logging.getLogger(__name__)


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


def _decode_batch(samples: list[Sample], max_pixels: int, report: IngestReport) -> list[tuple[Sample, DecodedImage]]:
    decoded = []
    seen: set[str] = set()
    for sample in samples:
        try:
            image = decode_image(sample.load(), max_pixels, name=sample.source)
        except (InvalidImage, OSError) as exc:
            report.invalid += 1
            if len(report.errors) < 20:
                report.errors.append(str(getattr(exc, "message", exc)))
            continue
        if image.sha256 in seen:  # the same bytes twice in one batch
            report.already_stored += 1
            continue
        seen.add(image.sha256)
        decoded.append((sample, image))
    return decoded


def _store_batch(engine: Engine, embedder: Embedder, decoded: list[tuple[Sample, DecodedImage]], report: IngestReport) -> None:
    with session_scope(engine) as session:
        stored = catalogue.existing_by_sha(session, (img.sha256 for _, img in decoded))
    fresh = [(s, img) for s, img in decoded if img.sha256 not in stored]
    report.already_stored += len(decoded) - len(fresh)
    if not fresh:
        return
    vectors = embedder.embed([img.rgb for _, img in fresh])
    for attempt in range(2):
        try:
            with session_scope(engine) as session:
                cats = catalogue.ensure_categories(session, {s.label for s, _ in fresh})
                items = [catalogue.NewImage(img, cats[s.label], label_given=True, source=s.source) for s, img in fresh]
                catalogue.add_images(session, embedder.model_id, items, vectors)
            report.added += len(fresh)
            return
        except IntegrityError:
            # Another writer stored some of these meanwhile: drop them and retry once.
            if attempt:
                raise
            with session_scope(engine) as session:
                stored = catalogue.existing_by_sha(session, (img.sha256 for _, img in fresh))
            keep = [i for i, (_, img) in enumerate(fresh) if img.sha256 not in stored]
            report.already_stored += len(fresh) - len(keep)
            fresh = [fresh[i] for i in keep]
            vectors = vectors[keep]
            if not fresh:
                return


def ingest(
    dataset: Dataset, embedder: Embedder, engine: Engine, max_pixels: int, batch_size: int = 128, progress: bool = True
) -> IngestReport:
    report = IngestReport(dataset.name, embedder.model_id, requested=len(dataset.samples), skipped_files=dataset.skipped)
    start = time.perf_counter()
    embedder.load()
    with tqdm(total=len(dataset.samples), unit="img", desc=f"ingest {dataset.name}", disable=not progress) as bar:
        for i in range(0, len(dataset.samples), batch_size):
            batch = dataset.samples[i : i + batch_size]
            _store_batch(engine, embedder, _decode_batch(batch, max_pixels, report), report)
            bar.update(len(batch))
    report.seconds = time.perf_counter() - start
    return report
