"""The catalogue's writes other than uploads (`SearchService.upload`): delete an image, recompute the
prototypes. One database transaction, then the live index follows before the answer."""

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from backend.storage import catalogue
from backend.storage.engine import session_scope
from backend.storage.schema import Image

T = TypeVar("T")


class CatalogueWrites:
    def __init__(self, engine: Engine, follow: Callable[[], None], model: str) -> None:
        """`follow`: brings whatever answers searches up to date with a committed write (the live index, and a
        cluster's shards when stage 2 runs there)."""
        self.engine, self.follow, self.model = engine, follow, model

    def delete(self, image_id: int) -> Image:
        return self._write(lambda session: catalogue.delete_image(session, image_id))

    def rebuild_prototypes(self) -> int:
        return self._write(lambda session: catalogue.rebuild_prototypes(session, self.model))

    def _write(self, change: Callable[[Session], T]) -> T:
        """Commit the change, then bring the index up to date with the database (this change included)
        before answering: an acknowledged write is searchable, whatever rebuild runs meanwhile."""
        with session_scope(self.engine) as session:
            result = change(session)
        self.follow()
        return result
