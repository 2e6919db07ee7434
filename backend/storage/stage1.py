"""Stage 1's stored rankers (`stage1_models`, one row per embedding model) and the label changes that
decide whether a stored row is still good. Functions take a Session and never commit."""

from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from backend.storage.schema import DeletedEmbedding, Embedding, Image, Stage1Model


def stored_summary(session: Session, model: str) -> Row[int, int, int, list[int]] | None:
    """(dim, trained_change, labels, category_ids) of `model`'s stored row, without its arrays; None if none."""
    query = select(Stage1Model.dim, Stage1Model.trained_change, Stage1Model.labels, Stage1Model.category_ids)
    return session.execute(query.where(Stage1Model.model == model)).first()


def stored_row(session: Session, model: str) -> Stage1Model:
    """`model`'s whole stored row, arrays included."""
    return session.get_one(Stage1Model, model)


def store(session: Session, model: str, values: dict[str, Any]) -> None:
    """Replace `model`'s row with `values` (stamped with the time of this transaction)."""
    values = {**values, "trained_at": func.now()}
    statement = insert(Stage1Model).values(model=model, **values)
    session.execute(statement.on_conflict_do_update(index_elements=[Stage1Model.model], set_=values))


def labels_changed_since(session: Session, model: str, change: int) -> int:
    """Given-label embeddings stamped after `change` plus embeddings deleted after it (every deletion counts:
    the log does not say whether the label was given)."""
    added = session.scalar(
        select(func.count())
        .select_from(Embedding)
        .join(Image, Image.id == Embedding.image_id)
        .where(Embedding.model == model, Embedding.seq > change, Image.label_given)
    )
    removed = session.scalar(select(func.count()).where(DeletedEmbedding.model == model, DeletedEmbedding.seq > change))
    return int(added or 0) + int(removed or 0)
