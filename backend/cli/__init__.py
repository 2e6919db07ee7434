"""Command line: `python -m backend.cli COMMAND --help`.

Every failure a user can fix ends in one `error: ...` line on stderr and exit status 2. The commands live in
this package by concern (`catalogue`, `search`, `server`, `keys`, `evaluation`); `parser` wires them up.
"""

import signal
import sys

from pydantic import ValidationError

from backend.cli.parser import build_parser
from backend.core.config import get_settings
from backend.core.errors import AppError
from backend.storage.engine import DATABASE_ERRORS, database_problem
from backend.telemetry import configure_logging


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
