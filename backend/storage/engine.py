"""Engine and sessions: a configured PostgreSQL, or an embedded one (pgserver) under DATA_DIR.

Every database call has a deadline. libpq has no client-side timeout for a statement, so a frozen server
(SIGSTOP, a dead host behind a live TCP stack) would hang a thread for good; psycopg2's wait callback
turns every connect, statement and fetch into a poll loop that gives up after DB_TIMEOUT_SECONDS. The
server also cancels statements itself after that long (statement_timeout), and a connection that timed
out is thrown away, never reused.
"""

import logging
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from backend.core.config import DB_TIMEOUT_DEFAULT_S, Settings, get_settings
from backend.core.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

# Bulk reads (a full index rebuild's snapshot) stream for longer than one request should wait.
BULK_TIMEOUT_S = 600.0

# What a stopped, frozen, slow or unreachable database raises, wherever it is used: through SQLAlchemy
# (psycopg2, wrapped), or straight from psycopg 3 (the bulk COPY of `vector_reader`, the worker's queue).
DATABASE_ERRORS = (
    OperationalError,
    InterfaceError,
    PoolTimeout,
    DisconnectionError,
    DatabaseUnavailable,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
# Every class a database error may come as, whichever driver or wrapper raised it; `is_outage` tells which
# of them are the database's trouble (503) rather than a bug in our SQL (500).
DRIVER_ERRORS = (DBAPIError, PoolTimeout, DisconnectionError, DatabaseUnavailable, psycopg.Error, psycopg2.Error)
# A mistake in the SQL or the data sent: retrying cannot help, so these stay 500s (and get fixed).
_BUG_ERRORS = (
    psycopg.ProgrammingError,
    psycopg.DataError,
    psycopg.IntegrityError,
    psycopg.NotSupportedError,
    psycopg2.ProgrammingError,
    psycopg2.DataError,
    psycopg2.IntegrityError,
    psycopg2.NotSupportedError,
)


class DatabaseTimeout(psycopg2.OperationalError):
    """The database did not answer within the deadline (raised by the wait callback)."""


class _TimedConnection(psycopg2.extensions.connection):
    timeout_s: float | None = None  # set per engine (class) and per bulk session (instance)


@lru_cache
def _connection_class(timeout_s: float) -> type[_TimedConnection]:
    return type("TimedConnection", (_TimedConnection,), {"timeout_s": timeout_s})


def _wait_with_deadline(conn: Any) -> None:
    """psycopg2 wait callback: poll until the operation completes, or raise DatabaseTimeout."""
    timeout = getattr(conn, "timeout_s", None)
    deadline = None if timeout is None else time.monotonic() + timeout
    poller = select.poll()
    registered = 0
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        events = select.POLLIN if state == psycopg2.extensions.POLL_READ else select.POLLOUT
        if events != registered:
            poller.register(conn.fileno(), events)
            registered = events
        remaining_ms = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        if not poller.poll(remaining_ms) and deadline is not None and time.monotonic() >= deadline:
            raise DatabaseTimeout(f"no answer within {timeout:g} s (DB_TIMEOUT_SECONDS)")


def _discard_timed_out(context: ExceptionContext) -> None:
    """A connection whose call timed out is mid-protocol: never hand it out again."""
    if isinstance(context.original_exception, DatabaseTimeout):
        context.is_disconnect = True


def _driver_error(exc: BaseException) -> BaseException | None:
    """The database error in `exc`: itself, the driver's error a SQLAlchemy wrapper holds, or a cause
    (procrastinate's ConnectorException raises from the driver's); None when there is none."""
    seen: BaseException | None = exc
    for _ in range(8):  # causes form a short chain; the bound guards against a cycle
        if seen is None:
            return None
        if isinstance(seen, DBAPIError):
            return seen.orig if isinstance(seen.orig, psycopg.Error | psycopg2.Error) else seen
        if isinstance(seen, DRIVER_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` is the database's trouble (down, frozen, slow, out of connections or resources, a
    statement cancelled by its timeout), whichever driver raised it: the client should retry (503)."""
    error = _driver_error(exc)
    return error is not None and not isinstance(error, _BUG_ERRORS)


def database_problem(exc: BaseException) -> str:
    """One line saying what went wrong with the database, for a 503 or a CLI error."""
    error = _driver_error(exc) or exc
    if isinstance(error, DatabaseUnavailable):
        return error.message
    if isinstance(error, PoolTimeout):
        return "every database connection is busy (the database is slow or not answering)"
    orig = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    lines = [ln.strip() for ln in str(orig).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(orig).__name__


def database_url(settings: Settings) -> URL:
    if settings.database_url:
        url = make_url(settings.database_url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg2")
        return url
    if settings.db_host:
        return URL.create(
            "postgresql+psycopg2",
            username=settings.db_user,
            password=settings.db_password or None,
            host=settings.db_host,
            port=settings.db_port,
            database=settings.db_name,
        )
    from backend.storage import embedded

    return embedded.start(settings)


def describe(url: URL) -> str:
    """The URL without its password, for messages."""
    return url.render_as_string(hide_password=True)


def location(settings: Settings, engine: Engine) -> str:
    """Which database is in use, for `status` and `init-db`."""
    if settings.uses_embedded_db:
        return f"embedded PostgreSQL (pgserver) in {settings.data_dir / 'pgdata'}"
    return describe(engine.url)


def libpq_url(engine: Engine) -> str:
    """The engine's database as a plain libpq URL (psycopg 3 for bulk reads and the job queue)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def make_engine(url: URL, timeout_s: float = DB_TIMEOUT_DEFAULT_S) -> Engine:
    """An engine whose every call gives up after `timeout_s` (see the module's docstring)."""
    psycopg2.extensions.set_wait_callback(_wait_with_deadline)
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        pool_timeout=timeout_s,
        connect_args={
            "connection_factory": _connection_class(timeout_s),
            "options": f"-c statement_timeout={round(timeout_s * 1000)}",
        },
    )
    event.listen(engine, "handle_error", _discard_timed_out)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DATABASE_ERRORS as exc:
        raise DatabaseUnavailable(
            f"database unreachable at {describe(url)}: {database_problem(exc)} "
            "(check DATABASE_URL or DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD)"
        ) from exc
    return engine


def server_major_version(engine: Engine) -> int:
    """The server's PostgreSQL major version (backups pick pg_dump and pg_restore by it)."""
    with engine.connect() as conn:
        return int(conn.execute(text("SHOW server_version_num")).scalar_one()) // 10000


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(database_url(settings), settings.db_timeout_seconds)


@lru_cache
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(
    engine: Engine | None = None, *, snapshot: bool = False, bulk: bool = False, single_read: bool = False
) -> Iterator[Session]:
    """One transaction: commits on success, rolls back on any error. `snapshot`: a read-only REPEATABLE READ
    transaction, so every query in it sees the database as of its first query. `bulk`: its statements
    may take up to BULK_TIMEOUT_S (reading every vector for a full rebuild). `single_read`: for one SELECT,
    which is consistent on its own: no BEGIN and COMMIT, two database round trips fewer (a search's)."""
    session = _sessionmaker(engine or get_engine())()
    dbapi_conn = None
    if snapshot:
        session.connection(execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True})
    if single_read:
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    if bulk:
        conn = session.connection()
        dbapi_conn = conn.connection.dbapi_connection
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {round(BULK_TIMEOUT_S * 1000)}")
        dbapi_conn.timeout_s = BULK_TIMEOUT_S  # type: ignore[union-attr]
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        if dbapi_conn is not None and "timeout_s" in vars(dbapi_conn):
            del dbapi_conn.timeout_s  # back to the engine's deadline before the pool hands it out again
        session.close()
