"""An image stored in the catalogue finds itself first, whatever stage 1 says.

Stage 2 searches only the top-C categories, so a stored image whose category stage 1 ranks lower would
be missed by its own copy. Two look-ups beside stage 2 close that gap:
- the query's bytes: a stored image with the same SHA-256 comes first (its stored vector gives the score);
- near copies (resized, re-encoded): the categories of the query's globally nearest sub-centroids (stage 1's
  `centroids`, or the next categories by prototype while none are trained) are probed too, for one hit.
  When that hit is nearer than everything found in the searched categories it comes first: the query's
  nearest stored image, which for a near copy is the image it was copied from.
Nothing else changes: the other results still come from the searched categories only.
"""

import numpy as np
from sqlalchemy import Engine

from backend import catalogue
from backend.db.session import session_scope
from backend.index import TwoStageIndex
from backend.stage1 import Ranking, Stage1

PROBE_SUB_CENTROIDS = 2  # nearest sub-centroids whose categories are probed beside the top-C
PROBE_BY_PROTOTYPE = 1  # categories after the top-C probed while no sub-centroids are trained


def probe_categories(stage1: Stage1, index: TwoStageIndex, queries: np.ndarray, ranking: Ranking, top: int) -> np.ndarray:
    """(n, P) index categories to probe for each query beyond its top `top` ones (-1: none)."""
    nearest = stage1.nearest_categories(index, queries, PROBE_SUB_CENTROIDS)
    if nearest is None:
        nearest = ranking.positions[:, top : top + PROBE_BY_PROTOTYPE]
    searched = ranking.positions[:, :top]
    outside = (nearest[:, :, None] != searched[:, None, :]).all(axis=2)
    return np.where(outside, nearest, -1)


def nearest_outside(
    index: TwoStageIndex, queries: np.ndarray, probe: np.ndarray, nprobe: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of each query's nearest vector in its probed categories (-inf, -1 where none)."""
    if probe.size == 0 or (probe < 0).all():
        return np.full(len(queries), -np.inf, np.float32), np.full(len(queries), -1, np.int64)
    hits = index.search(queries, 1, probe, nprobe)
    return hits.scores[:, 0], hits.ids[:, 0]


def own_first(hits: list[tuple[int, float]], own: tuple[int, float] | None, limit: int) -> list[tuple[int, float]]:
    """`hits` (id, score), best first, with `own` put first (and not repeated), at most `limit` long."""
    if own is None:
        return hits[:limit]
    return [own, *[h for h in hits if h[0] != own[0]]][:limit]


def own_candidate(stored: tuple[int, float] | None, outside: tuple[int, float], best_inside: float) -> tuple[int, float] | None:
    """The image to put first: the stored bytes' image, else the probed hit when it beats every hit inside."""
    if stored is not None:
        return stored
    image_id, score = outside
    return (image_id, score) if image_id >= 0 and score > best_inside else None


def stored_copies(engine: Engine, model: str, queries: np.ndarray, sha256s: list[str] | None) -> list[tuple[int, float] | None]:
    """For each query, the stored image with the same bytes and its cosine score (None if there is none)."""
    if not sha256s:
        return [None] * len(queries)
    with session_scope(engine) as session:
        ids = catalogue.existing_by_sha(session, sha256s)
        vectors = {i: catalogue.image_vector(session, i, model) for i in ids.values()}
    out: list[tuple[int, float] | None] = []
    for query, sha in zip(queries, sha256s, strict=True):
        vector = vectors.get(ids.get(sha, -1))
        out.append(None if vector is None else (ids[sha], float(vector @ query)))
    return out
