"""Engine and sessions: a configured PostgreSQL, or an embedded one (pgserver) under DATA_DIR."""

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from backend.core.config import Settings, get_settings
from backend.core.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


def _embedded_url(settings: Settings) -> URL:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver
    except ImportError as exc:  # pragma: no cover - pgserver is in requirements.txt
        raise DatabaseUnavailable(
            "no database configured and pgserver is not installed: pip install pgserver, or set DATABASE_URL"
        ) from exc
    pgdata = settings.data_dir / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(pgdata)  # stops when the last process using it exits
    except Exception as exc:
        raise DatabaseUnavailable(f"could not start the embedded PostgreSQL in {pgdata}: {exc}") from exc
    url = make_url(server.get_uri()).set(drivername="postgresql+psycopg2")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{settings.db_name}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{settings.db_name}";')
    return url.set(database=settings.db_name)


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
    return _embedded_url(settings)


def describe(url: URL) -> str:
    """The URL without its password, for messages."""
    return url.render_as_string(hide_password=True)


def make_engine(url: URL) -> Engine:
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseUnavailable(
            f"database unreachable at {describe(url)}: {reason} "
            "(check DATABASE_URL or DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD)"
        ) from exc
    return engine


@lru_cache
def get_engine() -> Engine:
    return make_engine(database_url(get_settings()))


@lru_cache
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None, *, snapshot: bool = False) -> Iterator[Session]:
    """One transaction: commits on success, rolls back on any error. `snapshot`: a read-only REPEATABLE READ
    transaction, so every query in it sees the database as of its first query."""
    session = _sessionmaker(engine or get_engine())()
    if snapshot:
        session.connection(execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True})
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
