"""`evaluate`: retrieval quality of exact and two-stage search on a labelled dataset.

Catalogue = train split, queries = test split, relevant = same category. Runs the same TwoStageIndex
the server uses, on vectors embedded once per model and cached under DATA_DIR/cache/embeddings.
"""

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from backend.core.config import Settings
from backend.core.vectors import PrototypeMatrix, StoredVectors
from backend.embedding.cache import model_cache
from backend.embedding.embedder import Embedder
from backend.evaluation import metrics
from backend.evaluation.stage1 import compare_rankers, format_stage1, synthetic_latency
from backend.imaging import decode_image
from backend.index.stage1_models import top_n_accuracy
from backend.index.two_stage import TwoStageIndex
from backend.sources.datasets import Dataset, balanced, load_dataset

TOP_C = (1, 2, 3, 5)


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray
    labels: np.ndarray  # int category numbers
    names: list[str]


def embed_cached(dataset: Dataset, embedder: Embedder, settings: Settings, progress: bool = True) -> Embedded:
    names = dataset.categories
    key = hashlib.sha256("\n".join([embedder.model_id, *(s.source for s in dataset.samples)]).encode()).hexdigest()[:20]
    path = settings.cache_dir / "embeddings" / embedder.model_id.replace("/", "_") / f"{dataset.name}-{key}.npz"
    labels = np.array([names.index(s.label) for s in dataset.samples], dtype=np.int64)
    if path.is_file():
        return Embedded(np.load(path)["vectors"], labels, names)
    chunks = []
    batch = max(64, embedder.batch_size)
    with tqdm(total=len(dataset.samples), unit="img", desc=f"embed {dataset.name}", disable=not progress) as bar:
        for i in range(0, len(dataset.samples), batch):
            part = dataset.samples[i : i + batch]
            chunks.append(embedder.embed([decode_image(s.load(), settings.max_image_pixels, s.source).rgb for s in part]))
            bar.update(len(part))
    vectors = np.concatenate(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, vectors=vectors)
    return Embedded(vectors, labels, names)


def build_index(catalogue: Embedded, model: str) -> TwoStageIndex:
    """The server's index over in-memory vectors; prototypes are the normalised category means."""
    n_cat = len(catalogue.names)
    stored = StoredVectors(np.arange(len(catalogue.labels), dtype=np.int64), catalogue.labels, catalogue.vectors)
    prototypes = PrototypeMatrix.of(catalogue.labels, catalogue.vectors)
    return TwoStageIndex.build(model, catalogue.vectors.shape[1], list(range(n_cat)), stored, prototypes)


def evaluate_index(index: TwoStageIndex, catalogue: Embedded, queries: Embedded, k_max: int = 100) -> dict:
    """Metrics for exact search and for two-stage search with each top-C."""
    q = queries.vectors
    q_labels = np.array([catalogue.names.index(queries.names[i]) for i in queries.labels])
    n_relevant = np.bincount(catalogue.labels, minlength=len(catalogue.names))[q_labels]
    _, ranked = index.rank_categories(q)
    ranked_labels = np.array(index.category_ids)[ranked]
    n_cat = len(catalogue.names)
    configs: list[tuple[str, int | None]] = [("exact", None)] + [(f"two-stage C={c}", c) for c in TOP_C if c < n_cat]
    configs.append((f"two-stage C={n_cat} (all)", n_cat))
    exact_ids = None
    rows = []
    for name, top in configs:
        lists = None if top is None else ranked[:, :top]
        hits = index.search(q, k_max, lists)
        # Latency: one query at a time, as a user's request would run.
        timings = []
        for i in range(min(len(q), 300)):
            t = time.perf_counter()
            index.search(q[i : i + 1], 10, None if lists is None else lists[i : i + 1])
            timings.append(time.perf_counter() - t)
        if exact_ids is None:
            exact_ids = hits.ids
        rel = np.where(hits.ids >= 0, catalogue.labels[np.maximum(hits.ids, 0)] == q_labels[:, None], False)
        rows.append(
            {
                "search": name,
                "top_categories": top,
                "precision@10": metrics.precision_at_k(rel, 10),
                "recall@10": metrics.recall_at_k(rel, 10, n_relevant),
                "mAP@10": metrics.average_precision_at_k(rel, 10, n_relevant),
                "precision@100": metrics.precision_at_k(rel, 100),
                "recall@100": metrics.recall_at_k(rel, 100, n_relevant),
                "mAP@100": metrics.average_precision_at_k(rel, 100, n_relevant),
                "MRR": metrics.mean_reciprocal_rank(rel),
                "NDCG@10": metrics.ndcg_at_k(rel, 10, n_relevant),
                "F1@10": metrics.f1_at_k(rel, 10, n_relevant),
                "recall@10_vs_exact": metrics.overlap_recall(hits.ids, exact_ids, 10),
                "fraction_scanned": float(np.mean(hits.scanned / index.ntotal)),
                "latency_ms_p50": float(np.percentile(timings, 50) * 1000),
                "latency_ms_p95": float(np.percentile(timings, 95) * 1000),
            }
        )
    return {
        "catalogue_size": int(index.ntotal),
        "queries": len(q),
        "categories": n_cat,
        "prototype_top1_accuracy": top_n_accuracy(ranked_labels, q_labels, 1),
        "prototype_top3_accuracy": top_n_accuracy(ranked_labels, q_labels, 3),
        "rows": rows,
    }


def format_table(report: dict) -> str:
    cols = [
        "precision@10",
        "recall@10",
        "mAP@10",
        "precision@100",
        "recall@100",
        "mAP@100",
        "MRR",
        "NDCG@10",
        "F1@10",
        "recall@10_vs_exact",
        "fraction_scanned",
        "latency_ms_p50",
    ]
    short = ["P@10", "R@10", "mAP@10", "P@100", "R@100", "mAP@100", "MRR", "NDCG@10", "F1@10", "R@10/exact", "scanned", "ms p50"]
    lines = [
        f"{report['dataset']} with {report['model']}: {report['catalogue_size']} catalogue images, "
        f"{report['queries']} queries, {report['categories']} categories",
        f"nearest-prototype category accuracy: top-1 {report['prototype_top1_accuracy']:.3f}, "
        f"top-3 {report['prototype_top3_accuracy']:.3f}",
        f"{'search':<24}" + "".join(f"{s:>11}" for s in short),
    ]
    for row in report["rows"]:
        lines.append(f"{row['search']:<24}" + "".join(f"{row[c]:>11.3f}" for c in cols))
    return "\n".join(lines)


def evaluation_sets(args: argparse.Namespace, settings: Settings) -> tuple[Dataset, Dataset]:
    """The catalogue and the queries `evaluate` was asked for."""
    source: Path | None = args.source
    if args.dataset == "folder":
        # A folder has no splits: every fifth image of each category is a query, the rest the catalogue.
        everything = load_dataset("folder", source, "all", None, settings)
        position: dict[str, int] = {}
        split: dict[bool, list] = {True: [], False: []}
        for s in everything.samples:
            position[s.label] = position.get(s.label, -1) + 1
            split[position[s.label] % 5 == 4].append(s)
        return Dataset("folder", balanced(split[False], args.catalogue_size)), Dataset(
            "folder", balanced(split[True], args.queries)
        )
    return (
        load_dataset(args.dataset, source, "train", args.catalogue_size, settings),
        load_dataset(args.dataset, source, "test", args.queries, settings),
    )


def run_evaluation(args: argparse.Namespace, settings: Settings) -> dict:
    embedder = model_cache.get(settings, args.model)
    catalogue_set, query_set = evaluation_sets(args, settings)
    progress = not args.json
    catalogue = embed_cached(catalogue_set, embedder, settings, progress)
    queries = embed_cached(query_set, embedder, settings, progress)
    report = {"dataset": args.dataset, "model": embedder.model_id}
    index = build_index(catalogue, embedder.model_id)
    report.update(evaluate_index(index, catalogue, queries))
    q_labels = np.array([catalogue.names.index(queries.names[i]) for i in queries.labels])
    report["stage1"] = compare_rankers(index, catalogue.labels, catalogue.vectors, queries.vectors, q_labels)
    report["stage1"]["synthetic_latency_ms"] = synthetic_latency()
    print(json.dumps(report) if args.json else format_table(report) + "\n" + format_stage1(report["stage1"]))
    return report
