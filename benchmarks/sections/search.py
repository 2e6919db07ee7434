"""Search latency and throughput: exact against two-stage, on synthetic clustered vectors."""

import sys
import time

import numpy as np

from backend.evaluation.retrieval import Embedded, build_index
from backend.index.category_index import CategoryIndex
from benchmarks.harness import N_CATEGORIES, clustered, percentiles, rss_mb


def time_search(index: CategoryIndex, q: np.ndarray, top: int | None, singles: int) -> dict:
    _, ranked = index.rank_categories(q)
    lists = None if top is None else ranked[:, :top]

    def one(i: int) -> None:
        index.search(q[i : i + 1], 10, None if lists is None else lists[i : i + 1])

    one(0)
    lat = []
    for i in range(singles):
        t = time.perf_counter()
        one(i % len(q))
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    hits = index.search(q, 10, lists)
    qps = len(q) / (time.perf_counter() - t)
    return {**percentiles(lat), "qps": qps, "fraction_scanned": float(np.mean(hits.scanned) / index.ntotal)}


def run(quick: bool, tops: tuple[int, ...] = (1, 2, 3, 5)) -> list[dict]:
    rows = []
    for n in (10_000,) if quick else (10_000, 100_000, 1_000_000):
        before = rss_mb()
        x, labels, q = clustered(n)
        t = time.perf_counter()
        index = build_index(Embedded(x, labels, [str(i) for i in range(N_CATEGORIES)]), "synthetic")
        build_s = time.perf_counter() - t
        del x
        singles = 100 if quick or n >= 1_000_000 else 300
        exact = time_search(index, q, None, singles)
        row: dict = {
            "vectors": n,
            "build_vectors_per_s": round(n / build_s),
            "index_rss_mb": round(rss_mb() - before),
            "exact": exact,
        }
        row["two_stage"] = {}
        for top in tops:
            r = time_search(index, q, top, singles)
            r["speedup_p50"] = exact["p50"] / r["p50"]
            r["speedup_qps"] = r["qps"] / exact["qps"]
            row["two_stage"][top] = r
        rows.append(row)
        print(
            f"  search {n:>9,} vectors: exact p50 {exact['p50']:.2f} ms, "
            + ", ".join(f"C={c} x{r['speedup_p50']:.1f}" for c, r in row["two_stage"].items()),
            file=sys.stderr,
        )
        del index
    return rows
