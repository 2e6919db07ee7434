"""Ten million synthetic vectors, built in chunks (never all float32 vectors at once: 51 GB): train on a
sample, add 200k at a time while keeping the exact top-10 of every query, then sweep nprobe (and, for
fastscan, the re-rank size) one query at a time. Every chunk can be made again alone (`synthetic_chunk`).
"""

import time
from pathlib import Path

import numpy as np

from backend.core.vectors import PrototypeMatrix
from backend.index.category_index import CategoryIndex
from backend.index.fastscan import FastScanIndex
from backend.index.layout import IndexLayout
from backend.search.build import index_class
from benchmarks.harness import DIM, rss_mb
from benchmarks.sections.indexes import (
    NPROBES,
    SHORTLIST,
    SYNTH_CATEGORIES,
    K,
    chunks,
    log,
    sweep_ours,
    synthetic_chunk,
    synthetic_queries,
)

CHUNK = 200_000


class ExactTop:
    """The exact top-K of every query over the chunks seen so far (the ground truth, kept as they come)."""

    def __init__(self, q: np.ndarray) -> None:
        self.q = q
        self.scores = np.full((len(q), K), -np.inf, dtype=np.float32)
        self.ids = np.full((len(q), K), -1, dtype=np.int64)
        self.seconds = 0.0

    def see(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        t = time.perf_counter()
        scores = self.q @ vectors.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        cand_s = np.concatenate([self.scores, np.take_along_axis(scores, top, 1)], 1)
        cand_i = np.concatenate([self.ids, ids[top]], 1)
        order = np.argsort(-cand_s, axis=1)[:, :K]
        self.scores, self.ids = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        self.seconds += time.perf_counter() - t


def build_in_chunks(n: int, spec: IndexLayout, truth: ExactTop, store_dir: Path | None) -> tuple[CategoryIndex, float]:
    """The index, and the seconds spent making the synthetic vectors (not part of the build)."""
    made = time.perf_counter()
    sizes = {c: n // SYNTH_CATEGORIES for c in range(SYNTH_CATEGORIES)}
    # Any id range is a random sample here (categories by id, sub-clusters drawn at random).
    sample = synthetic_chunk(0, round(spec.train_fraction(sizes) * n))
    made = time.perf_counter() - made
    index = index_class(spec.kind).train("bench", DIM, list(range(SYNTH_CATEGORIES)), spec, sizes, sample, store_dir)
    del sample
    sums = np.zeros((SYNTH_CATEGORIES, DIM), dtype=np.float64)
    for start, stop in chunks(n, CHUNK):
        t = time.perf_counter()
        part = synthetic_chunk(start, stop)
        made += time.perf_counter() - t
        index.add(part.ids, part.category_ids, part.vectors)
        np.add.at(sums, part.category_ids, part.vectors)
        truth.see(part.ids, part.vectors)
        if stop % 2_000_000 == 0:
            log(f"{stop:,} added, RSS {rss_mb():,.0f} MB")
    counts = np.full(SYNTH_CATEGORIES, n // SYNTH_CATEGORIES)
    index.set_prototypes(PrototypeMatrix.from_sums(np.arange(SYNTH_CATEGORIES), sums, counts))
    return index, made


def ten_million(
    n: int,
    spec: IndexLayout,
    n_queries: int = 200,
    store_dir: Path | None = None,
    shortlists: tuple[int, ...] = (SHORTLIST,),
    nprobes: tuple[int, ...] = NPROBES,
) -> dict:
    """`store_dir`: where fastscan spools its re-rank file; `shortlists`: its re-rank sizes swept."""
    log(f"{n:,} synthetic vectors, {spec.kind} {spec.codec}, lists of {spec.list_size}, chunks of {CHUNK:,}")
    q, q_labels = synthetic_queries(n_queries)
    rss0 = rss_mb()
    t = time.perf_counter()
    truth = ExactTop(q)
    index, made_s = build_in_chunks(n, spec, truth, store_dir)
    build_s = time.perf_counter() - t - truth.seconds - made_s
    log(f"built in {build_s:,.0f} s (+{made_s:,.0f} s making the vectors), index RAM {index.memory_bytes() / 2**30:.2f} GB")
    rows = []
    for shortlist in shortlists:
        rows += sweep_ours(index, q, truth.ids, spec, build_s, q_labels, None, shortlist, nprobes)
        log(f"re-rank {shortlist}: " + ", ".join(f"{r['knob']} {r['recall@10']:.3f} @ {r['p50']:.2f} ms" for r in rows[-3:]))
    rerank_bytes = index.vectors.file_bytes() if isinstance(index, FastScanIndex) else 0
    return {
        "name": f"synthetic {n:,}",
        "vectors": n,
        "queries": n_queries,
        "rows": rows,
        "index_memory_gb": index.memory_bytes() / 2**30,
        "rerank_file_gb": rerank_bytes / 2**30,
        "process_rss_growth_gb": (rss_mb() - rss0) / 1024,
        "exact_scan_s_per_query": truth.seconds / n_queries,
        "making_vectors_s": made_s,
        "goal": {
            "met": any(r["recall@10"] >= 0.95 and r["p50"] <= 20 for r in rows) and index.memory_bytes() <= 16 * 2**30,
            "ours": min((r for r in rows if r["recall@10"] >= 0.95), key=lambda r: r["p50"], default=None),
        },
    }
