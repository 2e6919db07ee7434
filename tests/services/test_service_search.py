"""Search over the real CIFAR-10 catalogue with the real Lite0 embeddings, against brute-force NumPy."""

import numpy as np
import pytest
from sqlalchemy import Engine

from backend.core.search_params import SearchParams
from backend.services.search import SearchService

# Chance is 0.10 (10 balanced categories). Lite0 ImageNet features reach ~0.70 on a 5,000-image
# catalogue; with 60 images per category we measured 0.63 here, so 0.50 leaves room for noise
# while failing on anything broken (random weights measure ~0.2, wrong scaling ~0.3).
MIN_PRECISION_AT_10 = 0.50


def brute_force(query: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors @ query
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def test_precision_at_10_well_above_chance(service: SearchService, query_vectors) -> None:
    queries, labels = query_vectors
    results = service.search_vectors(queries, SearchParams(limit=10, top_categories=3, use_prototypes=False))
    precision = np.mean([np.mean([h.category == lbl for h in r.results]) for r, lbl in zip(results, labels, strict=True)])
    print(f"\nprecision@10 (exact, {len(labels)} test queries, 600-image catalogue): {precision:.3f}")
    assert precision >= MIN_PRECISION_AT_10


def test_exact_search_equals_numpy_top_k(service: SearchService, stored, query_vectors) -> None:
    vectors = stored.vectors
    queries, _ = query_vectors
    results = service.search_vectors(queries[:25], SearchParams(limit=20, top_categories=3, use_prototypes=False))
    for q, result in zip(queries[:25], results, strict=True):
        want_ids, want_scores = brute_force(q, vectors.vectors, vectors.ids, 20)
        got_ids = [h.image_id for h in result.results]
        got_scores = np.array([h.score for h in result.results])
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-5)
        # Ids agree position by position; only where two scores tie to float precision may they swap,
        # and then each id must still carry (to that precision) the score NumPy gives it.
        true_score = dict(zip(vectors.ids.tolist(), (vectors.vectors @ q).tolist(), strict=True))
        for rank, (got, want) in enumerate(zip(got_ids, want_ids.tolist(), strict=True)):
            assert got == want or abs(true_score[got] - want_scores[rank]) < 1e-6, f"rank {rank}: {got} instead of {want}"
        assert len(set(got_ids)) == len(got_ids)
        assert result.vectors_scanned == result.vectors_total == len(vectors.ids)


@pytest.mark.parametrize("top", [1, 2, 3, 5])
def test_two_stage_is_restricted_to_top_categories(service: SearchService, stored, query_vectors, top: int) -> None:
    vectors, names = stored.vectors, stored.names
    queries, _ = query_vectors
    results = service.search_vectors(queries, SearchParams(limit=10, top_categories=top, use_prototypes=True))
    sizes = {names[c]: int(n) for c, n in zip(*np.unique(vectors.category_ids, return_counts=True), strict=True)}
    for q, result in zip(queries, results, strict=True):
        searched = result.searched_categories
        assert len(searched) == top
        assert [c.category for c in result.categories[:top]] == searched  # the best-ranked ones
        assert {h.category for h in result.results} <= set(searched)
        assert len(result.results) == 10
        # It scanned exactly the vectors of those categories, not the whole catalogue.
        assert result.vectors_scanned == sum(sizes[c] for c in searched) < result.vectors_total
        # And within them it is exact.
        mask = np.isin(vectors.category_ids, [cid for cid, n in names.items() if n in searched])
        _, want_scores = brute_force(q, vectors.vectors[mask], vectors.ids[mask], 10)
        np.testing.assert_allclose([h.score for h in result.results], want_scores, atol=1e-5)


def test_two_stage_recall_against_exact(service: SearchService, query_vectors) -> None:
    queries, _ = query_vectors
    exact = service.search_vectors(queries, SearchParams(limit=10, top_categories=3, use_prototypes=False))
    recalls = {}
    for top in (1, 2, 3, 5, 10):
        two = service.search_vectors(queries, SearchParams(limit=10, top_categories=top, use_prototypes=True))
        recalls[top] = np.mean(
            [len({h.image_id for h in a.results} & {h.image_id for h in b.results}) / 10 for a, b in zip(exact, two, strict=True)]
        )
    print("\nrecall@10 of two-stage vs exact: " + ", ".join(f"C={c}: {r:.3f}" for c, r in recalls.items()))
    assert recalls[10] == 1.0  # all categories probed is the exact search
    assert recalls[1] <= recalls[3] <= recalls[5] <= recalls[10]
    assert recalls[3] >= 0.6


def test_prototype_ranking_puts_true_category_first_often(service: SearchService, query_vectors) -> None:
    queries, labels = query_vectors
    results = service.search_vectors(queries, SearchParams(limit=1, top_categories=1, use_prototypes=True))
    top1 = np.mean([r.categories[0].category == lbl for r, lbl in zip(results, labels, strict=True)])
    print(f"\nnearest-prototype top-1 category accuracy: {top1:.3f}")
    assert top1 >= 0.5


def test_saved_index_is_reloaded_when_current(service: SearchService, catalogue_engine: Engine, embedder) -> None:
    service.cache.save()
    again = SearchService(service.settings, catalogue_engine, embedder)
    index = again.cache.get()
    assert again.cache.origin.startswith("loaded from cache")
    assert index.ntotal == service.cache.get().ntotal
