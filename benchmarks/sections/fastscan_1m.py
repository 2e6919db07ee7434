"""fastscan against HNSW at 1M synthetic vectors, the two rows issue 20's 1M goal compares (the `indexes`
section's 1M run also builds every other index type, which takes far longer on a 2-core machine), and the
10M fastscan build alone (`--vectors 10000000`: no HNSW, whose 51 GB of float32 vectors do not fit here):
`python -m benchmarks.sections.fastscan_1m [--queries 300] [--ms 320,640] [--rerank 100,400] [--json PATH]`."""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from benchmarks.harness import hardware
from benchmarks.sections import indexes
from benchmarks.sections import indexes_fastscan as fs

IN_MEMORY_UP_TO = 2_000_000  # float32 vectors held at once for HNSW and the exact scan (10 GB)


def run(n: int, queries: int, ms: tuple[int, ...] = (320,), shortlists: tuple[int, ...] = (100,)) -> dict:
    stored = indexes.synthetic_catalogue(n)
    q, ql = indexes.synthetic_queries(queries)
    rows = partial(fs.rows, ms=ms, shortlists=shortlists)
    return fs.with_fastscan(indexes.compare(f"synthetic {n:,}", stored, q, ql, [], with_pgvector=False, more_rows=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--ms", default="320", help="comma-separated PQ sub-quantizer counts (FASTSCAN_M)")
    parser.add_argument("--rerank", default="100", help="comma-separated re-rank sizes (RERANK_CANDIDATES)")
    parser.add_argument("--json", type=Path, help="also write the section as JSON here")
    args = parser.parse_args()
    print(json.dumps(hardware()), file=sys.stderr)
    ms, shortlists = (tuple(int(v) for v in arg.split(",")) for arg in (args.ms, args.rerank))
    if args.vectors > IN_MEMORY_UP_TO:
        section = fs.ten_million(args.vectors, ms[0], shortlists)
    else:
        section = run(args.vectors, args.queries, ms, shortlists)
    for r in section["rows"]:
        line = f"{r['method']:45s} {r['knob']:16s} R@10 {r['recall@10']:.3f}  p50 {r['p50']:.3f} ms"
        print(f"{line}  {r['memory_mb']:.0f} MB  build {r['build_s']:.0f} s", file=sys.stderr)
    print(json.dumps(section.get("fastscan_goal", section.get("goal")), default=str), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware(), **section}, indent=1, default=str))


if __name__ == "__main__":
    main()
