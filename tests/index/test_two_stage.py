"""The two-stage index on synthetic clustered vectors, checked against NumPy, for every type and codec."""

import io
from dataclasses import replace

import numpy as np
import pytest

from backend.core.vectors import PrototypeMatrix, StoredVectors
from backend.index.layout import IndexLayout
from backend.index.two_stage import TwoStageIndex

DIM = 32
SPECS = [
    IndexLayout("flat"),
    IndexLayout("ivf", list_size=30),
    IndexLayout("ivf", "float16", 30),
    IndexLayout("ivf", "sq8", 30),
    IndexLayout("ivf", "pq8", 30),
    IndexLayout("flat", "sq8"),
    IndexLayout("ivf", "pq8", 30, rerank="float32"),
    IndexLayout("ivf", "sq8", 30, rerank="float16"),
]
IDS = [f"{s.kind}-{s.codec}-{s.rerank}" for s in SPECS]


@pytest.fixture
def data() -> tuple[StoredVectors, PrototypeMatrix]:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(6, DIM))
    cats = rng.integers(0, 6, 900)
    x = centres[cats] + 0.8 * rng.normal(size=(900, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(1000, 1900, dtype=np.int64)
    cat_ids = cats.astype(np.int64) + 10
    return StoredVectors(ids, cat_ids, x), PrototypeMatrix.of(cat_ids, x)


def build(data: tuple[StoredVectors, PrototypeMatrix], spec: IndexLayout | None = None) -> TwoStageIndex:
    stored, protos = data
    return TwoStageIndex.build("m", DIM, list(range(10, 16)), stored, protos, spec)


def round_trip(index: TwoStageIndex, protos: PrototypeMatrix) -> TwoStageIndex:
    buf = io.BytesIO()
    index.write(buf.write)
    buf.seek(0)
    loaded = TwoStageIndex.read(buf.read, index.describe())
    loaded.set_prototypes(protos)
    return loaded


def test_exact_matches_numpy(data) -> None:
    stored, _ = data
    index = build(data)
    q = stored.vectors[:5] + 0.1
    hits = index.search(q, 15)
    for row, query in enumerate(q):
        scores = stored.vectors @ query
        np.testing.assert_allclose(hits.scores[row], np.sort(scores)[::-1][:15], atol=1e-5)
    assert (hits.scanned == 900).all()


def test_flat_two_stage_scans_exactly_the_top_categories(data) -> None:
    stored, protos = data
    index = build(data)
    q = stored.vectors[:20]
    _, cats = index.rank_categories(q)
    np.testing.assert_array_equal(cats[:, 0], np.argmax(q @ protos.vectors.T, axis=1))
    hits = index.search(q, 10, cats[:, :2])
    sizes = index.category_sizes()
    for row in range(len(q)):
        allowed = {index.category_ids[i] for i in cats[row, :2]}
        mask = np.isin(stored.category_ids, list(allowed))
        assert hits.scanned[row] == sizes[cats[row, :2]].sum() == mask.sum()
        got = set(hits.ids[row].tolist())
        want = stored.ids[mask][np.argsort(-(stored.vectors[mask] @ q[row]))[:10]]
        assert got == set(want.tolist())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_results_only_from_the_top_categories(data, spec: IndexLayout) -> None:
    stored, _ = data
    index = build(data, spec)
    q = stored.vectors[:40] + 0.05
    _, cats = index.rank_categories(q)
    for top, nprobe in ((1, 2), (2, 3), (3, 100)):
        hits = index.search(q, 10, cats[:, :top], nprobe)
        category_of = dict(zip(stored.ids.tolist(), stored.category_ids.tolist(), strict=True))
        for row in range(len(q)):
            allowed = {index.category_ids[c] for c in cats[row, :top]}
            found = [category_of[i] for i in hits.ids[row] if i >= 0]
            assert found and set(found) <= allowed
            if spec.kind == "ivf":  # nprobe sub-lists at most, each smaller than its category
                assert hits.scanned[row] <= index.category_sizes()[cats[row, :top]].sum()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_ivf_scans_less_and_nprobe_buys_recall(data, spec: IndexLayout) -> None:
    stored, _ = data
    index = build(data, spec)
    exact = build(data)
    q = stored.vectors[::30] + 0.05
    _, cats = exact.rank_categories(q)
    truth = exact.search(q, 10, cats[:, :2]).ids
    recalls = []
    for nprobe in (1, 4, 1000):
        hits = index.search(q, 10, cats[:, :2], nprobe, shortlist=50)
        recalls.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hits.ids, truth, strict=True)]))
        if spec.kind == "ivf" and nprobe == 1:
            assert hits.scanned.mean() < exact.search(q, 10, cats[:, :2]).scanned.mean() / 3
    assert recalls[0] <= recalls[1] <= recalls[2] + 1e-9
    floor = {"float32": 0.999, "float16": 0.99, "sq8": 0.9, "pq8": 0.45}[spec.codec] if spec.rerank == "none" else 0.99
    assert recalls[2] >= floor, recalls


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_incremental_changes_equal_a_rebuild(data, spec: IndexLayout) -> None:
    """Trained once, then vectors added and removed one batch at a time: the same index as adding the
    final set at once (same training), list by list."""
    stored, protos = data
    sizes = dict(zip(*np.unique(stored.category_ids, return_counts=True), strict=True))
    first = np.arange(900) < 600

    def trained() -> TwoStageIndex:
        index = TwoStageIndex.train("m", DIM, list(range(10, 16)), spec, sizes, stored)
        index.set_prototypes(protos)
        return index

    incremental = trained()
    incremental.add(stored.ids[first], stored.category_ids[first], stored.vectors[first])
    incremental.add(stored.ids[~first], stored.category_ids[~first], stored.vectors[~first])
    gone = stored.ids[::7]
    assert incremental.remove(gone) == len(gone)
    keep = ~np.isin(stored.ids, gone)
    at_once = trained()
    at_once.add(stored.ids[keep], stored.category_ids[keep], stored.vectors[keep])
    np.testing.assert_array_equal(incremental._read_sizes(), at_once._read_sizes())
    q = stored.vectors[:50]
    _, cats = at_once.rank_categories(q)
    a, b = incremental.search(q, 10, cats[:, :3], 4), at_once.search(q, 10, cats[:, :3], 4)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scanned, b.scanned)
    loaded = round_trip(incremental, protos)
    np.testing.assert_array_equal(loaded.search(q, 10, cats[:, :3], 4).ids, a.ids)


def test_fewer_vectors_than_k_pads_with_minus_one(data) -> None:
    index = build(data)
    hits = index.search(data[0].vectors[:1], 1000, np.array([[0]]))
    n = index.category_sizes()[0]
    assert (hits.ids[0, :n] >= 0).all() and (hits.ids[0, n:] == -1).all()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_add_remove_and_write_read(data, spec: IndexLayout) -> None:
    stored, protos = data
    index = build(data, spec)
    new = np.ones((1, DIM), dtype=np.float32) / np.sqrt(DIM)
    index.add(np.array([5000]), np.array([12]), new)
    assert 5000 in index.search(new, 5).ids[0]
    assert index.remove(np.array([5000, 1000])) == 2 and index.ntotal == 899
    loaded = round_trip(index, protos)
    assert loaded.ntotal == 899 and loaded.memory_bytes() == index.memory_bytes()
    q = stored.vectors[3:6]
    _, cats = index.rank_categories(q)
    np.testing.assert_array_equal(loaded.search(q, 5, cats[:, :2]).ids, index.search(q, 5, cats[:, :2]).ids)
    np.testing.assert_array_equal(loaded.rank_categories(q)[1], cats)
    buf = io.BytesIO()
    index.write(buf.write)
    other_codec = "float16" if spec.codec != "float16" else "sq8"
    other_layout = replace(index.layout, codec=other_codec)
    for wrong in ({"dim": DIM * 2}, {"layout": other_layout}, {"lists_per_category": [2] * 6}):
        buf.seek(0)
        with pytest.raises(ValueError, match="does not match"):
            TwoStageIndex.read(buf.read, index.describe().model_copy(update=wrong))
    with pytest.raises(KeyError):
        index.add(np.array([1]), np.array([99]), new)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_with_categories_keeps_every_entry_and_prototype(data, spec: IndexLayout) -> None:
    stored, _ = data
    index = build(data, spec)
    grown = index.with_categories([3, 99])  # one before every category, one after: list numbers shift
    assert grown.category_ids == [3, 10, 11, 12, 13, 14, 15, 99] and grown.ntotal == index.ntotal
    q = stored.vectors[:30]
    np.testing.assert_array_equal(grown.search(q, 10).ids, index.search(q, 10).ids)
    _, old = index.rank_categories(q)
    _, new = grown.rank_categories(q)
    grown_ids = np.array(grown.category_ids)
    np.testing.assert_array_equal(grown.search(q, 10, new[:, :2], 3).ids, index.search(q, 10, old[:, :2], 3).ids)
    for row in range(len(q)):  # the new, empty categories have zero prototypes: leave them out to compare
        kept = [c for c in grown_ids[new[row]] if c not in (3, 99)]
        assert kept == [index.category_ids[i] for i in old[row]]
    new_vec = np.ones((1, DIM), dtype=np.float32) / np.sqrt(DIM)
    grown.add(np.array([7000]), np.array([99]), new_vec)
    # an untrained category's list is always scanned, whatever nprobe
    assert grown.search(new_vec, 1, np.array([[grown.list_of[99], 1, 2]]), 1).ids[0, 0] == 7000
    assert grown.stale_categories() == ([99] if spec.kind == "ivf" else [])


def test_a_category_grown_past_its_training_is_reported(data) -> None:
    stored, protos = data
    spec = IndexLayout("ivf", "sq8", list_size=10)
    first = stored.category_ids != 10
    first[np.flatnonzero(stored.category_ids == 10)[:3]] = True  # category 10: 3 of its ~150 vectors
    index = build((StoredVectors(stored.ids[first], stored.category_ids[first], stored.vectors[first]), protos), spec)
    assert index.needs_retraining() == []
    index.add(stored.ids[~first], stored.category_ids[~first], stored.vectors[~first])
    assert index.stale_categories() == [10]
    assert len(index.needs_retraining()) == 1
    assert build(data, spec).needs_retraining() == []


def test_reranking_from_floats_restores_the_exact_order(data) -> None:
    """PQ alone reorders neighbours; re-scoring its shortlist from the float copy gives the exact scores."""
    stored, _ = data
    exact = build(data)
    plain = build(data, IndexLayout("ivf", "pq8", 30))
    reranked = build(data, IndexLayout("ivf", "pq8", 30, rerank="float32"))
    q = stored.vectors[::45] + 0.05
    _, cats = exact.rank_categories(q)
    truth = exact.search(q, 10, cats[:, :2])
    got = reranked.search(q, 10, cats[:, :2], 1000, shortlist=100)
    np.testing.assert_array_equal(got.ids, truth.ids)
    np.testing.assert_allclose(got.scores, truth.scores, atol=1e-5)
    assert (plain.search(q, 10, cats[:, :2], 1000).ids != truth.ids).any()
    assert reranked.memory_bytes() > plain.memory_bytes() + 900 * DIM * 4


def test_an_index_refuses_a_layout_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        TwoStageIndex("m", 30, [1], IndexLayout("ivf", "pq8"), [1])
    with pytest.raises(ValueError, match="cannot hold"):
        TwoStageIndex("m", 32, [1], IndexLayout("fastscan", "pq8"), [1])
