"""One model of the search parameters: bounds, defaults from the settings, one clear error."""

import pytest

from backend.core import search_params as sp
from backend.core.errors import Unprocessable
from backend.core.search_params import SearchParams
from tests.utils.settings import make_settings


def test_missing_values_come_from_the_settings(tmp_path) -> None:
    settings = make_settings(tmp_path, default_search_limit=7, default_top_categories=4, use_prototype_filtering=False)
    assert SearchParams.resolve(settings) == SearchParams(limit=7, top_categories=4, use_prototypes=False)
    assert SearchParams.resolve(settings, 2, 1, True) == SearchParams(limit=2, top_categories=1, use_prototypes=True)


@pytest.mark.parametrize(
    "limit, top, word",
    [
        (0, None, "limit"),
        (sp.LIMIT_MAX + 1, None, "limit"),
        (None, 0, "top_categories"),
        (None, sp.TOP_CATEGORIES_MAX + 1, "top_categories"),
    ],
)
def test_out_of_bounds_is_one_clear_error(tmp_path, limit, top, word: str) -> None:
    with pytest.raises(Unprocessable, match=word):
        SearchParams.resolve(make_settings(tmp_path), limit, top)


@pytest.mark.parametrize("nprobe", [0, -3, sp.NPROBE_MAX + 1])
def test_nprobe_out_of_bounds_is_one_clear_error(tmp_path, nprobe: int) -> None:
    with pytest.raises(Unprocessable, match="nprobe"):
        SearchParams.resolve(make_settings(tmp_path), nprobe=nprobe)


def test_page_bounds_are_the_enforced_ones() -> None:
    assert sp.bounds() == {
        "limit": {"min": 1, "max": sp.LIMIT_MAX},
        "top_categories": {"min": 1, "max": sp.TOP_CATEGORIES_MAX},
        "nprobe": {"min": 1, "max": sp.NPROBE_MAX},
        "offset": {"min": 0, "max": sp.OFFSET_MAX},
        "min_score": {"min": -1.0, "max": 1.0},
        "categories": {"min": 1, "max": sp.CATEGORIES_MAX},
        "queries": {"min": 1, "max": sp.QUERIES_MAX},
    }


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"offset": -1}, "offset"),
        ({"offset": sp.OFFSET_MAX + 1}, "offset"),
        ({"min_score": 1.01}, "min_score"),
        ({"min_score": -1.5}, "min_score"),
        ({"min_score": float("nan")}, "min_score"),
        ({"categories": ["cat", "  "]}, "categories"),
        ({"categories": ["c\x00t"]}, "categories"),
        ({"categories": [f"c{i}" for i in range(sp.CATEGORIES_MAX + 1)]}, "categories"),
    ],
)
def test_filters_out_of_bounds_are_one_clear_error(tmp_path, kwargs: dict, word: str) -> None:
    with pytest.raises(Unprocessable, match=word):
        SearchParams.resolve(make_settings(tmp_path), **kwargs)


def test_category_names_are_trimmed_once_each_in_order(tmp_path) -> None:
    params = SearchParams.resolve(make_settings(tmp_path), categories=[" dog", "cat ", "dog"])
    assert params.categories == ("dog", "cat")
    assert SearchParams.resolve(make_settings(tmp_path), categories=[]).categories is None
