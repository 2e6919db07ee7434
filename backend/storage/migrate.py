"""Schema migrations (Alembic, scripts in db/migrations)."""

from collections.abc import Callable

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from backend.core.config import PROJECT_ROOT
from backend.storage.engine import session_scope


def _config() -> Config:
    config = Config(str(PROJECT_ROOT / "db" / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "db" / "migrations"))
    return config


def upgrade(engine: Engine) -> str:
    """Bring the schema to the newest revision; returns it."""
    _run(engine, command.upgrade, "head")
    return head_revision()


def downgrade(engine: Engine, revision: str) -> None:
    _run(engine, command.downgrade, revision)


def _run(engine: Engine, step: Callable[[Config, str], None], revision: str) -> None:
    """In one transaction with a bulk session's deadline, not the engine's: a migration may rewrite a large
    table (0005 rewrites the embeddings)."""
    config = _config()
    with session_scope(engine, bulk=True) as session:
        config.attributes["connection"] = session.connection()
        step(config, revision)


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
