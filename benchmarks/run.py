"""Speed benchmarks: `python benchmarks/run.py [--quick] [--json] [--sections a,b]` (or `python -m backend.cli
benchmark ...`, which forwards here).

Sections: embed (model throughput), precision (int8 against fp32), search (exact vs two-stage latency at
10k/100k/1M vectors), build (index from the database, and a server following another process's writes
against a full rebuild), http (POST /search under concurrency), ingest (end to end vs embedding alone), jobs,
cluster (stage 2 in-process against a 3-node local Ray cluster; needs requirements-cluster.txt),
scale (every endpoint of a real server at N vectors).
Every database it needs is a throwaway one on an embedded PostgreSQL started once per run.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.core.config import Settings, get_settings
from benchmarks.harness import hardware
from benchmarks.report import print_report
from benchmarks.sections import build, cluster, embed, http, indexes, ingest, jobs, precision, scale, search

SECTIONS = ("embed", "precision", "search", "indexes", "build", "http", "ingest", "jobs", "cluster", "scale")


def run_benchmarks(args: argparse.Namespace, settings: Settings) -> dict:
    wanted = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")
    report: dict = {"mode": "quick" if args.quick else "full", "hardware": hardware()}
    steps: dict[str, Callable[[], object]] = {
        "embed": lambda: embed.run(settings, args.quick),
        "precision": lambda: precision.run(settings, args.quick),
        "search": lambda: search.run(args.quick),
        "indexes": lambda: indexes.run(settings, args.quick, tuple(args.index_sizes.split(","))),
        "build": lambda: build.run(args.quick),
        "http": lambda: http.run(settings, args.quick),
        "ingest": lambda: ingest.run(settings, args.quick),
        "jobs": lambda: jobs.run(settings, args.quick),
        "scale": lambda: scale.run(
            settings,
            args.quick,
            tuple(int(n) for n in (args.scale_sizes or ("2000" if args.quick else "2000,100000")).split(",")),
            args.scale_database_url,
        ),
        "cluster": lambda: cluster.run(args.quick),  # needs requirements-cluster.txt
    }
    report["seconds"] = {}  # per section: what keeps --quick under a minute, or not
    for name in SECTIONS:
        if name in wanted:
            start = time.perf_counter()
            report[name] = steps[name]()
            report["seconds"][name] = round(time.perf_counter() - start, 1)
            print(f"  ({name}: {report['seconds'][name]} s)", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sections", help="comma-separated subset: " + ",".join(SECTIONS))
    parser.add_argument("--index-sizes", default="real,1M,10M", help="indexes section: comma-separated subset of real,1M,10M")
    parser.add_argument(
        "--scale-sizes", help="scale section: catalogue sizes, the first the baseline (2000,100000; --quick 2000)"
    )
    parser.add_argument("--scale-database-url", help="scale section: run the largest size on this database (seeded up to it)")
    run_benchmarks(parser.parse_args(), get_settings())
