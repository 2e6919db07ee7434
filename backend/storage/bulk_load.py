"""Vectors stored in bulk by binary COPY: seeding large catalogues for the large test tier and benchmarks.

The rows are those `catalogue.add_images` writes (an image row without pixels, its embedding, its share of the
prototype sums), and every trigger runs as for any writer (change numbers, counts); only the round trips and
per-row parameter handling are gone.
"""

from collections.abc import Sequence

import numpy as np
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from backend.core.vectors import VECTOR_DTYPE
from backend.storage import catalogue
from backend.storage.change_log import lock_changes

_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
_TRAILER = b"\xff\xff"


def copy_engine(engine: Engine) -> Engine:
    """`engine`'s database through psycopg 3, for `add_vectors`' sessions: psycopg2's COPY does not work
    under the deadline wait callback that `engine.make_engine` installs."""
    return create_engine(engine.url.set(drivername="postgresql+psycopg"), poolclass=NullPool)


def add_vectors(session: Session, model: str, shas: Sequence[str], category_ids: np.ndarray, vectors: np.ndarray) -> list[int]:
    """Store `vectors` as pixel-less images with given labels `category_ids` (hex `shas` keep them unique),
    in `session`'s transaction; `session` is bound to a `copy_engine`."""
    n = len(vectors)
    if n == 0:
        return []
    lock_changes(session)  # the counting and stamping triggers take it too: one lock order
    new_ids = text("SELECT nextval(pg_get_serial_sequence('images', 'id')) FROM generate_series(1, :n)")
    ids = np.array(session.scalars(new_ids, {"n": n}).all(), dtype=np.int64)
    images = "".join(f"{i}\t{sha}\t\\\\x\t0\t1\t1\tPNG\t{c}\tt\n" for i, sha, c in zip(ids, shas, category_ids, strict=True))
    cursor = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    columns = "id, sha256, data, size_bytes, width, height, format, category_id, label_given"
    with cursor.copy(f"COPY images ({columns}) FROM STDIN") as copy:
        copy.write(images)
    with cursor.copy("COPY embeddings (image_id, model, dim, vector) FROM STDIN (FORMAT binary)") as copy:
        copy.write(_embedding_rows(ids, model, vectors))
    catalogue.add_to_prototypes(session, model, [int(c) for c in category_ids], vectors)
    return ids.tolist()


def _embedding_rows(ids: np.ndarray, model: str, vectors: np.ndarray) -> bytes:
    """COPY's binary rows: a field count, then each field's length and bytes (big-endian; the vector's bytes
    are stored as they are, little-endian float32)."""
    name = model.encode()
    dim = vectors.shape[1]
    row = np.dtype(
        [
            ("fields", ">i2"),
            ("l_id", ">i4"),
            ("id", ">i8"),
            ("l_model", ">i4"),
            ("model", f"S{len(name)}"),
            ("l_dim", ">i4"),
            ("dim", ">i4"),
            ("l_vec", ">i4"),
            ("vec", VECTOR_DTYPE, (dim,)),
        ]
    )
    rows = np.zeros(len(ids), dtype=row)
    rows["fields"], rows["l_id"], rows["id"] = 4, 8, ids
    rows["l_model"], rows["model"] = len(name), name
    rows["l_dim"], rows["dim"] = 4, dim
    rows["l_vec"], rows["vec"] = dim * VECTOR_DTYPE.itemsize, vectors
    return _HEADER + rows.tobytes() + _TRAILER
