"""What a search keeps on top of the two-stage ranking: a category filter, a relevance cut-off and paging.

The category filter composes with stage 1: the named categories are ranked by their prototypes like all
the others, and stage 2 searches the best `top_categories` of them (all of them with prototype filtering
off). Paging asks the index for `offset + limit` results and keeps the last `limit`; the cut-off stops at
the first result scoring below `min_score` (results come best first).
"""

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from sqlalchemy import Engine

from backend.core.errors import Unprocessable
from backend.core.search_params import SearchParams
from backend.core.text import echo
from backend.storage import catalogue
from backend.storage.engine import session_scope


def category_filter(engine: Engine, names: Sequence[str] | None) -> list[int] | None:
    """The ids of the named categories (None: no filter, and no database call); one clear error naming
    those that do not exist."""
    if not names:
        return None
    with session_scope(engine) as session:
        known = catalogue.category_ids(session, names)
    unknown = [n for n in names if n not in known]
    if unknown:
        shown = ", ".join(repr(echo(n, 40)) for n in unknown[:5])
        raise Unprocessable(f"categories: unknown category {shown}")
    return [known[n] for n in names]


def stage_two_categories(
    ranked: np.ndarray, list_of: dict[int, int], wanted: list[int] | None, params: SearchParams
) -> np.ndarray | None:
    """Per query (rows of `ranked`, the index's category numbers best first), the category numbers stage 2
    searches, padded with -1; None: every category (exact search over the whole catalogue)."""
    if wanted is None:
        return ranked[:, : params.top_categories] if params.use_prototypes else None
    # Categories without vectors in the index have no list: nothing to search there.
    allowed = np.asarray([list_of[c] for c in wanted if c in list_of], dtype=np.int64)
    width = min(params.top_categories, len(allowed)) if params.use_prototypes else len(allowed)
    out = np.full((len(ranked), width), -1, dtype=np.int64)
    for row, order in zip(out, ranked, strict=True):
        kept = order[np.isin(order, allowed)][:width]
        row[: len(kept)] = kept
    return out


def depth(params: SearchParams, excluded: int) -> int:
    """How many results to ask the index for: the page, what precedes it, and the excluded ones."""
    return params.offset + params.limit + excluded


def page(
    scores: np.ndarray, ids: np.ndarray, usable: Callable[[int], bool], params: SearchParams
) -> Iterator[tuple[int, int, float]]:
    """(rank, image id, score) of one query's page: usable ids only, ranks counted from 1 over all pages."""
    rank = 0
    for score, raw_id in zip(scores, ids, strict=True):
        image_id = int(raw_id)
        if image_id < 0 or not usable(image_id):
            continue
        if params.min_score is not None and score < params.min_score:
            return
        rank += 1
        if rank > params.offset + params.limit:
            return
        if rank > params.offset:
            yield rank, image_id, float(score)
