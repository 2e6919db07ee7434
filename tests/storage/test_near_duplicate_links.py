"""Near-duplicate links and groups in a real PostgreSQL (migration 0007), on stored CIFAR-10 images: union as
links arrive, split as images leave, and racing writers that link and delete the same groups at once."""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, select

from backend.sources.datasets import Dataset
from backend.storage import catalogue
from backend.storage import near_duplicates as links_table
from backend.storage.engine import session_scope
from backend.storage.schema import Image, NearDuplicateMember
from tests.utils.catalogue import small_catalogue
from tests.utils.near_duplicates import check_groups

MODEL = "m/links"


@pytest.fixture
def ids(databases, embedder, cifar_train: Dataset) -> tuple[Engine, list[int]]:
    engine = small_catalogue(databases, embedder, cifar_train, 40)
    with session_scope(engine) as s:
        links_table.ensure_state(s, MODEL, 0.91)
        return engine, list(s.scalars(select(Image.id).order_by(Image.id)))


def link(engine: Engine, *pairs: tuple[int, int, float]) -> int:
    with session_scope(engine) as s:
        return links_table.add_links(s, MODEL, 0.91, pairs)


def group_of(engine: Engine, image_id: int) -> int | None:
    with session_scope(engine) as s:
        return s.scalar(select(NearDuplicateMember.group_id).where(NearDuplicateMember.image_id == image_id))


def delete(engine: Engine, image_id: int) -> None:
    with session_scope(engine) as s:
        catalogue.delete_image(s, image_id)


def test_links_merge_groups_and_a_delete_splits_only_its_own(ids) -> None:
    engine, i = ids
    assert link(engine, (i[1], i[0], 0.95), (i[2], i[3], 0.93), (i[3], i[4], 0.92), (i[8], i[9], 0.99)) == 4
    assert check_groups(engine, MODEL) == [[i[0], i[1]], [i[2], i[3], i[4]], [i[8], i[9]]]
    larger, other = group_of(engine, i[2]), group_of(engine, i[8])
    assert link(engine, (i[1], i[2], 0.97), (i[0], i[1], 0.96)) == 1  # the second is stored already (either order)
    assert check_groups(engine, MODEL) == [[i[0], i[1], i[2], i[3], i[4]], [i[8], i[9]]]
    assert group_of(engine, i[0]) == larger  # the smaller group was relabelled, the larger kept its id
    delete(engine, i[2])  # the bridge: two groups again, the other group untouched
    assert check_groups(engine, MODEL) == [[i[0], i[1]], [i[3], i[4]], [i[8], i[9]]]
    assert group_of(engine, i[8]) == other and group_of(engine, i[2]) is None
    delete(engine, i[0])  # i[1] is left without a link: it leaves its group, which is gone
    assert check_groups(engine, MODEL) == [[i[3], i[4]], [i[8], i[9]]] and group_of(engine, i[1]) is None
    assert link(engine, (i[5], i[2], 0.99), (i[6], i[6], 1.0)) == 0  # a deleted image, a self-link: nothing stored
    with session_scope(engine) as s:
        page = links_table.group_page(s, MODEL, 0, 10)
        assert [[m for m, _ in g.members] for g in page] == [[i[8], i[9]], [i[3], i[4]]]  # same size: strongest first
        assert page[0].max_score == pytest.approx(0.99) and page[0].group_id == other
        assert links_table.group_page(s, MODEL, 1, 1)[0].group_id == group_of(engine, i[3])


def test_a_new_threshold_drops_the_links_and_starts_over(ids) -> None:
    engine, i = ids
    link(engine, (i[0], i[1], 0.95))
    with session_scope(engine) as s:
        assert links_table.advance(s, MODEL, 0, 42)
    with session_scope(engine) as s:
        same = links_table.ensure_state(s, MODEL, 0.91)
        assert (same.links_seq, same.groups) == (42, 1)
    with session_scope(engine) as s:
        moved = links_table.ensure_state(s, MODEL, 0.95)
    assert (moved.links_seq, moved.groups) == (0, 0) and check_groups(engine, MODEL) == []


def test_racing_writers_keep_groups_the_components_of_the_links(ids) -> None:
    """8 writers link random pairs (merging the same groups at once) while 2 delete images: afterwards every
    group is exactly a connected component of the stored links, with its size, scores and count."""
    engine, i = ids
    doomed = set(i[30:36])

    def writer(seed: int) -> int:
        rng = random.Random(seed)
        added = 0
        for _ in range(25):
            pairs = [(rng.choice(i), rng.choice(i), rng.uniform(0.91, 1.0)) for _ in range(rng.randint(1, 4))]
            added += link(engine, *pairs)
        return added

    def deleter(seed: int) -> int:
        for image_id in sorted(doomed)[seed::2]:
            delete(engine, image_id)
        return 0

    with ThreadPoolExecutor(10) as pool:
        done = [pool.submit(writer, s) for s in range(8)] + [pool.submit(deleter, s) for s in range(2)]
        added = sum(f.result() for f in done)
    groups = check_groups(engine, MODEL)
    assert added > 50 and groups and not doomed & {m for g in groups for m in g}
    with session_scope(engine) as s:
        assert links_table.state(s, MODEL).groups == len(groups)  # type: ignore[union-attr]
