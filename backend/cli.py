"""Command line: `python -m backend.cli COMMAND --help`.

Every failure a user can fix ends in one `error: ...` line on stderr and exit status 2.
"""

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError

from backend.core import search_params
from backend.core.config import Settings, get_settings
from backend.core.errors import AppError
from backend.datasets import DATASETS
from backend.db.session import DATABASE_ERRORS, database_problem

if TYPE_CHECKING:  # the service pulls in torch and FAISS: imported lazily so `--help` stays fast
    from backend.service import SearchResult, SearchService


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], else argparse's one `error:` line and exit 2."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            wanted = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is not allowed: must be {wanted}")
        return value

    return parse


def _service(settings: Settings) -> "SearchService":
    from backend.service import SearchService

    return SearchService(settings)


def cmd_init_db(args: argparse.Namespace, settings: Settings) -> None:
    from backend.db import migrate
    from backend.db.session import get_engine, location

    engine = get_engine()
    revision = migrate.upgrade(engine)
    print(f"database ready at schema revision {revision} ({location(settings, engine)})")


def _require_schema() -> None:
    from backend.db import migrate
    from backend.db.session import get_engine

    current = migrate.current_revision(get_engine())
    if current != migrate.head_revision():
        raise AppError(f"database schema is at {current or 'nothing'}, not {migrate.head_revision()}: run init-db first")


def cmd_populate(args: argparse.Namespace, settings: Settings) -> None:
    from backend.datasets import load_dataset
    from backend.db.session import get_engine
    from backend.embedding.registry import create_embedder
    from backend.ingest import ingest

    _require_schema()
    dataset = load_dataset(args.dataset, args.source, args.split, args.num_images, settings)
    embedder = create_embedder(settings)
    report = ingest(
        dataset, embedder, get_engine(), settings.max_image_pixels, batch_size=args.batch_size, progress=not args.quiet
    )
    print(
        f"{report.added} images added, {report.already_stored} already stored, {report.invalid} unreadable, "
        f"{report.skipped_files} files skipped; {report.images_per_second:.1f} images/s ({report.model})"
    )
    for line in [*dataset.notes, *report.errors]:
        print(f"  skipped: {line}", file=sys.stderr)


def cmd_build_index(args: argparse.Namespace, settings: Settings) -> None:
    _require_schema()
    service = _service(settings)
    index = service.cache.rebuild("requested by build-index")
    print(f"index for {service.model}: {index.ntotal} vectors in {len(index.category_ids)} categories, {service.cache.origin}")


def cmd_rebuild_prototypes(args: argparse.Namespace, settings: Settings) -> None:
    _require_schema()
    service = _service(settings)
    print(f"{service.rebuild_prototypes()} prototypes recomputed for {service.model}")


def cmd_search(args: argparse.Namespace, settings: Settings) -> None:
    from backend.core.search_params import SearchParams
    from backend.imaging import decode_image

    params = SearchParams.resolve(settings, args.limit, args.top_categories, args.use_prototypes)
    _require_schema()
    images = []
    for path in args.images:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise AppError(f"{path}: cannot read ({exc.strerror})") from exc
        images.append(decode_image(data, settings.max_image_pixels, name=str(path)).rgb)
    service = _service(settings)
    results = service.search(images, params)
    for path, result in zip(args.images, results, strict=True):
        if args.json:
            print(json.dumps({"query": str(path), **_result_dict(result)}))
            continue
        mode = f"two-stage, top {params.top_categories} categories" if params.use_prototypes else "exact"
        print(
            f"{path}  ({mode}; scanned {result.vectors_scanned}/{result.vectors_total} vectors; "
            f"{result.timings_ms['total']:.1f} ms)"
        )
        ranking = ", ".join(f"{c.category}{'*' if c.searched else ''} {c.score:.3f}" for c in result.categories[:5])
        print(f"  categories: {ranking}")
        for hit in result.results:
            print(f"  {hit.rank:>3}. image {hit.image_id:<8} {hit.category or '-':<14} cosine {hit.score:.4f}")


def _result_dict(result: "SearchResult") -> dict:
    return {
        "results": [asdict(h) for h in result.results],
        "categories": [{"category": c.category, "score": c.score, "searched": c.searched} for c in result.categories],
        "searched_categories": result.searched_categories,
        "use_prototypes": result.use_prototypes,
        "vectors_scanned": result.vectors_scanned,
        "vectors_total": result.vectors_total,
        "timings_ms": result.timings_ms,
    }


def cmd_status(args: argparse.Namespace, settings: Settings) -> None:
    _require_schema()
    service = _service(settings)
    service.cache.get()  # loads the verified cache and applies later changes, or rebuilds from the database
    status = service.status()
    if args.json:
        print(status.model_dump_json())
        return
    db, idx = status.database, status.index
    print(f"database  {db.server}")
    print(f"model     {status.model.id} on {status.model.device}")
    print(f"images    {db.images} ({db.vectors_for_model} with {status.model.id} vectors)")
    print(f"index     {idx.type}: {idx.vectors} vectors, {'current' if idx.current else 'stale or not loaded'} ({idx.origin})")
    for cat in db.categories:
        print(f"  {cat.name:<20} {cat.images:>7} images ({cat.labelled} labelled)")


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    _require_schema()  # a missing or unreachable database is one error line here, not a traceback at start-up

    uvicorn.run(
        "backend.api.main:create_app",
        factory=True,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_level="info",
    )


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> None:
    from backend.evaluation import run_evaluation

    run_evaluation(args, settings)


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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One `error:` line and exit status 2, like every other mistake (`--help` shows the usage)."""
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m backend.cli", description="Image similarity search")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    command("init-db", cmd_init_db, "create or upgrade the database schema (alembic upgrade head)")

    p = command("populate", cmd_populate, "embed and store a labelled dataset")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--source", type=Path, help="local dataset folder (CIFAR10_DIR / FASHION_MNIST_DIR by default)")
    p.add_argument("--split", choices=("train", "test", "all"), default="train")
    p.add_argument("--num-images", type=int_in(1), help="at most N images, balanced over categories")
    p.add_argument("--batch-size", type=int_in(1, 4096), default=128, help="images per transaction")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    command("build-index", cmd_build_index, "rebuild the FAISS index from the stored vectors")
    command("rebuild-prototypes", cmd_rebuild_prototypes, "recompute category prototypes from stored vectors")

    p = command("search", cmd_search, "find images similar to the given image files")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--limit", type=int_in(search_params.LIMIT_MIN, search_params.LIMIT_MAX), help=search_params.LIMIT_HELP)
    p.add_argument(
        "--top-categories",
        type=int_in(search_params.TOP_CATEGORIES_MIN, search_params.TOP_CATEGORIES_MAX),
        help=search_params.TOP_CATEGORIES_HELP,
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--no-prototypes", dest="use_prototypes", action="store_false", default=None, help="exact search over all vectors"
    )
    group.add_argument("--prototypes", dest="use_prototypes", action="store_true", help="two-stage search")
    p.add_argument("--json", action="store_true", help="one JSON object per query image per line")

    p = command("status", cmd_status, "catalogue, model and index state")
    p.add_argument("--json", action="store_true")

    p = command("serve", cmd_serve, "start the HTTP API and web page")
    p.add_argument("--host")
    p.add_argument("--port", type=int_in(1, 65535))

    p = command("evaluate", cmd_evaluate, "retrieval quality of exact and two-stage search on a labelled dataset")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--source", type=Path)
    p.add_argument("--catalogue-size", type=int_in(1), help="train-split images in the catalogue (default: all)")
    p.add_argument("--queries", type=int_in(1), help="test-split query images (default: all)")
    p.add_argument("--model", help="embedding model (default MODEL_NAME)")
    p.add_argument("--json", action="store_true")

    command("benchmark", cmd_benchmark, "speed benchmarks: forwards its arguments to benchmarks/run.py (--help there)")
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # A normal exit, so atexit handlers run: the embedded PostgreSQL is stopped with us. (uvicorn handles
    # SIGTERM itself while serving, then restores this handler and raises the signal again.)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "benchmark":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.benchmark_args = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = get_settings()
        if args.command != "benchmark":
            settings.prepare_data_dir()
        args.func(args, settings)
    except AppError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except DATABASE_ERRORS as exc:
        print(f"error: database unavailable: {database_problem(exc)}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"error: invalid setting: {problems}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
