"""Ingestion end to end (decode, embed, store, prototypes) against embedding alone."""

import sys
import time

from backend.core.config import Settings
from backend.embedding.models import DEFAULT_MODEL
from backend.embedding.registry import create_embedder
from backend.imaging import decode_image
from backend.ingest import ingest
from benchmarks.harness import TempDatabase, cifar_samples


def run(settings: Settings, quick: bool) -> dict:
    dataset = cifar_samples(settings, 64 if quick else 320)
    embedder = create_embedder(settings, DEFAULT_MODEL)
    embedder.load()
    images = [decode_image(s.load(), 10**7).rgb for s in dataset.samples]
    embedder.embed(images[:8])
    t = time.perf_counter()
    embedder.embed(images)
    embed_only = len(images) / (time.perf_counter() - t)
    with TempDatabase() as db:
        report = ingest(dataset, embedder, db.engine, 10**7, progress=False)
    result = {
        "images": report.added,
        "end_to_end_images_per_s": round(report.images_per_second, 1),
        "embedding_only_images_per_s": round(embed_only, 1),
        "overhead_pct": round(100 * (embed_only / report.images_per_second - 1), 1),
    }
    print(f"  ingest: {result['end_to_end_images_per_s']} img/s end to end, {embed_only:.1f} embedding alone", file=sys.stderr)
    return result
