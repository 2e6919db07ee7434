"""Plot two-stage recall@10 (against exact) versus stage-2 speed-up, for C = 1 ... all categories.

Recall is measured on real data (CIFAR-10 subset, the embeddings `evaluate` cached); speed-up on a
synthetic catalogue of --vectors clustered vectors with the same number of balanced categories.
    python benchmarks/plot_tradeoff.py [--vectors 100000] [--out docs/two_stage_tradeoff.png]
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.core.config import PROJECT_ROOT, get_settings
from backend.embedding.cache import model_cache
from backend.evaluation import metrics
from backend.evaluation.retrieval import Embedded, build_index, embed_cached
from backend.sources.datasets import load_dataset
from benchmarks.harness import N_CATEGORIES, clustered
from benchmarks.sections.search import time_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "two_stage_tradeoff.png")
    args = parser.parse_args()
    settings = get_settings()
    embedder = model_cache.get(settings)
    catalogue = embed_cached(load_dataset("cifar10", None, "train", None, settings), embedder, settings)
    queries = embed_cached(load_dataset("cifar10", None, "test", None, settings), embedder, settings)
    index = build_index(catalogue, embedder.model_id)
    _, ranked = index.rank_categories(queries.vectors)
    exact = index.search(queries.vectors, 10).ids
    n_cat = len(catalogue.names)
    recall = [
        metrics.overlap_recall(index.search(queries.vectors, 10, ranked[:, :c]).ids, exact, 10) for c in range(1, n_cat + 1)
    ]

    x, labels, q = clustered(args.vectors)
    synth = build_index(Embedded(x, labels, [str(i) for i in range(N_CATEGORIES)]), "synthetic")
    del x
    exact_p50 = time_search(synth, q, None, 200)["p50"]
    speedup = [exact_p50 / time_search(synth, q, c, 200)["p50"] for c in range(1, n_cat + 1)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(speedup, recall, "o-", color="#2f6fde")
    for c, (s, r) in enumerate(zip(speedup, recall, strict=True), start=1):
        ax.annotate(f"C={c}", (s, r), textcoords="offset points", xytext=(6, -10), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"stage-2 speed-up over exact search (p50, {args.vectors:,} vectors, {n_cat} categories)")
    ax.set_ylabel("recall@10 of two-stage vs exact (CIFAR-10, Lite0)")
    ax.set_title("Two-stage search: recall against speed-up")
    ax.grid(True, which="both", alpha=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out)
    result = {"C": list(range(1, n_cat + 1)), "recall@10_vs_exact": recall, "speedup_p50": speedup, "plot": str(args.out)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
