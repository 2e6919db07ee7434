"""What the commands share: the schema check before work, and the services a server holds (imported lazily:
they pull in the model runtime and FAISS, and `--help` must stay fast)."""

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from backend.core.config import Settings
from backend.core.errors import AppError

if TYPE_CHECKING:
    from backend.services.assembly import Services

# A subcommand's parser, made by `backend.cli.parser` with the function that runs it.
Command = Callable[[str, Callable[[argparse.Namespace, Settings], None], str], argparse.ArgumentParser]


def require_schema() -> None:
    from backend.storage import migrate
    from backend.storage.engine import get_engine

    current = migrate.current_revision(get_engine())
    if current != migrate.head_revision():
        raise AppError(f"database schema is at {current or 'nothing'}, not {migrate.head_revision()}: run init-db first")


def open_services(settings: Settings) -> "Services":
    """The services a server holds (services/assembly.py), over a database whose schema is current; not
    started: a command loads what it uses."""
    from backend.services.assembly import Services
    from backend.services.search import SearchService

    require_schema()
    return Services.around(SearchService(settings))
