"""`evaluate` (retrieval quality) and `benchmark` (forwards to benchmarks/run.py)."""

import argparse
import sys
from pathlib import Path

from backend.cli.argtypes import int_in
from backend.cli.common import Command
from backend.core.config import Settings
from backend.core.errors import AppError
from backend.sources.datasets import DATASETS


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> None:
    from backend.evaluation.precision import run_comparison
    from backend.evaluation.retrieval import run_evaluation

    (run_comparison if args.compare_int8 else run_evaluation)(args, settings)


def cmd_benchmark(args: argparse.Namespace, settings: Settings) -> None:
    """Forwards to benchmarks/run.py: the benchmarks are not part of the product."""
    import subprocess

    from backend.core.config import PROJECT_ROOT

    script = PROJECT_ROOT / "benchmarks" / "run.py"
    if not script.is_file():
        raise AppError(f"{script} not found: the benchmarks ship with the source tree")
    code = subprocess.call([sys.executable, str(script), *args.benchmark_args])
    if code:
        raise SystemExit(code)


def add_evaluate_command(command: Command) -> None:
    p = command("evaluate", cmd_evaluate, "retrieval quality of exact and two-stage search on a labelled dataset")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--source", type=Path)
    p.add_argument("--catalogue-size", type=int_in(1), help="train-split images in the catalogue (default: all)")
    p.add_argument("--queries", type=int_in(1), help="test-split query images (default: all)")
    p.add_argument("--model", help="embedding model (default MODEL_NAME)")
    p.add_argument("--compare-int8", action="store_true", help="fp32 against int8 embeddings (EMBED_PRECISION)")
    p.add_argument("--json", action="store_true")


def add_benchmark_command(command: Command) -> None:
    command("benchmark", cmd_benchmark, "speed benchmarks: forwards its arguments to benchmarks/run.py (--help there)")
