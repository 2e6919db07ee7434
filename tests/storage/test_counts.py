"""The counts /status and /categories read (kept by migration 0008's triggers) against the rows themselves,
after every kind of write, concurrent writers, a backfill of rows stored before; and the map's sample."""

import threading

import numpy as np
from alembic import command
from sqlalchemy import Engine, func, select, text, update

from backend.storage import catalogue, migrate, vector_reader
from backend.storage.engine import session_scope
from backend.storage.schema import Category, Embedding, Image
from tests.storage.test_schema import MODEL, add


def exact(engine: Engine) -> tuple[list[tuple[int, str, int, int]], int, list[tuple[str, int]]]:
    """What the counters must say, counted row by row."""
    with session_scope(engine) as s:
        per_category = s.execute(
            select(Category.id, Category.name, func.count(Image.id), func.count(Image.id).filter(Image.label_given))
            .outerjoin(Image, Image.category_id == Category.id)
            .group_by(Category.id)
            .order_by(Category.name)
        ).all()
        images = s.scalar(select(func.count()).select_from(Image))
        models = s.execute(select(Embedding.model, func.count()).group_by(Embedding.model).order_by(Embedding.model)).all()
    return [tuple(r) for r in per_category], int(images or 0), [(m, int(n)) for m, n in models]  # type: ignore[misc]


def counted(engine: Engine) -> tuple[list[tuple[int, str, int, int]], int, list[tuple[str, int]]]:
    with session_scope(engine) as s:
        return catalogue.category_counts(s), catalogue.image_count(s), catalogue.model_ids(s)


def test_counts_follow_inserts_deletes_relabels_and_other_models(engine: Engine) -> None:
    ids = add(engine, 6, "a") + add(engine, 4, "b", seed=1)
    assert counted(engine) == exact(engine)
    assert counted(engine)[0][0][2:] == (6, 6)
    with session_scope(engine) as s:
        catalogue.delete_image(s, ids[0])
        b = catalogue.category_ids(s, ["b"])["b"]
        s.execute(update(Image).where(Image.id == ids[1]).values(category_id=b))  # moved
        s.execute(update(Image).where(Image.id == ids[2]).values(label_given=False))  # now a prediction
        s.execute(update(Image).where(Image.id == ids[3]).values(category_id=None))  # no category
        s.execute(update(Image).where(Image.id == ids[4]).values(description="only words"))  # counts alone
        catalogue.add_embeddings(s, "other/model", ids[1:5], np.ones((4, 16), dtype=np.float32))
        catalogue.ensure_categories(s, ["empty"])
    want = exact(engine)
    assert counted(engine) == want
    assert want[1] == 9 and dict(want[2]) == {MODEL: 9, "other/model": 4}
    assert [c[1:] for c in want[0]] == [("a", 3, 2), ("b", 5, 5), ("empty", 0, 0)]
    with session_scope(engine) as s:  # a writer outside the storage functions is counted as well
        s.execute(text("DELETE FROM embeddings WHERE model = 'other/model'"))
        s.execute(text("DELETE FROM images WHERE category_id IS NULL"))
    assert counted(engine) == exact(engine)
    with session_scope(engine) as s:
        s.execute(text("TRUNCATE images CASCADE"))
    assert counted(engine) == exact(engine) and counted(engine)[1] == 0


def test_concurrent_writers_are_counted_exactly_and_never_deadlock(engine: Engine) -> None:
    first = add(engine, 10, "a")
    failures: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for j in range(4):
                add(engine, 3, "ab"[(k + j) % 2], seed=1000 + 100 * k + j)
                if j < 2:
                    with session_scope(engine) as s:
                        catalogue.delete_image(s, first[k * 2 + j])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert counted(engine) == exact(engine)
    assert counted(engine)[1] == 10 + 4 * 4 * 3 - 8


def test_the_migration_counts_rows_stored_before_it(engine: Engine) -> None:
    add(engine, 7, "a")
    add(engine, 2, "b", seed=3)
    config = migrate._config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0006")
    add(engine, 5, "b", seed=4)  # stored without counters
    migrate.upgrade(engine)
    assert counted(engine) == exact(engine)
    assert counted(engine)[1] == 14


def test_the_map_sample_is_a_bottom_k_sketch_kept_by_writes(engine: Engine) -> None:
    ids = add(engine, 60, "a")
    with session_scope(engine) as s:
        whole = vector_reader.map_sample(s, MODEL, 1000)
        ten = vector_reader.map_sample(s, MODEL, 10)
        twenty = vector_reader.map_sample(s, MODEL, 20)
    assert sorted(whole.ids.tolist()) == sorted(ids)  # smaller than the sample: every image
    assert len(ten.ids) == 10 and set(ten.ids) < set(twenty.ids)  # the smallest keys: nested samples
    assert list(ten.ids) == sorted(ten.ids) and ten.vectors.shape == (10, 16)
    assert ten.ids.tolist() != sorted(ids)[:10]  # not the oldest ids: spread over the catalogue
    with session_scope(engine) as s:
        catalogue.delete_image(s, int(ten.ids[0]))
        after = vector_reader.map_sample(s, MODEL, 10)
    assert set(ten.ids[1:]) < set(after.ids) and len(after.ids) == 10  # one left, the next key came in
    assert int(after.ids[~np.isin(after.ids, ten.ids)][0]) in set(twenty.ids)
