"""Plot recall@10 against p50 latency for every method of the `indexes` benchmark section, a panel a
section; each file holds a report (`{"indexes": [...]}`) or one section (`fastscan_1m --json`).
python benchmarks/plot_indexes.py docs/results/benchmark_indexes.json [more.json ...] [--out docs/index_tradeoff.png]
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.core.config import PROJECT_ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, nargs="+", help="JSON of `benchmarks/run.py --json --sections indexes`")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "index_tradeoff.png")
    args = parser.parse_args()
    sections = []
    for path in args.reports:
        report = json.loads(path.read_text())
        sections += report["indexes"] if "indexes" in report else [report]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(5.2 * len(sections), 4.6), dpi=110, squeeze=False)
    for ax, section in zip(axes[0], sections, strict=True):
        methods: dict[str, list[dict]] = {}
        for row in section["rows"]:
            methods.setdefault(row["method"], []).append(row)
        for method, rows in methods.items():
            style = "o-" if method.startswith("ours") else ("s--" if "HNSW" in method else "^:")
            ax.plot([r["p50"] for r in rows], [r["recall@10"] for r in rows], style, label=method, markersize=4)
        ax.axhline(0.95 if "index_memory_gb" in section else 0.97, color="grey", linewidth=0.8, linestyle=":")  # the goal
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency of one query (ms, log)")
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title(f"{section['name']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
