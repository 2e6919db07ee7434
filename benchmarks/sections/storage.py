"""How the stored vectors are laid out in PostgreSQL, measured on one database: inline (migration 0005,
STORAGE MAIN) against out of line in TOAST (0004, each 5 KB vector three chunks behind the TOAST index).
A full rebuild reads every vector through the binary COPY reader, `vector_reader.load_vectors`."""

import time

from sqlalchemy import Engine, text

from backend.storage import migrate, vector_reader
from backend.storage.engine import session_scope


def _read_rate(engine: Engine, model: str) -> float:
    t = time.perf_counter()
    with session_scope(engine, snapshot=True, bulk=True) as session:
        n = len(vector_reader.load_vectors(session, model))
    return n / (time.perf_counter() - t)


def _table_mb(engine: Engine) -> tuple[float, float]:
    with engine.connect() as conn:
        main, toast = conn.execute(
            text("SELECT pg_relation_size(oid), pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'embeddings'")
        ).one()
    return main / 2**20, toast / 2**20


def _migrate(engine: Engine, revision: str) -> float:
    t = time.perf_counter()
    if revision == "head":
        migrate.upgrade(engine)
    else:
        migrate.downgrade(engine, revision)
    return time.perf_counter() - t


def compare(engine: Engine, model: str) -> dict:
    """Read rates (vectors/s, each read twice, the second kept: warm caches both times) and table sizes."""
    _read_rate(engine, model)
    inline = _read_rate(engine, model)
    inline_mb = _table_mb(engine)
    to_toast_s = _migrate(engine, "0004")
    _read_rate(engine, model)
    toast = _read_rate(engine, model)
    toast_mb = _table_mb(engine)
    to_inline_s = _migrate(engine, "head")
    return {
        "inline_read_vectors_per_s": round(inline),
        "toast_read_vectors_per_s": round(toast),
        "inline_table_mb": [round(v) for v in inline_mb],  # [table, TOAST]
        "toast_table_mb": [round(v) for v in toast_mb],
        "migration_0005_s": round(to_inline_s, 1),
        "downgrade_s": round(to_toast_s, 1),
    }
