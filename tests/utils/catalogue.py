"""Row counts of a catalogue database, for tests that check what a write left behind."""

from sqlalchemy import Engine, func, select

from backend.storage.engine import session_scope
from backend.storage.schema import Embedding, Prototype
from backend.storage.schema import Image as ImageRow


def row_counts(engine: Engine) -> tuple[int, int, int]:
    """(images, embeddings, images counted in prototype sums)."""
    with session_scope(engine) as s:
        return (
            s.scalar(select(func.count()).select_from(ImageRow)),
            s.scalar(select(func.count()).select_from(Embedding)),
            s.scalar(select(func.coalesce(func.sum(Prototype.count), 0))),
        )
