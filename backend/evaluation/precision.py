"""`evaluate --compare-int8`: what EMBED_PRECISION=int8 costs in retrieval quality against fp32.

Both precisions embed the same catalogue and queries (cached per model id under DATA_DIR/cache/embeddings)
and are evaluated with the same index; on top of each one's own P@10, mAP@10 and stage-1 accuracy, the
top-10 lists are compared directly (how many of fp32's exact neighbours int8 still finds) and the query
vectors themselves (cosine of int8 to fp32).
"""

import argparse
import json

import numpy as np

from backend.core.config import Settings
from backend.embedding.cache import model_cache
from backend.evaluation import metrics
from backend.evaluation.retrieval import Embedded, build_index, embed_cached, evaluate_index, evaluation_sets
from backend.sources.datasets import Dataset

PRECISIONS = ("fp32", "int8")
TWO_STAGE = "two-stage C=3"


def compare(runs: dict[str, tuple[Embedded, Embedded]], model_ids: dict[str, str]) -> dict:
    """`runs`: precision -> (catalogue, queries) embedded with it, same images in the same order."""
    rows, top10 = {}, {}
    for precision, (catalogue, queries) in runs.items():
        index = build_index(catalogue, model_ids[precision])
        quality = evaluate_index(index, catalogue, queries)
        by_name = {r["search"]: r for r in quality["rows"]}
        two_stage = by_name.get(TWO_STAGE, by_name["exact"])
        rows[precision] = {
            "model": model_ids[precision],
            "precision@10": by_name["exact"]["precision@10"],
            "mAP@10": by_name["exact"]["mAP@10"],
            "precision@10_two_stage": two_stage["precision@10"],
            "stage1_top1": quality["prototype_top1_accuracy"],
        }
        top10[precision] = index.search(queries.vectors, 10).ids
    cosine = np.sum(runs["fp32"][1].vectors * runs["int8"][1].vectors, axis=1)
    return {
        "catalogue_size": len(runs["fp32"][0].labels),
        "queries": len(runs["fp32"][1].labels),
        "precisions": rows,
        "top10_overlap": metrics.overlap_recall(top10["int8"], top10["fp32"], 10),
        "query_cosine_mean": float(cosine.mean()),
        "query_cosine_min": float(cosine.min()),
    }


def format_comparison(report: dict) -> str:
    cols = ("precision@10", "mAP@10", "precision@10_two_stage", "stage1_top1")
    lines = [
        f"{report['dataset']}: fp32 against int8, {report['catalogue_size']} catalogue images, {report['queries']} queries",
        f"{'precision':<10}" + "".join(f"{c:>24}" for c in cols),
    ]
    for precision, row in report["precisions"].items():
        lines.append(f"{precision:<10}" + "".join(f"{row[c]:>24.4f}" for c in cols))
    lines.append(
        f"int8 keeps {report['top10_overlap']:.1%} of fp32's exact top-10 neighbours; query cosine int8/fp32 "
        f"mean {report['query_cosine_mean']:.4f}, min {report['query_cosine_min']:.4f}"
    )
    return "\n".join(lines)


def embedded_both(
    settings: Settings, model: str | None, catalogue: Dataset, queries: Dataset, progress: bool
) -> tuple[dict[str, tuple[Embedded, Embedded]], dict[str, str]]:
    runs, ids = {}, {}
    for precision in PRECISIONS:
        embedder = model_cache.get(settings, model, precision=precision)
        runs[precision] = (
            embed_cached(catalogue, embedder, settings, progress),
            embed_cached(queries, embedder, settings, progress),
        )
        ids[precision] = embedder.model_id
    return runs, ids


def run_comparison(args: argparse.Namespace, settings: Settings) -> dict:
    runs, ids = embedded_both(settings, args.model, *evaluation_sets(args, settings), progress=not args.json)
    report = {"dataset": args.dataset, **compare(runs, ids)}
    print(json.dumps(report) if args.json else format_comparison(report))
    return report
