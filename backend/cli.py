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

from backend import cli_search
from backend.auth import SCOPES
from backend.cli_search import int_in
from backend.core.config import Settings, get_settings
from backend.core.errors import AppError
from backend.datasets import DATASETS
from backend.storage.engine import DATABASE_ERRORS, database_problem
from backend.telemetry import configure_logging

if TYPE_CHECKING:  # the service pulls in torch and FAISS: imported lazily so `--help` stays fast
    from backend.service import SearchService


def _service(settings: Settings) -> "SearchService":

    return SearchService(settings)


def cmd_init_db(args: argparse.Namespace, settings: Settings) -> None:
    from backend.storage import migrate
    from backend.storage.engine import get_engine, location

    engine = get_engine()
    revision = migrate.upgrade(engine)
    print(f"database ready at schema revision {revision} ({location(settings, engine)})")


def _require_schema() -> None:
    from backend.storage import migrate
    from backend.storage.engine import get_engine

    current = migrate.current_revision(get_engine())
    if current != migrate.head_revision():
        raise AppError(f"database schema is at {current or 'nothing'}, not {migrate.head_revision()}: run init-db first")


def cmd_populate(args: argparse.Namespace, settings: Settings) -> None:
    from backend.datasets import load_dataset
    from backend.embedding.cache import model_cache
    from backend.embedding.registry import model_id
    from backend.ingest.populate import ingest
    from backend.storage.engine import get_engine

    _require_schema()
    dataset = load_dataset(args.dataset, args.source, args.split, args.num_images, settings)
    if args.background:  # a catalogue job: any worker (serve's own, `worker` processes) embeds it
        from backend import jobs

        engine = get_engine()
        model = model_id(settings)
        params = {"dataset": args.dataset, "split": args.split, "num_images": args.num_images}
        job_id = jobs.create_job(settings, engine, "dataset", model, params | {"source": args.source and str(args.source)}, None)
        queue = jobs.open_queue(engine)
        try:
            staged = jobs.stage_job(settings, engine, queue, job_id) or jobs.Staged()
        finally:
            queue.close()
        print(f"job {job_id}: {staged.total} images in {staged.chunks} chunks queued; follow it with: jobs show {job_id}")
        return
    embedder = model_cache.get(settings)
    report = ingest(
        dataset, embedder, get_engine(), settings.max_image_pixels, batch_size=args.batch_size, progress=not args.quiet
    )
    print(
        f"{report.added} images added, {report.duplicates} already stored, {report.failed} unreadable, "
        f"{report.skipped} files skipped; {report.images_per_second:.1f} images/s ({embedder.model_id})"
    )
    for line in [*dataset.notes, *(f["reason"] for f in report.failures)]:
        print(f"  skipped: {line}", file=sys.stderr)


def cmd_build_index(args: argparse.Namespace, settings: Settings) -> None:
    _require_schema()
    service = _service(settings)
    index = service.rebuild_index("requested by build-index")
    print(f"index for {service.model}: {index.ntotal} vectors in {len(index.category_ids)} categories, {service.cache.origin}")
    print(f"stage 1: {service.stage1.ranker} (STAGE1={settings.stage1}; {service.stage1.reason})")


def cmd_rebuild_prototypes(args: argparse.Namespace, settings: Settings) -> None:
    _require_schema()
    service = _service(settings)
    print(f"{service.rebuild_prototypes()} prototypes recomputed for {service.model}")


def cmd_search(args: argparse.Namespace, settings: Settings) -> None:
    def open_service() -> "SearchService":
        _require_schema()
        return _service(settings)

    cli_search.run(args, settings, open_service)


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
    print(f"index     {idx.type} ({idx.why}): {idx.vectors} vectors, {'current' if idx.current else 'stale'} ({idx.origin})")
    rerank = f" re-ranked from {idx.rerank}" if idx.rerank != "none" else ""
    print(
        f"          {idx.codec} codec{rerank}, {idx.lists} lists, nprobe {idx.default_nprobe}, {idx.memory_bytes / 2**20:.1f} MiB"
    )
    for reason in idx.retrain:
        print(f"          retrain on the next build-index: {reason}")
    print(f"stage 1   {status.stage1.ranker} (STAGE1={status.stage1.setting}): {status.stage1.reason}")
    for cat in db.categories:
        print(f"  {cat.name:<20} {cat.images:>7} images ({cat.labelled} labelled)")


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from backend.api.security import check_auth_mode

    host = args.host or settings.api_host
    warning = check_auth_mode(settings, host)  # AUTH_MODE=off on a reachable address is refused here
    _require_schema()  # a missing or unreachable database is one error line here, not a traceback at start-up
    if warning:
        logging.getLogger("backend.api").warning(warning)
    # Our logging (LOG_FORMAT), and our own one line per request instead of uvicorn's access log.
    uvicorn.run(
        "backend.api.main:create_app",
        factory=True,
        host=host,
        port=args.port or settings.api_port,
        log_config=None,
        access_log=False,
    )


def cmd_worker(args: argparse.Namespace, settings: Settings) -> None:
    """Run catalogue-job chunks until SIGINT/SIGTERM; start as many as you like, on any machine."""
    from backend import jobs
    from backend.storage.engine import get_engine

    _require_schema()
    print(f"worker: {args.concurrency or settings.worker_concurrency} chunk(s) at a time; Ctrl-C stops it", flush=True)
    engine = get_engine()
    queue = jobs.open_queue(engine)
    try:  # staging that a crash on this machine interrupted goes on (in threads) beside the chunks
        jobs.sweep_job_files(settings, engine)
        jobs.resume_staging(settings, engine, queue)
        jobs.run_worker(settings, engine, args.concurrency or settings.worker_concurrency)
    finally:
        queue.close()


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> None:
    from backend import jobs
    from backend.storage.engine import get_engine

    _require_schema()
    engine = get_engine()
    if args.action != "list" and args.id is None:
        raise AppError(f"jobs {args.action} needs a job id (see: jobs list)")
    if args.action == "list":
        found = jobs.list_jobs(engine)
    elif args.action == "show":
        found = [jobs.get_job(engine, args.id)]
    else:
        found = [jobs.cancel_job(engine, args.id)]
        jobs.remove_job_files(settings, args.id)
    for job in found:
        rate = jobs.images_per_second(job)
        print(
            f"job {job.id} {job.kind:<8} {job.state:<10} {job.done}/{job.total} done: {job.added} added, "
            f"{job.duplicates} duplicates, {job.failed} failed, {job.skipped} skipped"
            + (f"; {rate:.1f} images/s" if rate else "")
            + (f"; {job.message}" if job.message else "")
        )
        if args.action == "show":
            for failure in job.failures:
                print(f"  failed: {failure['source']}: {failure['reason']}")


def cmd_api_key(args: argparse.Namespace, settings: Settings) -> None:
    from backend import auth
    from backend.storage.engine import session_scope

    _require_schema()
    if args.action == "create":
        with session_scope() as session:
            info, key = auth.create_key(session, args.name, args.scope)
        print(f"API key {info.prefix} '{info.name}' with scopes {', '.join(info.scopes)} (shown once, store it now):")
        print(key)
    elif args.action == "list":
        with session_scope() as session:
            keys = auth.list_keys(session, include_revoked=args.all)
        if args.json:
            print(json.dumps([asdict(k) for k in keys], default=str))
            return
        print(f"{'id':>4}  {'prefix':<8}  {'name':<20} {'scopes':<24} {'created':<20} {'last used':<20} revoked")
        for k in keys:
            when = [t.strftime("%Y-%m-%d %H:%M:%S") if t else "-" for t in (k.created_at, k.last_used_at, k.revoked_at)]
            print(f"{k.id:>4}  {k.prefix:<8}  {k.name:<20} {','.join(k.scopes):<24} {when[0]:<20} {when[1]:<20} {when[2]}")
    elif args.action == "revoke":
        with session_scope() as session:
            info = auth.revoke(session, args.key)
        print(f"API key {info.prefix} '{info.name}' revoked")
    else:  # ensure-admin: the one-command start's key, created once and kept where only this user reads it
        path = args.file or settings.admin_key_file
        _ensure_admin_key(path)


def _ensure_admin_key(path: Path) -> None:
    import os

    from backend import auth
    from backend.storage.engine import session_scope

    existing = path.read_text().strip() if path.is_file() else ""
    with session_scope() as session:
        if existing and auth.key_is_valid(session, existing, "admin"):
            print(f"admin API key: {path} (send it as X-API-Key; the web page asks for it when a change needs it)")
            return
        _, key = auth.create_key(session, "admin", ["admin"])
        # Written before the transaction commits: a key that could not be saved is never created.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
        os.chmod(path.with_suffix(".tmp"), 0o600)
        os.replace(path.with_suffix(".tmp"), path)
    print(f"created an admin API key and saved it to {path} (readable only by you). Use it with")
    print(f'  curl -H "X-API-Key: $(cat {path})" ...')
    print("and paste it into the web page when it asks (it is kept until the tab is closed).")


def cmd_backup(args: argparse.Namespace, settings: Settings) -> None:
    from backend.backup import backup
    from backend.storage.engine import get_engine

    _require_schema()
    size = backup(get_engine(), args.file)
    print(f"backup written to {args.file} ({size / 1e6:.1f} MB, pg_dump custom format)")


def cmd_restore(args: argparse.Namespace, settings: Settings) -> None:
    from backend.backup import restore
    from backend.storage.engine import get_engine, location

    engine = get_engine()
    where = location(settings, engine)
    if not args.yes:
        if not sys.stdin.isatty():
            raise AppError(f"restore replaces every image, key and vector in {where}: pass --yes to confirm")
        if input(f"Replace the whole catalogue in {where} with {args.file}? Type yes: ").strip() != "yes":
            raise AppError("restore cancelled")
    restore(engine, args.file)
    print(f"restored {args.file} into {where}; index caches will be rebuilt from it (stop running servers first)")


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> None:
    from backend.evaluation import run_evaluation
    from backend.precision_cost import run_comparison

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
    p.add_argument("--background", action="store_true", help="queue a catalogue job for the workers and return")

    command("build-index", cmd_build_index, "rebuild the FAISS index from the stored vectors")
    command("rebuild-prototypes", cmd_rebuild_prototypes, "recompute category prototypes from stored vectors")

    cli_search.add_arguments(command("search", cmd_search, "find images similar to the given image files or URLs"))

    p = command("worker", cmd_worker, "run catalogue-job chunks (any number of workers, on any machine)")
    p.add_argument("--concurrency", type=int_in(1, 64), help="chunks at a time (default WORKER_CONCURRENCY)")

    p = command("jobs", cmd_jobs, "catalogue jobs: list, show one, cancel one")
    p.add_argument("action", choices=("list", "show", "cancel"))
    p.add_argument("id", nargs="?", type=int_in(1, 2**63 - 1), help="job id (show, cancel)")

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
    p.add_argument("--compare-int8", action="store_true", help="fp32 against int8 embeddings (EMBED_PRECISION)")
    p.add_argument("--json", action="store_true")

    p = command("api-key", cmd_api_key, "create, list and revoke API keys")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", help="a new key, printed once")
    k.add_argument("--name", required=True)
    k.add_argument("--scope", action="append", required=True, choices=SCOPES, help="repeat for several scopes")
    k = keys.add_parser("list", help="keys with name, scopes, creation and last use (never the keys themselves)")
    k.add_argument("--all", action="store_true", help="include revoked keys")
    k.add_argument("--json", action="store_true")
    k = keys.add_parser("revoke", help="revoke a key by id, prefix or name")
    k.add_argument("key")
    k = keys.add_parser("ensure-admin", help="create an admin key saved to a file (mode 600) unless the file holds a valid one")
    k.add_argument("--file", type=Path, help="default: DATA_DIR/admin.key")

    p = command("backup", cmd_backup, "write the whole database to FILE (pg_dump custom format)")
    p.add_argument("file", type=Path)
    p = command("restore", cmd_restore, "replace the whole database with a backup FILE (stop servers first)")
    p.add_argument("file", type=Path)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

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
    try:
        settings = get_settings()
        configure_logging(settings.log_format, args.verbose, serving=args.command in ("serve", "worker"))
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
