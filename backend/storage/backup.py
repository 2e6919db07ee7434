"""Backups of the catalogue database: pg_dump / pg_restore in PostgreSQL's custom format.

The binaries are the embedded server's own (pgserver ships PostgreSQL 16's) or the system's, whichever is
new enough for the server: pg_dump refuses a server newer than itself. A backup is written under a
temporary name and renamed into place, so a failed one never leaves a half-written file; a restore runs
in one transaction, so a failed one leaves the database as it was. A restored database gets a new
catalogue id: every index cache built before (for the old contents) is then rebuilt, never believed.
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from backend.core.errors import AppError, DatabaseUnavailable
from backend.storage import change_log, embedded, migrate
from backend.storage.engine import server_major_version, session_scope

TOOL_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Tool:
    path: Path
    major: int


def _version(binary: Path) -> int | None:
    try:
        out = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(match.group(1)) if match else None


def _candidates(name: str) -> list[Path]:
    found: list[Path] = []
    try:  # the embedded server's own PostgreSQL binaries
        found.append(Path(embedded._pgserver().__file__).parent / "pginstall" / "bin" / name)
    except DatabaseUnavailable:
        pass
    system = shutil.which(name)
    if system:
        found.append(Path(system))
    found += sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return [p for p in found if p.is_file()]


def find_tool(name: str, server_major: int) -> Tool:
    """The newest `name` binary at least as new as the server."""
    tools = [Tool(p, v) for p in _candidates(name) if (v := _version(p)) is not None]
    usable = sorted((t for t in tools if t.major >= server_major), key=lambda t: t.major, reverse=True)
    if not usable:
        have = ", ".join(f"{t.path} ({t.major})" for t in tools) or "none"
        raise AppError(f"no {name} for PostgreSQL {server_major} or newer (found: {have}); install the PostgreSQL client tools")
    return usable[0]


def _libpq(engine: Engine) -> tuple[str, dict[str, str]]:
    """The database's URL for libpq tools, and an environment with the password (never on the command line)."""
    url = engine.url.set(drivername="postgresql")
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    return url.set(password=None).render_as_string(hide_password=False), env


def _run(args: list[str], env: dict[str, str], what: str) -> None:
    try:
        done = subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AppError(f"{what} did not finish within {TOOL_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        raise AppError(f"{what} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")


def backup(engine: Engine, target: Path) -> int:
    """Write the whole database to `target` (custom format); returns its size in bytes."""
    target = target.expanduser()
    if target.is_dir():
        raise AppError(f"{target} is a directory: give a file name")
    if not target.parent.is_dir():
        raise AppError(f"{target.parent} does not exist")
    tool = find_tool("pg_dump", server_major_version(engine))
    url, env = _libpq(engine)
    partial = target.with_name(f".{target.name}.partial")
    try:
        args = ["--format=custom", "--no-owner", "--no-privileges", f"--file={partial}", f"--dbname={url}"]
        _run([str(tool.path), *args], env, "pg_dump")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target.stat().st_size


def restore(engine: Engine, source: Path) -> None:
    """Replace the database's contents with the backup in `source`, in one transaction."""
    source = source.expanduser()
    if not source.is_file():
        raise AppError(f"{source}: no such backup file")
    tool = find_tool("pg_restore", server_major_version(engine))
    url, env = _libpq(engine)
    _run([str(tool.path), "--list", str(source)], env, f"{source} is not a pg_dump custom-format backup: pg_restore")
    engine.dispose()  # our own pooled connections would hold locks on the tables being replaced
    _run(
        [
            str(tool.path),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            f"--dbname={url}",
            str(source),
        ],
        env,
        "pg_restore",
    )
    migrate.upgrade(engine)  # a backup from an older version of this program
    with session_scope(engine) as session:
        change_log.new_catalogue_id(session)
