"""Bulk reads of stored vectors for the index: a binary COPY streamed on a second connection in the
session's snapshot, and the row-to-array conversion shared with the change log."""

from collections.abc import Iterator, Sequence

import numpy as np
from sqlalchemy import Row, Select, select, text
from sqlalchemy.orm import Session

from backend.core.vectors import VECTOR_DTYPE, StoredVectors
from backend.storage.engine import libpq_url
from backend.storage.schema import Embedding, Image
from backend.storage.shards import CategorySet


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


def load_vectors(
    session: Session,
    model: str,
    sample: tuple[int, int] | None = None,
    given_only: bool = False,
    categories: CategorySet | None = None,
) -> StoredVectors:
    """`model`'s stored vectors (or a sample, see `stream_vectors`) in memory, by id."""
    parts = stream_vectors(session, model, sample=sample, given_only=given_only, categories=categories)
    stored = StoredVectors.concat(list(parts))
    order = np.argsort(stored.ids, kind="stable")
    return StoredVectors(stored.ids[order], stored.category_ids[order], stored.vectors[order])


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # signature, flags 0, no header extension
_COPY_TRAILER = b"\xff\xff"


def stream_vectors(
    session: Session,
    model: str,
    chunk_rows: int = 50_000,
    sample: tuple[int, int] | None = None,
    given_only: bool = False,
    categories: CategorySet | None = None,
) -> Iterator[StoredVectors]:
    """`model`'s stored vectors in chunks, read with a binary COPY (no per-row decoding: fixed-size rows
    parsed by NumPy) on a second connection that imports this session's snapshot, so the stream sees
    exactly what the session sees. `sample=(multiplier, cut)`: only ids with id*multiplier % 10000 < cut
    (`backend.index.sampling.train_sample`'s rule); `given_only`: only images whose label was given (stage 1's training);
    `categories`: only those one cluster group holds."""
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
    params: list[object] = [model, *(sample or ())]
    if categories is not None:
        clause, values = categories.sql("coalesce(i.category_id, -1)")
        where += f" AND {clause}"
        params += values
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
        with conn.cursor().copy(query, params) as copy:
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
