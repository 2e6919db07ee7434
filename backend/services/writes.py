"""The catalogue's writes other than uploads (`SearchService.upload`): delete an image, recompute the
prototypes. One database transaction, then the live index follows before the answer."""

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from backend.search.live_index import LiveIndex
from backend.storage import catalogue
from backend.storage.engine import session_scope
from backend.storage.schema import Image

T = TypeVar("T")


class CatalogueWrites:
    def __init__(self, engine: Engine, cache: LiveIndex, model: str) -> None:
        self.engine, self.cache, self.model = engine, cache, model

    def delete(self, image_id: int) -> Image:
        return self._write(lambda session: catalogue.delete_image(session, image_id))

    def rebuild_prototypes(self) -> int:
        return self._write(lambda session: catalogue.rebuild_prototypes(session, self.model))

    def _write(self, change: Callable[[Session], T]) -> T:
        """Commit the change, then bring the index up to date with the database (this change included)
        before answering: an acknowledged write is searchable, whatever rebuild runs meanwhile."""
        with session_scope(self.engine) as session:
            result = change(session)
        self.cache.after_write()
        return result
