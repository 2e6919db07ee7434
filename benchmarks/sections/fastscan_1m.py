"""fastscan against HNSW at 1M synthetic vectors, the two rows issue 20's 1M goal compares (the `indexes`
section's 1M run also builds every other index type, which takes far longer on a 2-core machine):
`python -m benchmarks.sections.fastscan_1m [--queries 300] [--json PATH]`."""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np

from backend.vectors import StoredVectors
from benchmarks.harness import hardware
from benchmarks.sections import indexes
from benchmarks.sections import indexes_fastscan as fs


def run(n: int, queries: int, shortlists: tuple[int, ...] = (100,)) -> dict:
    parts = [indexes.synthetic_chunk(s, e) for s, e in indexes.chunks(n, 100_000)]
    stored = StoredVectors(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "category_ids", "vectors")))
    del parts
    q, ql = indexes.synthetic_queries(queries)
    rows = partial(fs.rows, ms=(320,), shortlists=shortlists)
    return fs.with_fastscan(indexes.compare(f"synthetic {n:,}", stored, q, ql, [], with_pgvector=False, more_rows=rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rerank", default="100", help="comma-separated re-rank sizes (RERANK_CANDIDATES)")
    parser.add_argument("--json", type=Path, help="also write the section as JSON here")
    args = parser.parse_args()
    print(json.dumps(hardware()), file=sys.stderr)
    section = run(args.vectors, args.queries, tuple(int(r) for r in args.rerank.split(",")))
    for r in section["rows"]:
        line = f"{r['method']:45s} {r['knob']:16s} R@10 {r['recall@10']:.3f}  p50 {r['p50']:.3f} ms"
        print(f"{line}  {r['memory_mb']:.0f} MB  build {r['build_s']:.0f} s", file=sys.stderr)
    print(json.dumps(section.get("fastscan_goal", section.get("goal")), default=str), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(section, indent=1, default=str))
