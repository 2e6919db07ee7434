"""Bulk reads of stored vectors for the index: a binary COPY streamed on a second connection in the
session's snapshot, and the row-to-array conversion shared with the change log."""

import functools
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Row, Select, func, select, text
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


def load_vectors(
    session: Session,
    model: str,
    sample: tuple[int, int] | None = None,
    given_only: bool = False,
    connections: int = 1,
    categories: CategorySet | None = None,
) -> StoredVectors:
    """`model`'s stored vectors (or a sample, see `stream_vectors`) in memory, by id."""
    parts = list(
        stream_vectors(session, model, sample=sample, given_only=given_only, connections=connections, categories=categories)
    )
    if not parts:
        return StoredVectors.concat(parts)
    ids = np.concatenate([p.ids for p in parts])
    order = np.argsort(ids, kind="stable")
    place = np.empty_like(order)
    place[order] = np.arange(len(order))  # each streamed row's place in id order
    vectors = np.empty((len(ids), parts[0].vectors.shape[1]), parts[0].vectors.dtype)
    category_ids = np.concatenate([p.category_ids for p in parts])[order]
    start = 0
    parts.reverse()
    while parts:  # each chunk copied into place, then let go: twice the vectors at the peak, not three times
        part = parts.pop()
        vectors[place[start : start + len(part)]] = part.vectors
        start += len(part)
        del part
    return StoredVectors(ids[order], category_ids, vectors)


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # signature, flags 0, no header extension
_COPY_TRAILER = b"\xff\xff"


@dataclass(frozen=True)
class _Copy:
    """One COPY of stored vectors, run on its own connection inside an exported snapshot."""

    url: str
    snapshot: str
    timeout_s: float | None
    query: str
    params: tuple[object, ...]
    dim: int


def stream_vectors(
    session: Session,
    model: str,
    chunk_rows: int = 50_000,
    sample: tuple[int, int] | None = None,
    given_only: bool = False,
    connections: int = 1,
    categories: CategorySet | None = None,
) -> Iterator[StoredVectors]:
    """`model`'s stored vectors in chunks, read with a binary COPY (no per-row decoding: fixed-size rows
    parsed by NumPy) on a second connection that imports this session's snapshot, so the stream sees
    exactly what the session sees. `sample=(multiplier, cut)`: only ids with id*multiplier % 10000 < cut
    (`backend.index.sampling.train_sample`'s rule); `given_only`: only images whose label was given (stage 1's training).
    `connections` > 1: that many COPYs at once, each over a share of the id range, all in the same snapshot
    (the database de-TOASTs and sends on several cores); chunks then come in no particular order.
    `categories`: only those one cluster group holds."""
    snapshot = session.scalar(text("SELECT pg_export_snapshot()"))
    dim = session.scalar(select(Embedding.dim).where(Embedding.model == model).limit(1))
    if dim is None:
        return
    where = "e.model = %s" + (" AND i.label_given" if given_only else "")
    where += " AND (e.image_id * %s) %% 10000 < %s" if sample else ""
    params: tuple[object, ...] = (model, *sample) if sample else (model,)
    if categories is not None:
        clause, values = categories.sql("coalesce(i.category_id, -1)")
        where += f" AND {clause}"
        params = (*params, *values)
    ranges = _id_ranges(session, model, connections)
    url = libpq_url(session.get_bind().engine)
    timeout = getattr(session.connection().connection.dbapi_connection, "timeout_s", None)
    copies = [
        _Copy(
            url,
            snapshot,
            timeout,
            "COPY (SELECT e.image_id, coalesce(i.category_id, -1)::int8, e.vector FROM embeddings e "
            f"JOIN images i ON i.id = e.image_id WHERE {where}"
            + ("" if r is None else " AND e.image_id >= %s AND e.image_id < %s")
            + ") TO STDOUT (FORMAT binary)",
            params if r is None else (*params, *r),
            dim,
        )
        for r in ranges
    ]
    if len(copies) == 1:
        yield from _run_copy(copies[0], chunk_rows)
    else:
        per_reader = max(1_000, chunk_rows // len(copies))  # the chunks in flight stay about `chunk_rows` in all
        yield from _merged([functools.partial(_run_copy, c, per_reader) for c in copies])


def _id_ranges(session: Session, model: str, parts: int) -> list[tuple[int, int] | None]:
    """`parts` id ranges [low, high) that cover `model`'s stored ids (one part: no range at all)."""
    if parts <= 1:
        return [None]
    low, high = session.execute(
        select(func.min(Embedding.image_id), func.max(Embedding.image_id)).where(Embedding.model == model)
    ).one()
    if low is None or high - low < parts:
        return [None]
    cuts = [int(c) for c in np.linspace(low, high + 1, parts + 1)]
    return list(itertools.pairwise(cuts))


def _run_copy(copy: _Copy, chunk_rows: int) -> Iterator[StoredVectors]:
    import psycopg

    row = np.dtype(  # COPY's binary rows: a field count, then each field's length and bytes (big-endian)
        [
            ("fields", ">i2"),
            ("l_id", ">i4"),
            ("id", ">i8"),
            ("l_cat", ">i4"),
            ("cat", ">i8"),
            ("l_vec", ">i4"),
            ("vec", VECTOR_DTYPE, (copy.dim,)),
        ]
    )
    timeout = copy.timeout_s
    with psycopg.connect(copy.url, connect_timeout=max(1, round(timeout or 10)), autocommit=False) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(f"SET TRANSACTION SNAPSHOT '{copy.snapshot}'")  # a server-made id: no quoting needed
        if timeout:
            conn.execute(f"SET statement_timeout = {round(timeout * 1000)}")
        with conn.cursor().copy(copy.query, copy.params) as stream:
            yield from _parse_stream(stream, row, copy.dim, chunk_rows)


def _parse_stream(
    blocks: Iterable[bytes | bytearray | memoryview], row: np.dtype, dim: int, chunk_rows: int
) -> Iterator[StoredVectors]:
    """The COPY's blocks gathered into one buffer that is reused for every chunk: freshly allocated memory
    costs page faults (on a VM, more than the copy itself), so each chunk allocates only its result."""
    raw = np.empty(chunk_rows * row.itemsize + len(_COPY_HEADER), np.uint8)
    end = 0  # bytes in raw
    started = False
    for block in blocks:
        size = len(block)
        if end + size > len(raw):
            whole = (end // row.itemsize) * row.itemsize
            yield _parse_rows(raw[:whole], row, dim)
            raw[: end - whole] = raw[whole:end]  # the start of a row: kept for the next chunk
            end -= whole
            if end + size > len(raw):
                raw = np.concatenate([raw, np.empty(end + size, np.uint8)])
        raw[end : end + size] = np.frombuffer(block, np.uint8)
        end += size
        if not started and end >= len(_COPY_HEADER):
            if raw[: len(_COPY_HEADER)].tobytes() != _COPY_HEADER:
                raise ValueError("unexpected COPY header")
            raw[: end - len(_COPY_HEADER)] = raw[len(_COPY_HEADER) : end].copy()
            end -= len(_COPY_HEADER)
            started = True
    if not started or end < 2 or raw[end - 2 : end].tobytes() != _COPY_TRAILER:
        raise ValueError("truncated COPY stream")
    end -= 2
    if end % row.itemsize:
        raise ValueError(f"stored vectors of another size than {dim} dimensions")
    if end:
        yield _parse_rows(raw[:end], row, dim)


_DONE = object()


def _merged(sources: list[Callable[[], Iterator[StoredVectors]]]) -> Iterator[StoredVectors]:
    """The chunks of every source, each read by a thread of its own, through a queue of one chunk per
    source (memory stays bounded). The first error of any source is raised here; when the consumer stops
    early, the threads stop at their next chunk."""
    out: queue.Queue[object] = queue.Queue(maxsize=len(sources))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(source: Callable[[], Iterator[StoredVectors]]) -> None:
        try:
            for chunk in source():
                if not put(chunk):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    threads = [threading.Thread(target=run, args=(s,), name="vector-copy", daemon=True) for s in sources]
    for t in threads:
        t.start()
    try:
        left = len(threads)
        while left:
            item = out.get()
            if item is _DONE:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        stop.set()
        for t in threads:
            t.join()


def _parse_rows(raw: np.ndarray, row: np.dtype, dim: int) -> StoredVectors:
    """The whole rows in `raw` (a multiple of the row size) as vectors, copied out of it."""
    rows = raw.view(row)
    if (rows["fields"] != 3).any() or (rows["l_id"] != 8).any() or (rows["l_cat"] != 8).any() or (rows["l_vec"] != dim * 4).any():
        raise ValueError(f"stored vectors of another size than {dim} dimensions")
    vectors = np.empty((len(rows), dim), np.float32)
    vectors[:] = rows["vec"]
    return StoredVectors(rows["id"].astype(np.int64), rows["cat"].astype(np.int64), vectors)
