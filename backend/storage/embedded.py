"""The embedded PostgreSQL (pgserver) under DATA_DIR/pgdata, used when no database is configured.

It lives exactly as long as the processes using it. pgserver counts users in `pgdata/.handle_pids.json`
and stops the server at the last one's normal exit (atexit). Two gaps are closed here:
- a process killed with SIGKILL never runs atexit: each user starts a small watchdog process that waits
  for its owner to end, however it ends, and then releases the owner's handle and stops the server when
  no live process holds one;
- a dead process's pid left in the handle list would keep every later clean exit from stopping the
  server: dead pids are dropped on every start and release, and a server left running is adopted.
(SIGTERM is made a normal exit by the CLI, so atexit runs for it.)

`python -m backend.storage.embedded PGDATA PID` is the watchdog; its stdin is a pipe only the owner holds.
"""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from backend.core.config import Settings
from backend.core.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

_watchdogs: dict[Path, subprocess.Popen] = {}  # one per pgdata per process; kept so its pipe stays open


def _pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver
            import pgserver.postgres_server
    except ImportError as exc:  # pragma: no cover - pgserver is in requirements.txt
        raise DatabaseUnavailable(
            "no database configured and pgserver is not installed: pip install pgserver, or set DATABASE_URL"
        ) from exc
    return pgserver


def pgdata_of(settings: Settings) -> Path:
    return (settings.data_dir / "pgdata").resolve()


def _live_handles(pgdata: Path, leaving: int | None = None) -> list[int]:
    """The handle list without `leaving` and without dead processes (call with pgserver's lock held)."""
    import psutil
    from pgserver.utils import DiskList

    handles = DiskList(pgdata / ".handle_pids.json")
    try:
        pids = handles.get()
    except ValueError:  # a list torn by a crash mid-write
        pids = []
    alive = [p for p in pids if p != leaving and psutil.pid_exists(p)]
    if alive != pids:
        handles.put(alive)
    return alive


def running_pid(pgdata: Path) -> int | None:
    """The postmaster's pid when a server is running on `pgdata`."""
    from pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, AssertionError, ValueError):
        return None
    return info.pid if info is not None and info.is_running() else None


def release(pgdata: Path, owner: int) -> bool:
    """Drop `owner`'s handle; stop the server if no live process holds one. True when it was stopped."""
    pgserver = _pgserver()
    pg_ctl = pgserver._commands.pg_ctl  # made at import time: invisible to mypy

    with pgserver.postgres_server.PostgresServer._lock:
        if _live_handles(pgdata, leaving=owner) or running_pid(pgdata) is None:
            return False
        user = "pgserver" if os.name == "posix" and os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
        return True


def _start_watchdog(pgdata: Path) -> None:
    if pgdata in _watchdogs:
        return
    try:
        with open(pgdata.parent / "pgserver-watchdog.log", "ab") as log_file:
            _watchdogs[pgdata] = subprocess.Popen(
                [sys.executable, "-m", "backend.storage.embedded", str(pgdata), str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # Ctrl-C in the terminal must not end it before it has done its job
                cwd=Path(__file__).resolve().parents[2],
            )
    except OSError as exc:
        log.warning("no watchdog for the embedded PostgreSQL (%s): after a kill -9 it keeps running", exc)


def start(settings: Settings) -> URL:
    """Start (or adopt) the embedded server and return the URL of DB_NAME on it, creating that database."""
    pgdata = pgdata_of(settings)
    settings.prepare_data_dir()
    pgserver = _pgserver()
    try:
        with pgserver.postgres_server.PostgresServer._lock:
            stale = running_pid(pgdata) is not None and not _live_handles(pgdata)
        if stale:
            log.info("adopting the embedded PostgreSQL left running in %s by a process that was killed", pgdata)
        server = pgserver.get_server(pgdata)  # stops at the last user's exit
    except Exception as exc:
        raise DatabaseUnavailable(f"could not start the embedded PostgreSQL in {pgdata}: {exc}") from exc
    _start_watchdog(pgdata)
    url = make_url(server.get_uri()).set(drivername="postgresql+psycopg2")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{settings.db_name}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{settings.db_name}";')
    return url.set(database=settings.db_name)


def _watch(pgdata: Path, owner: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()  # EOF: the owner has exited, normally or not
    release(pgdata, owner)


if __name__ == "__main__":
    _watch(Path(sys.argv[1]), int(sys.argv[2]))
