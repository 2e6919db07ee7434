"""The server's commands: serve (the HTTP API and web page), worker (catalogue-job chunks), jobs."""

import argparse
import logging

from backend.cli.argtypes import int_in
from backend.cli.common import Command, require_schema
from backend.core.config import Settings
from backend.core.errors import AppError
from backend.core.memory import limit_malloc_arenas


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    limit_malloc_arenas()  # before the request, job and ONNX Runtime threads start

    from backend.api.security import check_auth_mode

    host = args.host or settings.api_host
    warning = check_auth_mode(settings, host)  # AUTH_MODE=off on a reachable address is refused here
    require_schema()  # a missing or unreachable database is one error line here, not a traceback at start-up
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
    from backend.services.assembly import run_worker_process
    from backend.storage.engine import get_engine

    limit_malloc_arenas()
    require_schema()
    concurrency = args.concurrency or settings.worker_concurrency
    print(f"worker: {concurrency} chunk(s) at a time; Ctrl-C stops it", flush=True)
    run_worker_process(settings, get_engine(), concurrency)


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> None:
    from backend.services.jobs import Jobs
    from backend.storage.engine import get_engine

    limit_malloc_arenas()
    require_schema()
    jobs = Jobs(settings, get_engine())
    if args.action != "list" and args.id is None:
        raise AppError(f"jobs {args.action} needs a job id (see: jobs list)")
    if args.action == "list":
        found = jobs.newest()
    elif args.action == "show":
        found = [jobs.get(args.id)]
    else:
        found = [jobs.cancel(args.id)]
    for job in found:
        rate = job.images_per_s
        print(
            f"job {job.id} {job.kind:<8} {job.state:<10} {job.done}/{job.total} done: {job.added} added, "
            f"{job.duplicates} duplicates, {job.failed} failed, {job.skipped} skipped"
            + (f"; {rate:.1f} images/s" if rate else "")
            + (f"; {job.message}" if job.message else "")
        )
        if args.action == "show":
            for failure in job.failures:
                print(f"  failed: {failure['source']}: {failure['reason']}")


def add_worker_commands(command: Command) -> None:
    p = command("worker", cmd_worker, "run catalogue-job chunks (any number of workers, on any machine)")
    p.add_argument("--concurrency", type=int_in(1, 64), help="chunks at a time (default WORKER_CONCURRENCY)")

    p = command("jobs", cmd_jobs, "catalogue jobs: list, show one, cancel one")
    p.add_argument("action", choices=("list", "show", "cancel"))
    p.add_argument("id", nargs="?", type=int_in(1, 2**63 - 1), help="job id (show, cancel)")


def add_serve_command(command: Command) -> None:
    p = command("serve", cmd_serve, "start the HTTP API and web page")
    p.add_argument("--host")
    p.add_argument("--port", type=int_in(1, 65535))
