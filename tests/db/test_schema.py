"""Migrations and the catalogue's storage contract on a real PostgreSQL."""

import numpy as np
from sqlalchemy import Engine, inspect

from backend import catalogue
from backend.db import migrate
from backend.db.session import session_scope
from backend.imaging import decode_image, encode_png


def test_migrations_create_schema_at_head(engine: Engine) -> None:
    assert migrate.current_revision(engine) == migrate.head_revision() == "0001"
    tables = set(inspect(engine).get_table_names())
    assert {"categories", "images", "embeddings", "prototypes", "alembic_version"} <= tables
    assert migrate.upgrade(engine) == "0001"  # idempotent


def test_vectors_round_trip_compactly(engine: Engine) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 1280)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    images = [decode_image(encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), 10**6) for _ in range(3)]
    with session_scope(engine) as s:
        cats = catalogue.ensure_categories(s, ["a", "b"])
        items = [catalogue.NewImage(img, cats["a" if i else "b"], True) for i, img in enumerate(images)]
        ids = catalogue.add_images(s, "m/test/8px", items, vectors)
    with session_scope(engine) as s:
        stored = catalogue.load_vectors(s, "m/test/8px")
        protos = catalogue.load_prototypes(s, "m/test/8px")
        raw = s.get(catalogue.Embedding, (ids[0], "m/test/8px")).vector
    assert len(raw) == 1280 * 4  # float32 bytes, nothing more
    np.testing.assert_array_equal(stored.vectors, vectors)
    assert stored.ids.tolist() == ids
    assert dict(zip(protos.category_ids.tolist(), protos.counts.tolist(), strict=True)) == {cats["a"]: 2, cats["b"]: 1}


def test_a_failed_transaction_writes_nothing(engine: Engine) -> None:
    with session_scope(engine) as s:
        catalogue.ensure_categories(s, ["kept"])
    try:
        with session_scope(engine) as s:
            catalogue.ensure_categories(s, ["lost"])
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with session_scope(engine) as s:
        assert set(catalogue.category_ids(s)) == {"kept"}
