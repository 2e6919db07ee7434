"""The pieces of the cluster that need no Ray: packing, the assignment's epochs, and an index restricted to one
group's categories (built from the database and following the change log) against the full index."""

import uuid
from datetime import timedelta
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import Engine, func, update

from backend.cluster.packing import bin_pack
from backend.imaging import ImageBytes
from backend.search.live_index import LiveIndex
from backend.storage import catalogue, shards
from backend.storage.engine import session_scope
from backend.storage.schema import ShardRouter

MODEL, DIM = "synthetic/none/0px", 64


def add(engine: Engine, categories: list[str], rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    """One image per entry of `categories`, with a random unit vector; their ids and vectors."""
    x = rng.standard_normal((len(categories), DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with session_scope(engine) as s:
        cats = catalogue.ensure_categories(s, sorted(set(categories)))
        items = [catalogue.NewImage(ImageBytes(b"", uuid.uuid4().hex * 2, "PNG", 1, 1), cats[c], True) for c in categories]
        return catalogue.add_images(s, MODEL, items, x), x


def test_bin_pack_balances_groups_by_vector_count() -> None:
    vectors = {1: 100, 2: 90, 3: 50, 4: 40, 5: 10, 6: 0}
    groups = bin_pack(vectors, 2)
    assert set(groups) == set(vectors) and set(groups.values()) == {0, 1}
    loads = [sum(n for c, n in vectors.items() if groups[c] == g) for g in (0, 1)]
    assert sorted(loads) == [140, 150]


def test_the_first_assignment_wins_and_epochs_only_grow(engine: Engine) -> None:
    with session_scope(engine) as s:
        assert shards.newest(s).epoch == 0
        first = shards.store(s, {1: 0, 2: 1}, {1: 5, 2: 7}, expected_epoch=0)
    with session_scope(engine) as s:
        late = shards.store(s, {1: 1, 2: 0}, {}, expected_epoch=0)  # another server packed meanwhile
    assert first.epoch == late.epoch == 1 and late.group_of == {1: 0, 2: 1}
    assert late.categories(0).contains(1) and not late.categories(0).contains(2)
    assert late.group_for(7) == late.categories(1).group and late.categories(1).contains(7)  # new: |7| mod 2


def test_a_group_index_holds_its_categories_and_follows_only_their_changes(engine: Engine, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids, x = add(engine, ["a", "b", "c"] * 30, rng)
    with session_scope(engine) as s:
        names = catalogue.category_ids(s)
        vectors = catalogue.category_vector_counts(s, MODEL)
        assignment = shards.store(s, {names["a"]: 0, names["b"]: 1, names["c"]: 0}, vectors, expected_epoch=0)
    group0 = assignment.categories(0)
    full = LiveIndex(engine, MODEL, DIM, tmp_path / "full")
    part = LiveIndex(engine, MODEL, DIM, tmp_path / "g0", categories=group0)
    assert part.get().ntotal == 60 and full.get().ntotal == 90
    # Exact search restricted to group 0's categories: the same hits from the part as from the full index.
    q = x[:5]
    positions = np.asarray([[full.get().list_of[names["a"]], full.get().list_of[names["c"]]]] * 5)
    want = full.get().search(q, 10, positions)
    got = part.get().search(q, 10, np.asarray([[part.get().list_of[names["a"]], part.get().list_of[names["c"]]]] * 5))
    assert (got.ids == want.ids).all()
    # Changes: one more of "b" (group 1), one of "a" (group 0), one of a new category, a deletion in "a".
    new_ids, _ = add(engine, ["b", "a", "zz"], rng)
    with session_scope(engine) as s:
        catalogue.delete_image(s, ids[0])  # category "a"
        zz = catalogue.category_ids(s)["zz"]
    part.refresh()
    held = set(_ids(part))
    assert new_ids[1] in held and new_ids[0] not in held and ids[0] not in held
    assert (new_ids[2] in held) == group0.contains(zz)
    assert part.get().ntotal == 60 + 1 - 1 + int(group0.contains(zz))


def _ids(cache: LiveIndex) -> list[int]:
    index = cache.get()
    out: list[int] = []
    for lst in range(index.ivf.nlist):
        n = index.ivf.invlists.list_size(lst)
        if n:
            out += faiss.rev_swig_ptr(index.ivf.invlists.get_ids(lst), n).tolist()
    return out


def test_a_rebalance_epoch_builds_then_wins_or_loses_and_old_epochs_retire(engine: Engine) -> None:
    with session_scope(engine) as s:
        first = shards.store(s, {1: 0, 2: 1}, {1: 5, 2: 7}, expected_epoch=0, groups=2, replicas=2)
        building = shards.store(s, {1: 0, 2: 1, 3: 2}, {}, expected_epoch=1, groups=3, replicas=2, state=shards.BUILDING)
    assert (first.epoch, first.state, building.epoch, building.state) == (1, shards.ACTIVE, 2, shards.BUILDING)
    with session_scope(engine) as s:
        seen = shards.epochs(s)
        assert (seen.active, seen.pending, seen.draining) == (1, 2, ())
        assert shards.newest(s).epoch == 1  # routers stay on the active epoch while the new one builds
        lost = shards.store(s, {1: 1}, {}, expected_epoch=1, state=shards.BUILDING)  # a second rebalancer, late
        assert lost.epoch == 2 and lost.groups == 3  # it gets the winner's epoch, not a new one
        later = shards.store(s, {1: 0}, {}, expected_epoch=2, groups=4, state=shards.BUILDING)
    with session_scope(engine) as s:
        assert not shards.activate(s, 2)  # a newer epoch was stored: epoch 2 loses
        assert shards.activate(s, later.epoch) and shards.activate(s, later.epoch)  # idempotent
    with session_scope(engine) as s:
        seen = shards.epochs(s)
        assert (seen.active, seen.pending, seen.draining, seen.retirable) == (3, None, (1, 2), (1, 2))
        assert seen.active_for_s < 60
        assert shards.newest(s).groups == 4  # the group count is stored, even for groups left empty
        shards.router_seen(s, "a", 3)
        shards.router_seen(s, "b", 1)  # a server whose switch is under way: epoch 1 is not retired yet
        assert shards.epochs(s).retirable == ()
        shards.router_seen(s, "b", 2)
        assert shards.epochs(s).retirable == (1,)
        s.execute(update(ShardRouter).where(ShardRouter.router_id == "b").values(seen_at=func.now() - timedelta(hours=1)))
        assert shards.epochs(s).retirable == (1, 2)  # a router not seen lately is taken for gone
        shards.router_seen(s, "b", 2)
        shards.router_gone(s, "b")
        assert shards.epochs(s).retirable == (1, 2)
        shards.retired(s, [1, 2, 3])  # never the active epoch
    with session_scope(engine) as s:
        assert shards.epochs(s).draining == () and shards.newest(s).epoch == 3
    with shards.retirement_claimed(engine) as claimed, shards.retirement_claimed(engine) as again:
        assert claimed and not again  # one retirer at a time
    with shards.retirement_claimed(engine) as claimed:
        assert claimed  # released at the end of the block


def test_epochs_stored_before_0010_are_kept_the_newest_active(engine: Engine) -> None:
    from alembic import command
    from sqlalchemy import text

    from backend.storage import migrate

    config = migrate._config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0009")
    with engine.begin() as conn:  # two epochs in the old table alone
        conn.execute(text("INSERT INTO shard_assignments (epoch, category_id, group_no, vectors) VALUES "
                          "(1, 1, 0, 5), (1, 2, 1, 7), (2, 1, 1, 5), (2, 2, 0, 7)"))  # fmt: skip
    migrate.upgrade(engine)
    with session_scope(engine) as s:
        seen = shards.epochs(s)
        current = shards.newest(s)
    assert (seen.active, seen.pending, seen.draining) == (2, None, ())
    assert current.group_of == {1: 1, 2: 0} and current.groups == 2 and current.replicas is None

    with session_scope(engine) as s:  # an epoch never activated is not kept when going back to 0009
        shards.store(s, {1: 0, 2: 0}, {}, expected_epoch=2, groups=1, state=shards.BUILDING)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0009")
        left = conn.execute(text("SELECT DISTINCT epoch FROM shard_assignments ORDER BY epoch")).scalars().all()
    migrate.upgrade(engine)
    assert left == [1, 2]
