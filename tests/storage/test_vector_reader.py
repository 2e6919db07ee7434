"""The bulk vector read: one COPY or several over id ranges in one snapshot give exactly the stored vectors,
whatever the chunk size (the reused parse buffer rolls over mid-row), and a write after the snapshot is not seen."""

import numpy as np
from sqlalchemy import Engine, text

from backend.core.vectors import l2_normalise
from backend.imaging import ImageBytes
from backend.storage import catalogue, vector_reader
from backend.storage.engine import session_scope

MODEL, DIM = "synthetic/none/0px", 1280


def _store(engine: Engine, x: np.ndarray, first: int) -> list[int]:
    with session_scope(engine) as s:
        cats = catalogue.ensure_categories(s, ["a", "b", "c"])
        items = [
            catalogue.NewImage(ImageBytes(b"", f"{first + i:064x}", "PNG", 1, 1), cats["abc"[i % 3]], label_given=True)
            for i in range(len(x))
        ]
        return catalogue.add_images(s, MODEL, items, x)


def test_parallel_reads_give_every_vector_once_in_one_snapshot(engine: Engine) -> None:
    rng = np.random.default_rng(0)
    x = l2_normalise(rng.standard_normal((1_500, DIM), dtype=np.float32))
    ids = np.array(_store(engine, x, 0))
    with session_scope(engine, snapshot=True, bulk=True) as session:
        session.execute(text("SELECT 1"))  # the snapshot is taken here
        _store(engine, x[:10] * 0 + x[0], 10_000)  # committed after the snapshot: not seen
        for connections, chunk_rows in ((1, 50_000), (1, 97), (3, 300), (8, 1_000)):
            parts = list(vector_reader.stream_vectors(session, MODEL, chunk_rows, connections=connections))
            got = vector_reader.StoredVectors.concat(parts)
            order = np.argsort(got.ids)
            assert np.array_equal(got.ids[order], ids), (connections, chunk_rows)
            assert np.array_equal(got.vectors[order], x), (connections, chunk_rows)
            assert set(got.category_ids.tolist()) == set(catalogue.category_ids(session).values())
            if chunk_rows < 1_000:
                assert len(parts) > 1
        loaded = vector_reader.load_vectors(session, MODEL, connections=4)
        assert np.array_equal(loaded.ids, ids) and np.array_equal(loaded.vectors, x)
