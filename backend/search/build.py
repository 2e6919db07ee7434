"""A new index from the database (one consistent snapshot, never re-embedding), and the class behind each
index type. Catalogues up to IN_MEMORY_BUILD_BYTES are read in one pass and built in memory; larger ones in
two streamed passes (a training sample, then every vector in chunks), never holding all float32 vectors."""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from backend.core.vectors import StoredVectors
from backend.index.category_index import CategoryIndex
from backend.index.category_lists import CategoryLists
from backend.index.fastscan import FastScanIndex
from backend.index.layout import IndexLayout
from backend.index.sampling import SAMPLE_MULTIPLIER, sample_cut
from backend.index.two_stage import TwoStageIndex
from backend.storage import catalogue, change_log, vector_reader
from backend.storage.engine import session_scope
from backend.storage.shards import CategorySet

log = logging.getLogger(__name__)

IN_MEMORY_BUILD_BYTES = 1 << 30
CHUNK_ROWS = 50_000
# COPYs at once when reading every vector: the database de-TOASTs and sends rows on as many cores, and
# each connection's rows are parsed while the others wait on the network.
READ_CONNECTIONS = max(2, min(8, os.cpu_count() or 2))


@dataclass(frozen=True)
class Built:
    index: CategoryIndex
    identity: change_log.CatalogueIdentity
    seq: int


def index_class(kind: str) -> type[CategoryLists]:
    """The class behind a concrete index type (auto is resolved by catalogue size first)."""
    for cls in (TwoStageIndex, FastScanIndex):
        if kind in cls.KINDS:
            return cls
    raise ValueError(f"no index of type {kind!r} can be built (auto is resolved by catalogue size first)")


def build_from_database(
    engine: Engine,
    model: str,
    dim: int,
    layout: IndexLayout | None = None,
    in_memory_bytes: int = IN_MEMORY_BUILD_BYTES,
    store_dir: Path | None = None,
    categories: CategorySet | None = None,
) -> Built:
    """A new index from one consistent snapshot of the stored vectors and prototype sums (never re-embeds).
    `store_dir`: where fastscan spools its re-rank file (in RAM without one); `categories`: only the vectors
    one cluster group holds (every category keeps its list, empty, so category numbers match the full index)."""
    layout = layout or IndexLayout()
    start = time.perf_counter()
    with session_scope(engine, snapshot=True, bulk=True) as session:
        identity = change_log.identity(session)
        seq = change_log.latest_seq(session, model)
        category_ids = sorted(catalogue.category_ids(session).values())
        prototypes = catalogue.load_prototypes(session, model)
        sizes = catalogue.category_vector_counts(session, model)
        if categories is not None:
            sizes = {c: n for c, n in sizes.items() if categories.contains(c)}
        layout = layout.resolved(sum(sizes.values()))  # auto: flat or fastscan by catalogue size
        cls = index_class(layout.kind)
        reading = 0.0
        if sum(sizes.values()) * dim * 4 <= in_memory_bytes:
            t = time.perf_counter()
            stored = vector_reader.load_vectors(session, model, connections=READ_CONNECTIONS, categories=categories)
            reading = time.perf_counter() - t
            index = cls.build(model, dim, category_ids, stored, prototypes, layout, store_dir)
        else:
            sample_rule = (SAMPLE_MULTIPLIER, sample_cut(layout.train_fraction(sizes)))
            sample = (
                vector_reader.load_vectors(session, model, sample_rule, categories=categories)
                if sample_rule[1]
                else StoredVectors.empty(dim)
            )
            index = cls.train(model, dim, category_ids, layout, sizes, sample, store_dir)
            del sample
            index.set_prototypes(prototypes)
            chunks = vector_reader.stream_vectors(session, model, CHUNK_ROWS, connections=READ_CONNECTIONS, categories=categories)
            while True:
                t = time.perf_counter()
                chunk = next(chunks, None)
                reading += time.perf_counter() - t
                if chunk is None:
                    break
                index.add(chunk.ids, chunk.category_ids, chunk.vectors)
    _log_rate(index.ntotal, time.perf_counter() - start, reading)
    return Built(index, identity, seq)


def _log_rate(vectors: int, seconds: float, reading: float) -> None:
    """`reading`: the time the build waited for the next chunk while the COPYs ran beside it (not a read rate:
    a build whose own work is slower than the reads waits for them only at the start)."""
    log.info(
        "index built from the database: %d vectors in %.1fs (%.0f vectors/s; waited %.1fs for the reads, %d connections)",
        vectors,
        seconds,
        vectors / max(seconds, 1e-9),
        reading,
        READ_CONNECTIONS,
    )
