"""Reads and writes of the catalogue's rows: categories, images, embeddings and prototype sums.

Functions take a Session and never commit: the caller's transaction decides what lands together. Every
write that changes what an index must apply takes the change log's lock first (`change_log.lock_changes`).
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Select, delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from backend.core.errors import NotFound, Unprocessable
from backend.core.text import echo, echo_list
from backend.core.vectors import SUM_DTYPE, VECTOR_DTYPE, PrototypeMatrix, category_sums
from backend.imaging import ImageBytes
from backend.storage import near_duplicates
from backend.storage.change_log import lock_changes
from backend.storage.schema import Category, CategoryImageCount, Embedding, Image, ModelVectorCount, Prototype


@dataclass(frozen=True)
class NewImage:
    image: ImageBytes
    category_id: int | None
    label_given: bool
    source: str | None = None
    description: str | None = None


def to_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=VECTOR_DTYPE).tobytes()


# --- categories -----------------------------------------------------------------------------------


def ensure_categories(session: Session, names: Iterable[str]) -> dict[str, int]:
    names = sorted(set(names))
    if names:
        session.execute(insert(Category).values([{"name": n} for n in names]).on_conflict_do_nothing())
    return category_ids(session, names)


def category_ids(session: Session, names: Iterable[str] | None = None) -> dict[str, int]:
    query = select(Category.name, Category.id)
    if names is not None:
        query = query.where(Category.name.in_(list(names)))
    return {name: cid for name, cid in session.execute(query)}


def category_by_name(session: Session, name: str) -> Category:
    category = session.scalar(select(Category).where(Category.name == name))
    if category is None:
        known = echo_list(sorted(category_ids(session))) or "none yet"
        raise Unprocessable(f"category: unknown category {echo(name)!r} (known: {known})")
    return category


def category_count_columns() -> tuple[Any, ...]:
    """(id, name, images, images with a given label) of a category joined to its kept counts (migration 0008)."""
    return Category.id, Category.name, func.coalesce(CategoryImageCount.images, 0), func.coalesce(CategoryImageCount.labelled, 0)


def category_counts(session: Session) -> list[tuple[int, str, int, int]]:
    """(id, name, images, images with a given label) per category, from the counts the triggers keep
    (migration 0008): one row per category read, whatever the catalogue's size."""
    query = (
        select(*category_count_columns())
        .outerjoin(CategoryImageCount, CategoryImageCount.category_id == Category.id)
        .order_by(Category.name)
    )
    return [tuple(row) for row in session.execute(query)]


def counted_images() -> Select[tuple[int]]:
    """Every stored image, with or without a category, from the counts the triggers keep."""
    return select(func.coalesce(func.sum(CategoryImageCount.images), 0))


def image_count(session: Session) -> int:
    return int(session.scalar(counted_images()) or 0)


# --- images and embeddings ------------------------------------------------------------------------


def existing_by_sha(session: Session, shas: Iterable[str]) -> dict[str, int]:
    shas = list(set(shas))
    if not shas:
        return {}
    return dict(session.execute(select(Image.sha256, Image.id).where(Image.sha256.in_(shas))).all())


def stored_copies(session: Session, shas: Iterable[str], model: str) -> dict[str, tuple[int, np.ndarray | None]]:
    """sha256 -> (the stored image with those bytes, its `model` vector or None), in one statement."""
    shas = list(set(shas))
    if not shas:
        return {}
    on = (Embedding.image_id == Image.id) & (Embedding.model == model)
    query = select(Image.sha256, Image.id, Embedding.vector).outerjoin(Embedding, on).where(Image.sha256.in_(shas))
    return {
        sha: (image_id, None if raw is None else np.frombuffer(raw, dtype=VECTOR_DTYPE))
        for sha, image_id, raw in session.execute(query)
    }


def add_images(session: Session, model: str, items: Sequence[NewImage], vectors: np.ndarray) -> list[int]:
    """Insert images with their embeddings and fold given labels into the prototype sums."""
    rows = [
        {
            "sha256": it.image.sha256,
            "data": it.image.data,
            "size_bytes": len(it.image.data),
            "width": it.image.width,
            "height": it.image.height,
            "format": it.image.format,
            "source": it.source,
            "description": it.description,
            "category_id": it.category_id,
            "label_given": it.label_given,
        }
        for it in items
    ]
    if not rows:
        return []
    ids = list(
        session.scalars(insert(Image).values(rows).returning(Image.id), execution_options={"sort_by_parameter_order": True})
    )
    dim = vectors.shape[1]
    given = [i for i, it in enumerate(items) if it.label_given and it.category_id is not None]
    lock_changes(session)  # before the embeddings' triggers and the prototype row locks
    session.execute(
        insert(Embedding),
        [{"image_id": i, "model": model, "dim": dim, "vector": to_bytes(v)} for i, v in zip(ids, vectors, strict=True)],
    )
    _update_prototypes(session, model, [cid for i in given if (cid := items[i].category_id) is not None], vectors[given], sign=1)
    return ids


def add_embeddings(session: Session, model: str, image_ids: Sequence[int], vectors: np.ndarray) -> int:
    """Embeddings of `model` for stored images (re-embedding with another model), idempotent: an image that
    has one already keeps it. Given labels are folded into `model`'s prototypes. Returns how many were new."""
    if not len(image_ids):
        return 0
    lock_changes(session)
    dim = vectors.shape[1]
    new = set(
        session.scalars(
            insert(Embedding)
            .values(
                [
                    {"image_id": int(i), "model": model, "dim": dim, "vector": to_bytes(v)}
                    for i, v in zip(image_ids, vectors, strict=True)
                ]
            )
            .on_conflict_do_nothing()
            .returning(Embedding.image_id)
        )
    )
    labels: dict[int, int] = {
        image_id: category_id
        for image_id, category_id in session.execute(
            select(Image.id, Image.category_id).where(Image.id.in_(new), Image.label_given, Image.category_id.is_not(None))
        )
        if category_id is not None
    }
    rows = [k for k, i in enumerate(image_ids) if int(i) in labels]
    _update_prototypes(session, model, [labels[int(image_ids[k])] for k in rows], vectors[rows], sign=1)
    return len(new)


def images_without(session: Session, model: str) -> list[int]:
    """Ids of stored images that have no `model` embedding yet, ascending."""
    has = select(Embedding.image_id).where(Embedding.model == model, Embedding.image_id == Image.id).exists()
    return list(session.scalars(select(Image.id).where(~has).order_by(Image.id)))


def _update_prototypes(session: Session, model: str, category_ids: Sequence[int], vectors: np.ndarray, sign: int) -> None:
    """Add (sign 1) or subtract (sign -1) `vectors` to their categories' running sums. The caller holds
    the change log's lock (`lock_changes`), taken before these row locks."""
    if len(category_ids) == 0:
        return
    cats, sums, counts = category_sums(np.asarray(category_ids), vectors)
    dim = vectors.shape[1]
    by_category = {int(c): (s, int(n)) for c, s, n in zip(cats, sums, counts, strict=True)}
    zero = np.zeros(dim, dtype=SUM_DTYPE).tobytes()
    session.execute(
        insert(Prototype)
        .values([{"model": model, "category_id": c, "dim": dim, "vector_sum": zero, "count": 0} for c in sorted(by_category)])
        .on_conflict_do_nothing()
    )
    # Row locks (in a fixed order) serialise concurrent writers of the same prototype.
    locked = session.scalars(
        select(Prototype)
        .where(Prototype.model == model, Prototype.category_id.in_(sorted(by_category)))
        .order_by(Prototype.category_id)
        .with_for_update()
    ).all()
    for proto in locked:
        delta, n = by_category[proto.category_id]
        total = np.frombuffer(proto.vector_sum, dtype=SUM_DTYPE) + sign * delta
        proto.count += sign * n
        proto.vector_sum = (total if proto.count > 0 else np.zeros(dim, dtype=SUM_DTYPE)).tobytes()
    session.flush()


def add_to_prototypes(session: Session, model: str, category_ids: Sequence[int], vectors: np.ndarray) -> None:
    """Fold given-label vectors stored by another path (`bulk_load`) into their prototype sums; the caller
    holds the change log's lock."""
    _update_prototypes(session, model, category_ids, vectors, sign=1)


def get_image(session: Session, image_id: int) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFound(f"image {image_id} not found")
    return image


def result_metadata(session: Session, ids: Iterable[int]) -> dict[int, tuple[int | None, bool]]:
    """id -> (category id, label given) for search hits: three columns, no ORM objects, no join."""
    ids = list(ids)
    if not ids:
        return {}
    query = select(Image.id, Image.category_id, Image.label_given).where(Image.id.in_(ids))
    return {image_id: (cid, given) for image_id, cid, given in session.execute(query)}


def image_vector(session: Session, image_id: int, model: str) -> np.ndarray | None:
    raw = session.scalar(select(Embedding.vector).where(Embedding.image_id == image_id, Embedding.model == model))
    return None if raw is None else np.frombuffer(raw, dtype=VECTOR_DTYPE)


def image_data(session: Session, ids: Iterable[int]) -> dict[int, bytes]:
    """id -> the stored image's bytes, for the ids that exist."""
    ids = list(ids)
    if not ids:
        return {}
    return {int(i): bytes(raw) for i, raw in session.execute(select(Image.id, Image.data).where(Image.id.in_(ids)))}


def image_ids_after(session: Session, after: int) -> list[int]:
    """Ids of the images stored after image `after` (ids only grow), oldest first."""
    return list(session.scalars(select(Image.id).where(Image.id > after).order_by(Image.id)))


def newest_image_id(session: Session) -> int:
    return int(session.scalar(select(func.max(Image.id))) or 0)


def delete_image(session: Session, image_id: int) -> Image:
    """Delete an image, its embeddings (all models) and its share of the prototype sums."""
    image = session.scalars(select(Image).where(Image.id == image_id).with_for_update(of=Image)).first()
    if image is None:
        raise NotFound(f"image {image_id} not found")
    lock_changes(session)  # before the prototype row locks and the deletion log's trigger
    near_duplicates.forget_image(session, image_id)  # its links, and its group split where it held it together
    if image.label_given and image.category_id is not None:
        for model, raw in session.execute(select(Embedding.model, Embedding.vector).where(Embedding.image_id == image_id)):
            _update_prototypes(session, model, [image.category_id], np.frombuffer(raw, dtype=VECTOR_DTYPE)[None, :], sign=-1)
    session.execute(delete(Embedding).where(Embedding.image_id == image_id))
    session.execute(delete(Image).where(Image.id == image_id))
    return image


# --- prototypes and counts -----------------------------------------------------------------------


def category_vector_counts(session: Session, model: str) -> dict[int, int]:
    """Vectors of `model` per category (-1: no category)."""
    rows = session.execute(
        select(func.coalesce(Image.category_id, -1), func.count())
        .join(Embedding, Embedding.image_id == Image.id)
        .where(Embedding.model == model)
        .group_by(func.coalesce(Image.category_id, -1))
    )
    return {int(cid): int(n) for cid, n in rows}


def load_prototypes(session: Session, model: str) -> PrototypeMatrix:
    rows = session.execute(
        select(Prototype.category_id, Prototype.vector_sum, Prototype.count)
        .where(Prototype.model == model, Prototype.count > 0)
        .order_by(Prototype.category_id)
    ).all()
    if not rows:
        return PrototypeMatrix.from_sums(np.empty(0), np.empty((0, 0)), np.empty(0))
    return PrototypeMatrix.from_sums(
        np.asarray([r[0] for r in rows]),
        np.stack([np.frombuffer(raw, dtype=SUM_DTYPE) for _, raw, _ in rows]),
        np.asarray([r[2] for r in rows]),
    )


def rebuild_prototypes(session: Session, model: str) -> int:
    """Recompute every prototype of `model` from the stored given-label embeddings."""
    lock_changes(session)
    session.execute(delete(Prototype).where(Prototype.model == model))
    query = (
        select(Image.category_id, Embedding.vector)
        .join(Image, Image.id == Embedding.image_id)
        .where(Embedding.model == model, Image.label_given, Image.category_id.is_not(None))
    )
    for part in session.execute(query.execution_options(yield_per=10_000)).partitions():
        vectors = np.frombuffer(b"".join(raw for _, raw in part), dtype=VECTOR_DTYPE).reshape(len(part), -1)
        _update_prototypes(session, model, [cid for cid, _ in part if cid is not None], vectors, sign=1)
    return session.scalar(select(func.count()).select_from(Prototype).where(Prototype.model == model)) or 0


def model_ids(session: Session) -> list[tuple[str, int]]:
    """(model, stored vectors) for every model with vectors, from the counts the triggers keep."""
    query = select(ModelVectorCount.model, ModelVectorCount.vectors).where(ModelVectorCount.vectors > 0)
    return [(model, int(n)) for model, n in session.execute(query.order_by(ModelVectorCount.model))]


def category_page(session: Session, category_id: int, offset: int, limit: int) -> Sequence[Image]:
    return session.scalars(
        select(Image).where(Image.category_id == category_id).order_by(Image.id).offset(offset).limit(limit)
    ).all()
