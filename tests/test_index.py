"""The two-stage index on synthetic clustered vectors, checked against NumPy."""

import io

import numpy as np
import pytest

from backend.index import TwoStageIndex
from backend.vectors import PrototypeMatrix, StoredVectors

DIM = 32


@pytest.fixture
def data() -> tuple[StoredVectors, PrototypeMatrix]:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(6, DIM))
    cats = rng.integers(0, 6, 900)
    x = centres[cats] + 0.8 * rng.normal(size=(900, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(1000, 1900, dtype=np.int64)
    cat_ids = cats.astype(np.int64) + 10
    means = np.stack([x[cats == c].mean(0) for c in range(6)])
    protos = PrototypeMatrix(
        np.arange(10, 16), (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32), np.bincount(cats)
    )
    return StoredVectors(ids, cat_ids, x), protos


def build(data: tuple[StoredVectors, PrototypeMatrix]) -> TwoStageIndex:
    stored, protos = data
    return TwoStageIndex.build("m", DIM, list(range(10, 16)), stored, protos)


def test_exact_matches_numpy(data) -> None:
    stored, _ = data
    index = build(data)
    q = stored.vectors[:5] + 0.1
    hits = index.search(q, 15)
    for row, query in enumerate(q):
        scores = stored.vectors @ query
        np.testing.assert_allclose(hits.scores[row], np.sort(scores)[::-1][:15], atol=1e-5)
    assert (hits.scanned == 900).all()


def test_two_stage_scans_only_top_lists(data) -> None:
    stored, protos = data
    index = build(data)
    q = stored.vectors[:20]
    _, lists = index.rank_categories(q)
    np.testing.assert_array_equal(lists[:, 0], np.argmax(q @ protos.vectors.T, axis=1))
    hits = index.search(q, 10, lists[:, :2])
    sizes = index.list_sizes()
    for row in range(len(q)):
        allowed = {index.category_ids[i] for i in lists[row, :2]}
        mask = np.isin(stored.category_ids, list(allowed))
        assert hits.scanned[row] == sizes[lists[row, :2]].sum() == mask.sum()
        got = set(hits.ids[row].tolist())
        assert got <= set(stored.ids[mask].tolist())
        want = stored.ids[mask][np.argsort(-(stored.vectors[mask] @ q[row]))[:10]]
        assert got == set(want.tolist())


def test_fewer_vectors_than_k_pads_with_minus_one(data) -> None:
    index = build(data)
    hits = index.search(data[0].vectors[:1], 1000, np.array([[0]]))
    n = index.list_sizes()[0]
    assert (hits.ids[0, :n] >= 0).all() and (hits.ids[0, n:] == -1).all()


def test_add_remove_and_write_read(data) -> None:
    stored, _ = data
    index = build(data)
    new = np.ones((1, DIM), dtype=np.float32) / np.sqrt(DIM)
    index.add(np.array([5000]), np.array([12]), new)
    assert index.search(new, 1).ids[0, 0] == 5000
    assert index.remove(np.array([5000, 1000])) == 2 and index.ntotal == 899
    buf = io.BytesIO()
    index.write(buf.write)
    buf.seek(0)
    loaded = TwoStageIndex.read(buf.read, **index.describe())
    assert loaded.ntotal == 899
    q = stored.vectors[3:6]
    np.testing.assert_array_equal(loaded.search(q, 5).ids, index.search(q, 5).ids)
    np.testing.assert_array_equal(loaded.rank_categories(q)[1], index.rank_categories(q)[1])
    with pytest.raises(ValueError, match="does not match"):
        buf.seek(0)
        TwoStageIndex.read(buf.read, **{**index.describe(), "dim": DIM * 2})
    with pytest.raises(KeyError):
        index.add(np.array([1]), np.array([99]), new)


def test_with_categories_keeps_every_entry_and_centroid(data) -> None:
    stored, _ = data
    index = build(data)
    grown = index.with_categories([3, 99])  # one before every list, one after: list numbers shift
    assert grown.category_ids == [3, 10, 11, 12, 13, 14, 15, 99] and grown.ntotal == index.ntotal
    q = stored.vectors[:30]
    np.testing.assert_array_equal(grown.search(q, 10).ids, index.search(q, 10).ids)
    old_scores, old_lists = index.rank_categories(q)
    new_scores, new_lists = grown.rank_categories(q)
    for row in range(len(q)):  # the new, empty categories have zero centroids: leave them out to compare
        kept = [
            (grown.category_ids[i], s)
            for i, s in zip(new_lists[row], new_scores[row], strict=True)
            if grown.category_ids[i] not in (3, 99)
        ]
        assert [c for c, _ in kept] == [index.category_ids[i] for i in old_lists[row]]
        np.testing.assert_allclose([s for _, s in kept], old_scores[row], atol=1e-6)
    new = np.ones((1, DIM), dtype=np.float32) / np.sqrt(DIM)
    grown.add(np.array([7000]), np.array([99]), new)
    assert grown.search(new, 1, np.array([[grown.list_of[99]]])).ids[0, 0] == 7000
