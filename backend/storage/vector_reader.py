"""Bulk reads of stored vectors for the index: a binary COPY streamed on a second connection in the
session's snapshot, and the row-to-array conversion shared with the change log."""

from collections.abc import Iterator, Sequence

import numpy as np
from sqlalchemy import Row, Select, func, select, text
from sqlalchemy.orm import Session

from backend.core.vectors import VECTOR_DTYPE, StoredVectors
from backend.storage.engine import libpq_url
from backend.storage.schema import Embedding, Image


def stored_vectors(rows: Sequence[Row[int, int | None, bytes]]) -> StoredVectors:
    if not rows:
        return StoredVectors.empty()
    vectors = np.frombuffer(b"".join(raw for _, _, raw in rows), dtype=VECTOR_DTYPE).reshape(len(rows), -1)
    return StoredVectors(
        np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
        np.fromiter((-1 if r[1] is None else r[1] for r in rows), dtype=np.int64, count=len(rows)),
        vectors.astype(np.float32),
    )


def vector_query(model: str) -> Select[int, int | None, bytes]:
    return (
        select(Embedding.image_id, Image.category_id, Embedding.vector)
        .join(Image, Image.id == Embedding.image_id)
        .where(Embedding.model == model)
    )


def map_sample(session: Session, model: str, points: int) -> StoredVectors:
    """The `points` vectors of smallest hashint8(image id), by id: a uniform sample of `model`'s vectors that
    every insert and delete keeps (a bottom-k sketch), read along ix_embeddings_map_sample in O(points).
    Sorting and bitmap scans are ruled out for the rest of the caller's transaction: right after a bulk load,
    before autovacuum's ANALYZE, the planner would otherwise sort the whole catalogue (measured: 21 s at 100k)."""
    session.execute(text("SET LOCAL enable_sort = off"))
    session.execute(text("SET LOCAL enable_bitmapscan = off"))
    rows = session.execute(
        vector_query(model).order_by(func.hashint8(Embedding.image_id), Embedding.image_id).limit(points)
    ).all()
    stored = stored_vectors(rows)
    order = np.argsort(stored.ids, kind="stable")
    return StoredVectors(stored.ids[order], stored.category_ids[order], stored.vectors[order])


def load_vectors(session: Session, model: str, sample: tuple[int, int] | None = None, given_only: bool = False) -> StoredVectors:
    """`model`'s stored vectors (or a sample, see `stream_vectors`) in memory, by id."""
    stored = StoredVectors.concat(list(stream_vectors(session, model, sample=sample, given_only=given_only)))
    order = np.argsort(stored.ids, kind="stable")
    return StoredVectors(stored.ids[order], stored.category_ids[order], stored.vectors[order])


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
