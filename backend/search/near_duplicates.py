"""Near-duplicates: stored images whose embedding's cosine to another is at least NEAR_DUPLICATE_THRESHOLD
(the threshold and its precision and recall come from `backend.evaluation.duplicates`). Exact duplicates (same
bytes) are caught earlier, by sha256, and never stored twice.

An upload is compared through the two-stage index (its top categories); the catalogue's groups are found
through the index too, within each category (each image against the vectors of its own category), joined
into groups when they share an image (kept until the catalogue changes by `backend.services.catalogue`).
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from sqlalchemy import Engine

from backend.core.config import Settings
from backend.core.search_params import SearchParams
from backend.core.vectors import StoredVectors
from backend.search.live_index import LiveIndex
from backend.search.results import Hit, SearchResult
from backend.storage import vector_reader
from backend.storage.engine import session_scope

NEIGHBOURS = 16  # near-duplicates looked at per image (an upload answers with at most this many)
QUERY_BATCH = 256


@dataclass(frozen=True)
class Group:
    category_id: int | None
    image_ids: list[int]  # ascending
    min_score: float  # the weakest link that joined the group
    max_score: float


class VectorSearch(Protocol):
    """What an upload's near-duplicates are searched with (the SearchService; a protocol, not an import,
    so that this module does not depend on the service that calls it)."""

    settings: Settings

    def search_vectors(self, queries: np.ndarray, params: SearchParams) -> list[SearchResult]: ...


def of_vector(service: VectorSearch, vector: np.ndarray) -> list[Hit]:
    """Stored images at or above the threshold, best first (searched in the top categories)."""
    params = SearchParams(
        limit=NEIGHBOURS,
        top_categories=service.settings.default_top_categories,
        use_prototypes=True,
        min_score=service.settings.near_duplicate_threshold,
    )
    return service.search_vectors(vector.reshape(1, -1), params)[0].results


def find_groups(engine: Engine, cache: LiveIndex, model: str, threshold: float) -> list[Group]:
    """Every group of near-duplicates among `model`'s vectors, largest first."""
    with session_scope(engine) as session:
        stored = vector_reader.load_vectors(session, model)
    links = _links(cache, stored, threshold)
    parent: dict[int, int] = {}
    for a, b, _ in links:
        _union(parent, a, b)
    members: dict[int, list[int]] = {}
    link_scores: dict[int, list[float]] = {}
    for image_id in parent:
        members.setdefault(_root(parent, image_id), []).append(image_id)
    for a, _, score in links:
        link_scores.setdefault(_root(parent, a), []).append(score)
    category = dict(zip(stored.ids.tolist(), stored.category_ids.tolist(), strict=True))
    out = [
        Group(category.get(root), sorted(ids), min(link_scores[root]), max(link_scores[root])) for root, ids in members.items()
    ]
    return sorted(out, key=lambda g: (-len(g.image_ids), -g.max_score, g.image_ids[0]))


def _links(cache: LiveIndex, stored: StoredVectors, threshold: float) -> list[tuple[int, int, float]]:
    """(image, other image, cosine) at or above the threshold, each image searched within its category."""
    links = []
    with cache.reading() as index:
        for cid in np.unique(stored.category_ids):
            if int(cid) not in index.list_of:
                continue
            rows = np.flatnonzero(stored.category_ids == cid)
            own_category = np.full((QUERY_BATCH, 1), index.list_of[int(cid)], dtype=np.int64)
            for start in range(0, len(rows), QUERY_BATCH):
                part = rows[start : start + QUERY_BATCH]
                hits = index.search(stored.vectors[part], NEIGHBOURS + 1, own_category[: len(part)], None)
                for row, scores, ids in zip(part, hits.scores, hits.ids, strict=True):
                    me = int(stored.ids[row])
                    keep = (ids >= 0) & (ids != me) & (scores >= threshold)
                    links += [(me, int(i), float(s)) for s, i in zip(scores[keep], ids[keep], strict=True)]
    return links


def _root(parent: dict[int, int], x: int) -> int:
    while parent.get(x, x) != x:
        parent[x] = parent.get(parent[x], parent[x])  # path halving
        x = parent[x]
    return x


def _union(parent: dict[int, int], a: int, b: int) -> None:
    parent.setdefault(a, a)
    parent.setdefault(b, b)
    ra, rb = _root(parent, a), _root(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)
