"""Reads and writes of the catalogue: categories, images, embeddings and prototype sums.

Functions take a Session and never commit: the caller's transaction decides what lands together.
"""

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Numeric, delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from backend.core.errors import NotFound, Unprocessable
from backend.db.models import Category, Embedding, Image, Prototype
from backend.imaging import DecodedImage
from backend.vectors import l2_normalise

VECTOR_DTYPE = np.dtype("<f4")
SUM_DTYPE = np.dtype("<f8")


@dataclass(frozen=True)
class NewImage:
    image: DecodedImage
    category_id: int | None
    label_given: bool
    source: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class StoredVectors:
    ids: np.ndarray  # int64 image ids
    category_ids: np.ndarray  # int64, -1 where the image has no category
    vectors: np.ndarray  # (n, dim) float32, L2-normalised


@dataclass(frozen=True)
class PrototypeMatrix:
    category_ids: np.ndarray  # int64
    vectors: np.ndarray  # (n, dim) float32, L2-normalised means
    counts: np.ndarray  # int64 given-label images behind each


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
        known = ", ".join(sorted(category_ids(session))) or "none yet"
        raise Unprocessable(f"unknown category {name!r} (known: {known})")
    return category


def category_counts(session: Session) -> list[tuple[int, str, int, int]]:
    """(id, name, images, images with a given label) per category; counts rows, never bytes."""
    query = (
        select(
            Category.id,
            Category.name,
            func.count(Image.id),
            func.count(Image.id).filter(Image.label_given),
        )
        .outerjoin(Image, Image.category_id == Category.id)
        .group_by(Category.id)
        .order_by(Category.name)
    )
    return [tuple(row) for row in session.execute(query)]  # type: ignore[misc]


# --- images and embeddings ------------------------------------------------------------------------


def existing_by_sha(session: Session, shas: Iterable[str]) -> dict[str, int]:
    shas = list(set(shas))
    if not shas:
        return {}
    return dict(session.execute(select(Image.sha256, Image.id).where(Image.sha256.in_(shas))).all())


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
    session.execute(
        insert(Embedding),
        [{"image_id": i, "model": model, "dim": dim, "vector": to_bytes(v)} for i, v in zip(ids, vectors, strict=True)],
    )
    given = [(it.category_id, v) for it, v in zip(items, vectors, strict=True) if it.label_given and it.category_id is not None]
    _update_prototypes(session, model, dim, given, sign=1)
    return ids


def _update_prototypes(
    session: Session, model: str, dim: int, contributions: Iterable[tuple[int, np.ndarray]], sign: int
) -> None:
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = defaultdict(int)
    for cid, vec in contributions:
        sums[cid] = sums.get(cid, np.zeros(dim, dtype=SUM_DTYPE)) + vec.astype(SUM_DTYPE)
        counts[cid] += 1
    if not sums:
        return
    zero = np.zeros(dim, dtype=SUM_DTYPE).tobytes()
    session.execute(
        insert(Prototype)
        .values([{"model": model, "category_id": c, "dim": dim, "vector_sum": zero, "count": 0} for c in sorted(sums)])
        .on_conflict_do_nothing()
    )
    # Row locks (in a fixed order) serialise concurrent writers of the same prototype.
    locked = session.scalars(
        select(Prototype)
        .where(Prototype.model == model, Prototype.category_id.in_(sorted(sums)))
        .order_by(Prototype.category_id)
        .with_for_update()
    ).all()
    for proto in locked:
        total = np.frombuffer(proto.vector_sum, dtype=SUM_DTYPE) + sign * sums[proto.category_id]
        proto.count += sign * counts[proto.category_id]
        proto.vector_sum = (total if proto.count > 0 else np.zeros(dim, dtype=SUM_DTYPE)).tobytes()
    session.flush()


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


def delete_image(session: Session, image_id: int) -> Image:
    """Delete an image, its embeddings (all models) and its share of the prototype sums."""
    image = session.scalars(select(Image).where(Image.id == image_id).with_for_update(of=Image)).first()
    if image is None:
        raise NotFound(f"image {image_id} not found")
    if image.label_given and image.category_id is not None:
        for model, raw in session.execute(select(Embedding.model, Embedding.vector).where(Embedding.image_id == image_id)):
            vec = np.frombuffer(raw, dtype=VECTOR_DTYPE)
            _update_prototypes(session, model, len(vec), [(image.category_id, vec)], sign=-1)
    session.execute(delete(Embedding).where(Embedding.image_id == image_id))
    session.execute(delete(Image).where(Image.id == image_id))
    return image


def images_missing_embedding(session: Session, model: str) -> list[int]:
    have = select(Embedding.image_id).where(Embedding.model == model)
    return list(session.scalars(select(Image.id).where(Image.id.not_in(have)).order_by(Image.id)))


# --- bulk reads for the index ---------------------------------------------------------------------


def load_vectors(session: Session, model: str) -> StoredVectors:
    query = (
        select(Embedding.image_id, Image.category_id, Embedding.vector)
        .join(Image, Image.id == Embedding.image_id)
        .where(Embedding.model == model)
        .order_by(Embedding.image_id)
    )
    ids: list[int] = []
    cats: list[int] = []
    chunks: list[bytes] = []
    dim = 0
    for image_id, cid, raw in session.execute(query.execution_options(yield_per=10_000)):
        ids.append(image_id)
        cats.append(-1 if cid is None else cid)
        chunks.append(raw)
        dim = len(raw) // VECTOR_DTYPE.itemsize
    vectors = np.frombuffer(b"".join(chunks), dtype=VECTOR_DTYPE).reshape(len(ids), dim) if ids else np.empty((0, 0), np.float32)
    return StoredVectors(np.asarray(ids, dtype=np.int64), np.asarray(cats, dtype=np.int64), vectors.astype(np.float32))


def load_prototypes(session: Session, model: str) -> PrototypeMatrix:
    rows = session.execute(
        select(Prototype.category_id, Prototype.vector_sum, Prototype.count)
        .where(Prototype.model == model, Prototype.count > 0)
        .order_by(Prototype.category_id)
    ).all()
    if not rows:
        return PrototypeMatrix(np.empty(0, np.int64), np.empty((0, 0), np.float32), np.empty(0, np.int64))
    sums = np.stack([np.frombuffer(raw, dtype=SUM_DTYPE) for _, raw, _ in rows])
    vectors = l2_normalise(sums)
    return PrototypeMatrix(
        np.asarray([r[0] for r in rows], dtype=np.int64), vectors, np.asarray([r[2] for r in rows], dtype=np.int64)
    )


def rebuild_prototypes(session: Session, model: str) -> int:
    """Recompute every prototype of `model` from the stored given-label embeddings."""
    session.execute(delete(Prototype).where(Prototype.model == model))
    query = (
        select(Image.category_id, Embedding.vector)
        .join(Image, Image.id == Embedding.image_id)
        .where(Embedding.model == model, Image.label_given, Image.category_id.is_not(None))
    )
    contributions = (
        (cid, np.frombuffer(raw, dtype=VECTOR_DTYPE)) for cid, raw in session.execute(query.execution_options(yield_per=10_000))
    )
    dim = session.scalar(select(Embedding.dim).where(Embedding.model == model).limit(1))
    if dim is None:
        return 0
    _update_prototypes(session, model, dim, contributions, sign=1)
    return session.scalar(select(func.count()).select_from(Prototype).where(Prototype.model == model)) or 0


def state_fingerprint(session: Session, model: str) -> dict[str, int]:
    """What an index built for `model` must match to be current. Ids are never reused, so inserts and
    deletes move the count and the sums of ids and their squares; label changes move the category sum.
    Every term is a sum, so one added or removed vector updates it without a scan (`fingerprint_change`)."""
    image_id = Embedding.image_id.cast(Numeric)  # squares of large ids would overflow bigint
    count, id_sum, square_sum, cat_sum = session.execute(
        select(
            func.count(Embedding.image_id),
            func.coalesce(func.sum(image_id), 0),
            func.coalesce(func.sum(image_id * image_id), 0),
            func.coalesce(func.sum(func.coalesce(Image.category_id, -1) * image_id), 0),
        )
        .join(Image, Image.id == Embedding.image_id)
        .where(Embedding.model == model)
    ).one()
    categories = session.scalar(select(func.count()).select_from(Category)) or 0
    return {
        "vectors": int(count),
        "image_id_sum": int(id_sum),
        "image_id_square_sum": int(square_sum),
        "category_checksum": int(cat_sum),
        "categories": int(categories),
    }


def fingerprint_change(state: dict[str, int], image_id: int, category_id: int | None, sign: int) -> dict[str, int]:
    """`state_fingerprint` after one vector is added (sign 1) or removed (sign -1)."""
    category = -1 if category_id is None else category_id
    return {
        **state,
        "vectors": state["vectors"] + sign,
        "image_id_sum": state["image_id_sum"] + sign * image_id,
        "image_id_square_sum": state["image_id_square_sum"] + sign * image_id * image_id,
        "category_checksum": state["category_checksum"] + sign * category * image_id,
    }


def model_ids(session: Session) -> list[tuple[str, int]]:
    return [tuple(r) for r in session.execute(select(Embedding.model, func.count()).group_by(Embedding.model))]  # type: ignore[misc]
