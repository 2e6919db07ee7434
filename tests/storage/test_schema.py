"""Migrations and the catalogue's storage contract on a real PostgreSQL."""

import threading
import time

import numpy as np
from alembic import command
from sqlalchemy import Engine, inspect, text, update

from backend.imaging import decode_image, encode_png
from backend.storage import catalogue, change_log, migrate, vector_reader
from backend.storage.engine import session_scope
from backend.storage.schema import Image

MODEL = "m/test/8px"


def test_migrations_create_schema_at_head(engine: Engine) -> None:
    assert migrate.current_revision(engine) == migrate.head_revision() == "0010"
    tables = set(inspect(engine).get_table_names())
    assert {
        "categories",
        "images",
        "embeddings",
        "prototypes",
        "catalogue_meta",
        "deleted_embeddings",
        "api_keys",
        "shard_assignments",
        "shard_epochs",
    } <= tables
    assert migrate.upgrade(engine) == "0010"  # idempotent


def add(engine: Engine, n: int, category: str = "a", seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, 16)).astype(np.float32)
    images = [decode_image(encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), 10**6) for _ in range(n)]
    with session_scope(engine) as s:
        cid = catalogue.ensure_categories(s, [category])[category]
        return catalogue.add_images(s, MODEL, [catalogue.NewImage(img, cid, True) for img in images], vectors)


def test_each_database_is_a_catalogue_of_its_own(databases, engine: Engine) -> None:
    other = databases.new()
    with session_scope(engine) as a, session_scope(other) as b:
        assert change_log.identity(a).catalogue_id != change_log.identity(b).catalogue_id
    other.dispose()


def test_upgrading_a_filled_0001_database_numbers_its_rows(engine: Engine) -> None:
    config = migrate._config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
    with engine.begin() as conn:  # rows written by the old schema, with no change numbers
        conn.execute(text("INSERT INTO categories (name) VALUES ('old')"))
        conn.execute(
            text(
                "INSERT INTO images (sha256, data, size_bytes, width, height, format, category_id, label_given) "
                "SELECT md5(g::text) || md5(g::text), '', 0, 1, 1, 'PNG', 1, true FROM generate_series(1, 5) g"
            )
        )
        conn.execute(
            text("INSERT INTO embeddings (image_id, model, dim, vector) SELECT id, :m, 1, '\\x00000000' FROM images"),
            {"m": MODEL},
        )
    migrate.upgrade(engine)
    with session_scope(engine, snapshot=True) as s:
        changes = change_log.changes_since(s, MODEL, 0)
    assert changes.added.ids.tolist() == [1, 2, 3, 4, 5] and changes.seq == 5


def test_change_log_records_adds_deletes_and_relabels(engine: Engine) -> None:
    ids = add(engine, 4)
    with session_scope(engine, snapshot=True) as s:
        start = change_log.latest_seq(s, MODEL)
    with session_scope(engine) as s:
        catalogue.delete_image(s, ids[0])
    with session_scope(engine) as s:  # a label change by hand: the trigger re-numbers its embedding
        other = catalogue.ensure_categories(s, ["b"])["b"]
        s.execute(update(Image).where(Image.id == ids[1]).values(category_id=other))
    new = add(engine, 1, seed=1)
    with session_scope(engine, snapshot=True) as s:
        changes = change_log.changes_since(s, MODEL, start)
        assert change_log.changes_since(s, MODEL, changes.seq).added.ids.tolist() == []
    assert sorted(changes.removed.tolist()) == [ids[0], ids[1]]
    assert changes.added.ids.tolist() == [ids[1], *new] and changes.added.category_ids[0] == other
    assert changes.prototypes_changed


def test_change_numbers_follow_commit_order(engine: Engine) -> None:
    """A writer that started numbering first but commits last must not be overtaken: the second writer
    waits for the first to commit, so its numbers are larger and no reader skips the first's."""
    add(engine, 1)
    first_in = threading.Event()
    seen: dict[str, int] = {}

    def slow_writer() -> None:
        with session_scope(engine) as s:
            change_log.lock_changes(s)
            first_in.set()
            time.sleep(0.5)
            cid = catalogue.ensure_categories(s, ["slow"])["slow"]
            img = decode_image(encode_png(np.full((8, 8, 3), 7, np.uint8)), 10**6)
            seen["slow"] = catalogue.add_images(s, MODEL, [catalogue.NewImage(img, cid, True)], np.ones((1, 16), np.float32))[0]

    thread = threading.Thread(target=slow_writer)
    thread.start()
    first_in.wait()
    seen["fast"] = add(engine, 1, seed=2)[0]
    thread.join()
    with session_scope(engine) as s:
        seq = dict(s.execute(text("SELECT image_id, seq FROM embeddings")).all())
    assert seq[seen["slow"]] < seq[seen["fast"]]


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
        stored = vector_reader.load_vectors(s, "m/test/8px")
        protos = catalogue.load_prototypes(s, "m/test/8px")
        raw = s.get(catalogue.Embedding, (ids[0], "m/test/8px")).vector
    assert len(raw) == 1280 * 4  # float32 bytes, nothing more
    np.testing.assert_array_equal(stored.vectors, vectors)
    assert stored.ids.tolist() == ids
    assert dict(zip(protos.category_ids.tolist(), protos.counts.tolist(), strict=True)) == {cats["a"]: 2, cats["b"]: 1}


def stored_out_of_line(engine: Engine) -> tuple[str, int]:
    """The vector column's storage and the bytes of the embeddings table's TOAST relation."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT a.attstorage, pg_relation_size(c.reltoastrelid) FROM pg_class c "
                "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'vector' WHERE c.relname = 'embeddings'"
            )
        ).one()


def test_vectors_are_stored_inline_and_0005_downgrades_cleanly(engine: Engine) -> None:
    migrate.downgrade(engine, "0004")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 1280)).astype(np.float32)  # written the old way: each 5 KB out of line, in TOAST
    images = [decode_image(encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), 10**6) for _ in range(20)]
    with session_scope(engine) as s:
        cid = catalogue.ensure_categories(s, ["a"])["a"]
        ids = catalogue.add_images(s, "m/big", [catalogue.NewImage(img, cid, True) for img in images], vectors)
    assert stored_out_of_line(engine)[0] == "x" and stored_out_of_line(engine)[1] > 20 * 5120
    with session_scope(engine, snapshot=True) as s:
        before, head = vector_reader.load_vectors(s, "m/big"), change_log.latest_seq(s, "m/big")
    migrate.upgrade(engine)  # rewrites the table: every vector inline, nothing changed
    assert stored_out_of_line(engine) == ("m", 0)
    with session_scope(engine, snapshot=True) as s:
        after = vector_reader.load_vectors(s, "m/big")  # through the binary COPY reader
        assert change_log.latest_seq(s, "m/big") == head and change_log.changes_since(s, "m/big", head).added.ids.tolist() == []
    np.testing.assert_array_equal(after.vectors, before.vectors)
    assert after.ids.tolist() == ids and np.array_equal(after.vectors, vectors)
    migrate.downgrade(engine, "0004")  # and back: out of line again, the same values
    assert stored_out_of_line(engine)[0] == "x" and stored_out_of_line(engine)[1] > 0
    with session_scope(engine) as s:
        np.testing.assert_array_equal(vector_reader.load_vectors(s, "m/big").vectors, before.vectors)
    migrate.upgrade(engine)


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
