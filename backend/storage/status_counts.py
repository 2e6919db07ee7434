"""What `/status` reads from the database, in one statement: the counts the triggers keep (migration 0008)
and the catalogue's head (`change_log.head`). One round trip, consistent on its own (no transaction), so a
page polling `/status` costs the database as little as possible, whatever the catalogue's size."""

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.orm import Session

from backend.storage import catalogue
from backend.storage.change_log import Head, catalogue_id_column, latest_seq_column
from backend.storage.schema import Category, CategoryImageCount, ModelVectorCount


@dataclass(frozen=True)
class StatusCounts:
    categories: list[tuple[int, str, int, int]]  # (id, name, images, given labels), by name
    images: int  # every stored image, with or without a category
    models: dict[str, int]  # stored vectors per model (those with any)
    head: Head  # of the model asked about


def status_counts(session: Session, model: str) -> StatusCounts:
    """Every count `/status` shows and `model`'s head, read in one statement."""
    row = func.json_build_array(*catalogue.category_count_columns())
    categories = (
        select(func.coalesce(func.json_agg(aggregate_order_by(row, Category.name)), func.json_build_array()))
        .select_from(Category)
        .outerjoin(CategoryImageCount, CategoryImageCount.category_id == Category.id)
        .scalar_subquery()
    )
    images = catalogue.counted_images().scalar_subquery()
    models = (
        select(func.coalesce(func.json_object_agg(ModelVectorCount.model, ModelVectorCount.vectors), func.json_build_object()))
        .where(ModelVectorCount.vectors > 0)
        .scalar_subquery()
    )
    got = session.execute(select(categories, images, models, catalogue_id_column(), latest_seq_column(model))).one()
    return StatusCounts(
        categories=[(int(c), str(name), int(n), int(given)) for c, name, n, given in got[0]],
        images=int(got[1]),
        models={str(m): int(n) for m, n in sorted(got[2].items())},
        head=Head(None if got[3] is None else str(got[3]), int(got[4] or 0)),
    )
