"""`evaluate`'s stage-1 comparison: each ranker's category accuracy, what it does to two-stage search, its
cost; and stage 1's latency on a synthetic catalogue of many categories.

The rankers are trained by the server's own code (`stage1_models.train_rankers`, held-out tenth included)
on the catalogue's labels, and rank through the server's `Stage1.rank`.
"""

import time

import numpy as np
from threadpoolctl import threadpool_limits

from backend.core.vectors import PrototypeMatrix, StoredVectors, l2_normalise
from backend.evaluation import metrics
from backend.index.stage1_models import RANKERS, Centroids, LinearSoftmax, Trained, top_n_accuracy, train_rankers
from backend.index.two_stage import TwoStageIndex
from backend.search.stage1 import Stage1

TOP_C = (1, 3)
LATENCY_QUERIES = 300
SYNTHETIC_CATEGORIES, SYNTHETIC_DIM = 1_000, 1_280


def stage1_latency_ms(stage1: Stage1, index: TwoStageIndex, queries: np.ndarray) -> float:
    """Median milliseconds to rank every category for one query, as a request does."""
    timings = []
    with threadpool_limits(1, user_api="blas"):  # as the server ranks (`one_blas_thread`)
        for i in range(min(len(queries), LATENCY_QUERIES)):
            start = time.perf_counter()
            stage1.rank(index, queries[i : i + 1])
            timings.append(time.perf_counter() - start)
    return float(np.median(timings) * 1000)


def compare_rankers(index: TwoStageIndex, labels: np.ndarray, vectors: np.ndarray, q: np.ndarray, q_labels: np.ndarray) -> dict:
    """Train every ranker on the catalogue (`labels` are category numbers = index category ids) and measure
    each on the queries against exact search."""
    trained = train_rankers(np.arange(len(labels)), labels, vectors)
    exact = index.search(q, 10, None).ids
    rows = []
    for ranker in RANKERS:
        stage1 = Stage1(None, index.model, index.dim, ranker)
        stage1.use(trained, 0, None)
        ranking = stage1.rank(index, q)
        ranked_labels = np.asarray(index.category_ids)[ranking.positions]
        row = {
            "stage1": ranker,
            "top1": top_n_accuracy(ranked_labels, q_labels, 1),
            "top3": top_n_accuracy(ranked_labels, q_labels, 3),
            "heldout_top1": trained.heldout[ranker]["top1"],
            "latency_ms": stage1_latency_ms(stage1, index, q),
            "train_s": trained.train_seconds[ranker],
        }
        for c in TOP_C:
            hits = index.search(q, 10, ranking.positions[:, :c])
            rel = np.where(hits.ids >= 0, labels[np.maximum(hits.ids, 0)] == q_labels[:, None], False)
            row[f"P@10 C={c}"] = metrics.precision_at_k(rel, 10)
            row[f"R@10/exact C={c}"] = metrics.overlap_recall(hits.ids, exact, 10)
        rows.append(row)
    exact_rel = np.where(exact >= 0, labels[np.maximum(exact, 0)] == q_labels[:, None], False)
    return {"exact_P@10": metrics.precision_at_k(exact_rel, 10), "auto": trained.best(), "rows": rows}


def synthetic_latency(categories: int = SYNTHETIC_CATEGORIES, dim: int = SYNTHETIC_DIM, queries: int = 100) -> dict[str, float]:
    """Stage-1 latency per ranker for a catalogue of `categories` categories: rankers of the real shapes
    (16 sub-centroids a category, a dim x categories classifier) with random values; ranking cost does not
    depend on the values. The index holds one vector per category (stage 1 never reads the vectors)."""
    rng = np.random.default_rng(0)
    vectors = l2_normalise(rng.standard_normal((categories, dim), dtype=np.float32))
    cats = np.arange(categories, dtype=np.int64)
    index = TwoStageIndex.build(
        "synthetic", dim, cats.tolist(), StoredVectors(cats, cats, vectors), PrototypeMatrix.of(cats, vectors)
    )
    sub = l2_normalise(rng.standard_normal((categories * 16, dim), dtype=np.float32))
    trained = Trained(
        cats,
        LinearSoftmax(rng.standard_normal((dim, categories), dtype=np.float32), np.zeros(categories, np.float32)),
        Centroids(sub, np.arange(0, categories * 16 + 1, 16, dtype=np.int64)),
        dict.fromkeys(RANKERS, 1.0),
        {r: {"top1": 0.0, "top3": 0.0} for r in RANKERS},
    )
    q = l2_normalise(rng.standard_normal((queries, dim), dtype=np.float32))
    out = {}
    for ranker in RANKERS:
        stage1 = Stage1(None, "synthetic", dim, ranker)
        stage1.use(trained, 0, None)
        out[ranker] = stage1_latency_ms(stage1, index, q)
    return out


def format_stage1(report: dict) -> str:
    cols = ["top1", "top3", "P@10 C=1", "P@10 C=3", "R@10/exact C=1", "R@10/exact C=3", "latency_ms", "train_s"]
    lines = [
        f"stage 1 (exact search P@10 {report['exact_P@10']:.3f}; auto picks {report['auto']}):",
        f"{'stage1':<12}" + "".join(f"{c:>16}" for c in cols),
    ]
    for row in report["rows"]:
        lines.append(f"{row['stage1']:<12}" + "".join(f"{row[c]:>16.3f}" for c in cols))
    synthetic = report.get("synthetic_latency_ms")
    if synthetic:
        per = ", ".join(f"{r} {ms:.3f} ms" for r, ms in synthetic.items())
        lines.append(f"stage 1 latency, {SYNTHETIC_CATEGORIES} synthetic categories: {per}")
    return "\n".join(lines)
