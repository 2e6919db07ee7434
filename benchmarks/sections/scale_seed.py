"""A catalogue of N vectors stored straight into a database (no pixels, no model): Lite0 vectors of real
images first when an embedding cache holds them (Fashion-MNIST, CIFAR-10 under DATA_DIR/cache, as the
indexes section leaves them), then the indexes section's synthetic vectors. Through `catalogue.add_images`,
so prototypes, the change log and every maintained table are written as an upload would.

`python -m benchmarks.sections.scale_seed DATABASE_URL N` seeds a database (a 1M catalogue takes an hour on
2 busy cores; run again, it goes on where it stopped); the scale section reuses a database holding N vectors."""

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

from backend.core.config import Settings, get_settings
from backend.core.vectors import StoredVectors
from backend.embedding.registry import model_id
from backend.imaging import ImageBytes
from backend.storage import catalogue, change_log, migrate, near_duplicates
from backend.storage.engine import database_url, make_engine, session_scope
from benchmarks.sections.indexes import SYNTH_CATEGORIES, synthetic_chunk

CHUNK = 5_000


def cached_real_vectors(settings: Settings, model: str) -> list[Path]:
    """Embedding caches of real images for `model` (written by `embed_cached`), largest first."""
    folder = settings.cache_dir / "embeddings" / model.replace("/", "_")
    return sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_size, reverse=True) if folder.is_dir() else []


def vector_chunks(settings: Settings, model: str, n: int, first: int = 0) -> Iterator[tuple[str, StoredVectors]]:
    """(origin, chunk) of vectors first..n of the catalogue: cached real ones first, then synthetic ones.
    Category ids are indexes into SYNTH_CATEGORIES names. Deterministic, so a seed can be resumed."""
    for origin, chunk in _all_chunks(settings, model, n):
        keep = chunk.ids >= first
        if keep.all():
            yield origin, chunk
        elif keep.any():
            yield origin, StoredVectors(chunk.ids[keep], chunk.category_ids[keep], chunk.vectors[keep])


def _all_chunks(settings: Settings, model: str, n: int) -> Iterator[tuple[str, StoredVectors]]:
    done = 0
    for path in cached_real_vectors(settings, model):
        vectors = np.load(path)["vectors"]
        labels = np.zeros(len(vectors), np.int64)  # the cache keeps no labels: one category for real vectors
        for start in range(0, len(vectors), CHUNK):
            take = min(CHUNK, n - done, len(vectors) - start)
            if take <= 0:
                return
            ids = np.arange(done, done + take, dtype=np.int64)
            yield path.stem, StoredVectors(ids, labels[start : start + take], vectors[start : start + take])
            done += take
    while done < n:
        stop = min(n, done + CHUNK)
        yield "synthetic", synthetic_chunk(done, stop)
        done = stop


def stored_count(engine: Engine, model: str) -> int:
    with session_scope(engine) as s:  # the count kept with the writes: counting 1M rows outlasts DB_TIMEOUT_SECONDS
        return dict(catalogue.model_ids(s)).get(model, 0)


def seed(engine: Engine, settings: Settings, model: str, n: int, progress: bool = True) -> dict:
    """Store vectors until the database holds n (see the module's docstring; a seed that was stopped goes
    on where it stopped); returns where they came from and the rate."""
    first = stored_count(engine, model)
    with session_scope(engine) as s:
        cats = catalogue.ensure_categories(s, [f"c{i}" for i in range(SYNTH_CATEGORIES)])
    origins: dict[str, int] = {}
    start = time.perf_counter()
    for origin, chunk in vector_chunks(settings, model, n, first):
        items = [
            catalogue.NewImage(ImageBytes(b"", f"{int(i):064x}", "PNG", 1, 1), cats[f"c{c}"], label_given=True)
            for i, c in zip(chunk.ids, chunk.category_ids, strict=True)
        ]
        with session_scope(engine) as s:
            catalogue.add_images(s, model, items, chunk.vectors)
        origins[origin] = origins.get(origin, 0) + len(chunk)
        done = sum(origins.values())
        if progress and (first + done) % 50_000 < CHUNK:
            print(f"  seeded {first + done:,} / {n:,} ({done / (time.perf_counter() - start):,.0f}/s)", file=sys.stderr)
    seconds = time.perf_counter() - start
    done = sum(origins.values())
    linked = mark_synthetic_linked(engine, settings, model)
    rate = round(done / max(seconds, 1e-9))
    return {"vectors": n, "origins": origins, "seconds": round(seconds, 1), "vectors_per_s": rate, "links_as_of": linked}


def mark_synthetic_linked(engine: Engine, settings: Settings, model: str) -> int | None:
    """Where every vector is synthetic (no real cache), move the near-duplicate watermark past them: they have
    no near-duplicates at the threshold (isotropic noise in 1,280-d; `duplicates backfill` found 0 links in the
    first 25,000 of a 1M seed), and linking them (about 170/s on 2 busy cores, 100 min at 1M) would run in
    every measured server's background. Real vectors keep their links to be searched."""
    if cached_real_vectors(settings, model):
        return None
    with session_scope(engine) as s:
        seen = near_duplicates.ensure_state(s, model, settings.near_duplicate_threshold).links_seq
        newest = change_log.latest_seq(s, model)
        if newest > seen:
            near_duplicates.advance(s, model, seen, newest)
    return newest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("database_url")
    parser.add_argument("n", type=int)
    args = parser.parse_args()
    settings = get_settings().model_copy(update={"database_url": args.database_url})
    engine = make_engine(database_url(settings))
    migrate.upgrade(engine)
    model = model_id(settings)
    print(seed(engine, settings, model, args.n))
