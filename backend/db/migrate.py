"""Schema migrations (Alembic, scripts in db/migrations)."""

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from backend.core.config import PROJECT_ROOT


def _config() -> Config:
    config = Config(str(PROJECT_ROOT / "db" / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "db" / "migrations"))
    return config


def upgrade(engine: Engine) -> str:
    """Bring the schema to the newest revision; returns it."""
    config = _config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return head_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
