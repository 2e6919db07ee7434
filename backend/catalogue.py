"""Reads and writes of the catalogue: categories, images, embeddings, prototype sums and the change log.

Functions take a Session and never commit: the caller's transaction decides what lands together. This is
the only module that speaks SQL to the catalogue's tables.
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import Row, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from backend.core.errors import NotFound, Unprocessable
from backend.core.text import echo, echo_list
from backend.db.models import CatalogueMeta, Category, DeletedEmbedding, Embedding, Image, Prototype
from backend.db.session import libpq_url
from backend.imaging import ImageBytes
from backend.vectors import SUM_DTYPE, VECTOR_DTYPE, PrototypeMatrix, StoredVectors, category_sums

# The change numbers are handed out under this transaction-level advisory lock (see migration 0002). A
# writer that also locks prototype rows takes it first, so every writer locks in the same order.
CHANGE_LOCK = 7305104221


@dataclass(frozen=True)
class NewImage:
    image: ImageBytes
    category_id: int | None
    label_given: bool
    source: str | None = None
    description: str | None = None


def to_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=VECTOR_DTYPE).tobytes()


def lock_changes(session: Session) -> None:
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGE_LOCK})


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
    CHANGE_LOCK, taken before these row locks."""
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
    lock_changes(session)  # before the prototype row locks and the deletion log's trigger
    if image.label_given and image.category_id is not None:
        for model, raw in session.execute(select(Embedding.model, Embedding.vector).where(Embedding.image_id == image_id)):
            _update_prototypes(session, model, [image.category_id], np.frombuffer(raw, dtype=VECTOR_DTYPE)[None, :], sign=-1)
    session.execute(delete(Embedding).where(Embedding.image_id == image_id))
    session.execute(delete(Image).where(Image.id == image_id))
    return image


# --- bulk reads for the index ---------------------------------------------------------------------


def _vectors(rows: Sequence[Row[int, int | None, bytes]]) -> StoredVectors:
    if not rows:
        return StoredVectors.empty()
    vectors = np.frombuffer(b"".join(raw for _, _, raw in rows), dtype=VECTOR_DTYPE).reshape(len(rows), -1)
    return StoredVectors(
        np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
        np.fromiter((-1 if r[1] is None else r[1] for r in rows), dtype=np.int64, count=len(rows)),
        vectors.astype(np.float32),
    )


def _vector_query(model: str):  # type: ignore[no-untyped-def]
    return (
        select(Embedding.image_id, Image.category_id, Embedding.vector)
        .join(Image, Image.id == Embedding.image_id)
        .where(Embedding.model == model)
    )


def load_vectors(session: Session, model: str, sample: tuple[int, int] | None = None, given_only: bool = False) -> StoredVectors:
    """`model`'s stored vectors (or a sample, see `stream_vectors`) in memory, by id."""
    stored = _concat(list(stream_vectors(session, model, sample=sample, given_only=given_only)))
    order = np.argsort(stored.ids, kind="stable")
    return StoredVectors(stored.ids[order], stored.category_ids[order], stored.vectors[order])


def category_vector_counts(session: Session, model: str) -> dict[int, int]:
    """Vectors of `model` per category (-1: no category)."""
    rows = session.execute(
        select(func.coalesce(Image.category_id, -1), func.count())
        .join(Embedding, Embedding.image_id == Image.id)
        .where(Embedding.model == model)
        .group_by(func.coalesce(Image.category_id, -1))
    )
    return {int(cid): int(n) for cid, n in rows}


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # signature, flags 0, no header extension
_COPY_TRAILER = b"\xff\xff"


def stream_vectors(
    session: Session, model: str, chunk_rows: int = 50_000, sample: tuple[int, int] | None = None, given_only: bool = False
) -> Iterator[StoredVectors]:
    """`model`'s stored vectors in chunks, read with a binary COPY (no per-row decoding: fixed-size rows
    parsed by NumPy) on a second connection that imports this session's snapshot, so the stream sees
    exactly what the session sees. `sample=(multiplier, cut)`: only ids with id*multiplier % 10000 < cut
    (`backend.index.sampling.train_sample`'s rule); `given_only`: only images whose label was given (stage 1's training)."""
    import psycopg

    snapshot = session.scalar(text("SELECT pg_export_snapshot()"))
    dim = session.scalar(select(Embedding.dim).where(Embedding.model == model).limit(1))
    if dim is None:
        return
    row = np.dtype(  # COPY's binary rows: a field count, then each field's length and bytes (big-endian)
        [
            ("fields", ">i2"),
            ("l_id", ">i4"),
            ("id", ">i8"),
            ("l_cat", ">i4"),
            ("cat", ">i8"),
            ("l_vec", ">i4"),
            ("vec", VECTOR_DTYPE, (dim,)),
        ]
    )
    where = "e.model = %s" + (" AND i.label_given" if given_only else "")
    where += " AND (e.image_id * %s) %% 10000 < %s" if sample else ""
    query = (
        "COPY (SELECT e.image_id, coalesce(i.category_id, -1)::int8, e.vector FROM embeddings e "
        f"JOIN images i ON i.id = e.image_id WHERE {where}) TO STDOUT (FORMAT binary)"
    )
    url = libpq_url(session.get_bind().engine)
    timeout = getattr(session.connection().connection.dbapi_connection, "timeout_s", None)
    with psycopg.connect(url, connect_timeout=max(1, round(timeout or 10)), autocommit=False) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")  # a server-made id: no quoting needed
        if timeout:
            conn.execute(f"SET statement_timeout = {round(timeout * 1000)}")
        buffer = bytearray()
        started = False
        with conn.cursor().copy(query, (model, *sample) if sample else (model,)) as copy:
            for block in copy:
                buffer += block
                if not started and len(buffer) >= len(_COPY_HEADER):
                    if bytes(buffer[: len(_COPY_HEADER)]) != _COPY_HEADER:
                        raise ValueError("unexpected COPY header")
                    del buffer[: len(_COPY_HEADER)]
                    started = True
                if started and len(buffer) >= chunk_rows * row.itemsize:
                    yield _parse_rows(buffer, row, dim)
        if not started or bytes(buffer[-2:]) != _COPY_TRAILER:
            raise ValueError("truncated COPY stream")
        del buffer[-2:]
        if buffer:
            yield _parse_rows(buffer, row, dim)


def _parse_rows(buffer: bytearray, row: np.dtype, dim: int) -> StoredVectors:
    """Take the whole rows at the start of `buffer` (removing them) as vectors."""
    n = len(buffer) // row.itemsize
    rows = np.frombuffer(bytes(buffer[: n * row.itemsize]), dtype=row)
    del buffer[: n * row.itemsize]
    if (rows["fields"] != 3).any() or (rows["l_id"] != 8).any() or (rows["l_cat"] != 8).any() or (rows["l_vec"] != dim * 4).any():
        raise ValueError(f"stored vectors of another size than {dim} dimensions")
    return StoredVectors(rows["id"].astype(np.int64), rows["cat"].astype(np.int64), rows["vec"].astype(np.float32))


def _concat(parts: list[StoredVectors]) -> StoredVectors:
    if not parts:
        return StoredVectors.empty()
    return StoredVectors(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "category_ids", "vectors")))


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
    return [tuple(r) for r in session.execute(select(Embedding.model, func.count()).group_by(Embedding.model))]  # type: ignore[misc]


# --- the change log: what an index cache built at change number N must apply to be current ---------


@dataclass(frozen=True)
class CatalogueIdentity:
    catalogue_id: str  # made at init-db; a copy of the database (backup restore) keeps it
    system_identifier: str | None  # the PostgreSQL cluster's, where this role may read it
    deletions_pruned_through: int  # deletions numbered up to here are gone from the log
    changes_issued: int = 0  # the change sequence's position: no index of this database can be past it


@dataclass(frozen=True)
class Changes:
    head: int  # the newest change number for the model; the state after applying these
    added: StoredVectors  # inserted or re-stamped embeddings, in change order
    removed: np.ndarray  # int64 image ids whose embedding left (or changed) since
    prototypes_changed: bool


def identity(session: Session) -> CatalogueIdentity:
    meta = session.get(CatalogueMeta, 1)
    if meta is None:
        raise NotFound("the catalogue has no identity row: run init-db")
    sysid = session.scalar(
        text(
            "SELECT CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE') "
            "THEN (SELECT system_identifier::text FROM pg_control_system()) END"
        )
    )
    issued = session.scalar(text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM catalogue_change_seq"))
    return CatalogueIdentity(str(meta.catalogue_id), sysid, int(meta.deletions_pruned_through), int(issued or 0))


def head(session: Session, model: str) -> int:
    """The newest change number that concerns `model`'s index: three index look-ups. Pruned deletions
    count as reflected, since a snapshot reflects every change committed before it."""
    newest = [
        select(func.max(table.seq)).where(table.model == model).scalar_subquery()
        for table in (Embedding, DeletedEmbedding, Prototype)
    ]
    newest.append(select(CatalogueMeta.deletions_pruned_through).scalar_subquery())
    return int(session.scalar(select(func.coalesce(func.greatest(*newest), 0))) or 0)


def changes_since(session: Session, model: str, after: int) -> Changes:
    """Everything `model`'s index must apply to move from change number `after` to the newest. Read in one
    snapshot (a REPEATABLE READ session), so `head` is exactly the state these changes lead to."""
    now = head(session, model)
    if now <= after:
        return Changes(after, StoredVectors.empty(), np.empty(0, np.int64), prototypes_changed=False)
    added = session.execute(_vector_query(model).where(Embedding.seq > after).order_by(Embedding.seq)).all()
    removed = session.scalars(
        select(DeletedEmbedding.image_id).where(DeletedEmbedding.model == model, DeletedEmbedding.seq > after)
    ).all()
    protos = session.scalar(select(func.count()).where(Prototype.model == model, Prototype.seq > after)) or 0
    return Changes(now, _vectors(added), np.asarray(removed, dtype=np.int64), prototypes_changed=protos > 0)


def prune_deletions(session: Session, before: datetime) -> int:
    """Forget deletions logged before `before`; a cache older than that then rebuilds in full."""
    lock_changes(session)
    through = session.scalar(select(func.max(DeletedEmbedding.seq)).where(DeletedEmbedding.deleted_at < before))
    if through is None:
        return 0
    gone = session.execute(delete(DeletedEmbedding).where(DeletedEmbedding.seq <= through)).rowcount  # type: ignore[attr-defined]
    session.execute(
        update(CatalogueMeta).values(deletions_pruned_through=func.greatest(CatalogueMeta.deletions_pruned_through, through))
    )
    return int(gone)


def category_page(session: Session, category_id: int, offset: int, limit: int) -> Sequence[Image]:
    return session.scalars(
        select(Image).where(Image.category_id == category_id).order_by(Image.id).offset(offset).limit(limit)
    ).all()
