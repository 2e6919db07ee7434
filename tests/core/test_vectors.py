"""Vector helpers and prototype computation, against plain NumPy."""

import numpy as np

from backend.core.vectors import PrototypeMatrix, category_sums, l2_normalise


def test_category_sums_group_exactly_in_float64() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    cats = rng.integers(5, 9, 50)
    got_cats, sums, counts = category_sums(cats, x)
    assert got_cats.tolist() == sorted(set(cats.tolist())) and sums.dtype == np.float64
    for c, s, n in zip(got_cats, sums, counts, strict=True):
        np.testing.assert_allclose(s, x[cats == c].astype(np.float64).sum(0))
        assert n == (cats == c).sum()


def test_prototypes_are_normalised_means_and_skip_empty_categories() -> None:
    x = l2_normalise(np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32))
    protos = PrototypeMatrix.of(np.array([7, 7, 9]), x)
    assert protos.category_ids.tolist() == [7, 9] and protos.counts.tolist() == [2, 1]
    np.testing.assert_allclose(protos.vectors[0], [2**-0.5, 2**-0.5], atol=1e-6)
    empty = PrototypeMatrix.from_sums(np.array([1]), np.zeros((1, 2)), np.array([0]))
    assert len(empty.category_ids) == 0
