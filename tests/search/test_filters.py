"""Category filter, relevance cut-off and paging over the real CIFAR-10 catalogue with the real Lite0
embeddings, against NumPy brute force."""

import numpy as np
import pytest

from backend.core.errors import Unprocessable
from backend.core.search_params import SearchParams
from backend.search.results import SearchResult
from backend.services.search import SearchService


def numpy_ranking(query: np.ndarray, vectors, mask: np.ndarray | None = None) -> tuple[list[int], np.ndarray]:
    """Every stored id (or those under `mask`) best first, with its cosine; ties by id."""
    keep = np.ones(len(vectors.ids), bool) if mask is None else mask
    ids, scores = vectors.ids[keep], vectors.vectors[keep] @ query
    order = np.lexsort((ids, -scores))
    return ids[order].tolist(), scores[order]


def cut_after(scores: np.ndarray, at_least: int) -> tuple[float, int]:
    """A threshold between two clearly distinct scores (not within float noise of one), from position
    `at_least` on, and how many scores are at or above it."""
    n = next(i for i in range(at_least, len(scores)) if scores[i - 1] - scores[i] > 1e-4)
    return float(scores[n - 1] + scores[n]) / 2, n


def assert_same(result: SearchResult, want_ids: list[int], want_scores: np.ndarray, query: np.ndarray, vectors) -> None:
    got_scores = np.array([h.score for h in result.results])
    assert len(result.results) == len(want_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    true_score = dict(zip(vectors.ids.tolist(), (vectors.vectors @ query).tolist(), strict=True))
    for hit, want, score in zip(result.results, want_ids, want_scores, strict=True):
        assert hit.image_id == want or abs(true_score[hit.image_id] - score) < 1e-6  # only float ties may swap


def test_pages_are_consecutive_slices_of_the_exact_ranking(service: SearchService, stored, query_vectors) -> None:
    vectors = stored.vectors
    queries, _ = query_vectors
    for q in queries[:10]:
        want_ids, want_scores = numpy_ranking(q, vectors)
        pages = [
            service.search_vectors(q[None], SearchParams(limit=7, top_categories=3, use_prototypes=False, offset=off))[0]
            for off in (0, 7, 14, 595)
        ]
        for off, result in zip((0, 7, 14, 595), pages, strict=True):
            assert_same(result, want_ids[off : off + 7], want_scores[off : off + 7], q, vectors)
            assert [h.rank for h in result.results] == list(range(off + 1, off + 1 + len(result.results)))
        assert len(pages[-1].results) == 5  # 600 images: the last page is short


def test_min_score_cuts_the_ranking(service: SearchService, stored, query_vectors) -> None:
    vectors = stored.vectors
    queries, _ = query_vectors
    for q in queries[:10]:
        want_ids, want_scores = numpy_ranking(q, vectors)
        cut, n = cut_after(want_scores, 13)  # a threshold inside the first page of 50
        params = SearchParams(limit=50, top_categories=3, use_prototypes=False, min_score=cut)
        (result,) = service.search_vectors(q[None], params)
        assert_same(result, want_ids[:n], want_scores[:n], q, vectors)
        assert 13 <= len(result.results) < 50 and all(h.score >= cut for h in result.results)
    nothing = SearchParams(limit=10, top_categories=3, use_prototypes=False, min_score=1.0)
    assert service.search_vectors(queries[:1], nothing)[0].results == []


@pytest.mark.parametrize("names", [["cat"], ["ship", "truck", "airplane"]])
def test_exact_search_within_named_categories(service: SearchService, stored, query_vectors, names: list[str]) -> None:
    vectors, ids = stored.vectors, stored.category_ids
    queries, _ = query_vectors
    mask = np.isin(vectors.category_ids, [ids[n] for n in names])
    params = SearchParams(limit=10, top_categories=3, use_prototypes=False, categories=tuple(names))
    for q, result in zip(queries[:15], service.search_vectors(queries[:15], params), strict=True):
        want_ids, want_scores = numpy_ranking(q, vectors, mask)
        assert_same(result, want_ids[:10], want_scores[:10], q, vectors)
        assert sorted(result.searched_categories) == sorted(names)
        assert result.vectors_scanned == int(mask.sum())


def test_two_stage_takes_the_best_ranked_of_the_named(service: SearchService, stored, query_vectors) -> None:
    vectors, ids = stored.vectors, stored.category_ids
    queries, _ = query_vectors
    names = ("cat", "dog", "deer", "horse", "frog")
    params = SearchParams(limit=10, top_categories=2, use_prototypes=True, categories=names)
    for q, result in zip(queries, service.search_vectors(queries, params), strict=True):
        ranked_named = [c.category for c in result.categories if c.category in names]
        assert result.searched_categories == ranked_named[:2]  # stage 1's order, among the named only
        assert len(result.categories) == len(ids)  # the ranking still shows every category
        mask = np.isin(vectors.category_ids, [ids[n] for n in ranked_named[:2]])
        want_ids, want_scores = numpy_ranking(q, vectors, mask)
        assert_same(result, want_ids[:10], want_scores[:10], q, vectors)


def test_filters_compose_with_paging_and_cut_off(service: SearchService, stored, query_vectors) -> None:
    vectors, ids = stored.vectors, stored.category_ids
    queries, _ = query_vectors
    q = queries[3]
    mask = vectors.category_ids == ids["bird"]
    want_ids, want_scores = numpy_ranking(q, vectors, mask)
    cut, n = cut_after(want_scores, 16)
    assert n < 20  # the cut falls inside the second page
    params = SearchParams(limit=10, top_categories=3, use_prototypes=False, categories=("bird",), offset=10, min_score=cut)
    (result,) = service.search_vectors(q[None], params)
    assert_same(result, want_ids[10:n], want_scores[10:n], q, vectors)


def test_unknown_category_is_one_clear_error(service: SearchService, query_vectors) -> None:
    queries, _ = query_vectors
    params = SearchParams(limit=5, top_categories=1, use_prototypes=True, categories=("cat", "unicorn"))
    with pytest.raises(Unprocessable, match="unknown category 'unicorn'"):
        service.search_vectors(queries[:1], params)


def test_similar_to_a_stored_image_pages_without_it(service: SearchService, stored) -> None:
    vectors = stored.vectors
    image_id = int(vectors.ids[42])
    q = vectors.vectors[42]
    want_ids, want_scores = numpy_ranking(q, vectors)
    assert want_ids[0] == image_id  # itself first, then the rest
    params = SearchParams(limit=5, top_categories=3, use_prototypes=False, offset=5)
    assert_same(service.similar_to(image_id, params), want_ids[6:11], want_scores[6:11], q, vectors)
