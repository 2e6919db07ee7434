"""An image stored in the catalogue finds itself first, whatever stage 1 says.

Stage 2 searches only the top-C categories, so a stored image whose category stage 1 ranks lower would
be missed by its own copy. Beside stage 2:
- the query's bytes: a stored image with the same SHA-256 comes first (its stored vector gives the score),
  and nothing below is done for that query;
- near copies (resized, re-encoded): the categories of the query's globally nearest sub-centroids (stage 1's
  `centroids`) and the next category by stage 1 are probed for a few hits. Those
  and the best hits inside are candidates; one whose 16x16 grey thumbnail matches the query's (mean absolute
  difference under NEAR_COPY_MAX_DIFF: on 1,000 images copies measured <= 0.011, but 0.018 for some 24-pixel
  Fashion-MNIST downscales, distinct images >= 0.02) is the stored original and comes first.
Nothing else changes: the other results still come from the searched categories only.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from backend.index.category_index import CategoryIndex, SearchHits
from backend.search.stage1 import Stage1
from backend.storage import catalogue

PROBE_SUB_CENTROIDS = 8  # nearest sub-centroids whose categories are probed beside the top-C ...
PROBE_BY_RANK = 1  # ... with the next category by stage 1
CANDIDATES = 5  # hits inside and outside the searched categories checked as near copies
# Sub-lists the probe scans (at most; fewer when the request's nprobe is lower): a near copy lies in the lists
# nearest the query. At 1M vectors its search took 0.50 ms with 32 lists, 0.23 ms with 8 (one query, warm;
# choosing the categories takes 0.22 ms more). 120 CIFAR-10 images stored there, searched by re-encoded and
# 40-pixel JPEG copies with top_categories=1, came first 120/120 with 32 and with 8 lists, 119 and 116 with 4.
PROBE_LISTS = 8
NEAR_COPY_MIN_COSINE = 0.6  # below this a hit is not checked (re-encoded 32-pixel images measured >= 0.6)
NEAR_COPY_MAX_DIFF = 0.015  # mean absolute difference of 16x16 grey thumbnails (pixels in 0..1)
THUMBNAIL = (16, 16)


@dataclass(frozen=True)
class QueryImage:
    sha256: str | None
    thumbnail: np.ndarray  # (16, 16) float32 grey, 0..1


def thumbnail(image: PILImage.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize(THUMBNAIL, PILImage.Resampling.BILINEAR), dtype=np.float32) / 255


def query_images(images: list[PILImage.Image], sha256s: list[str] | None) -> list[QueryImage]:
    return [QueryImage(sha256s[i] if sha256s else None, thumbnail(image)) for i, image in enumerate(images)]


def same_bytes(session: Session, model: str, queries: np.ndarray, images: list[QueryImage]) -> list[tuple[int, float] | None]:
    """Per query, the stored image with the query's very bytes and its cosine score (its stored vector . the
    query), in one statement; None where there is none (or it has no `model` vector)."""
    stored = catalogue.stored_copies(session, (im.sha256 for im in images if im.sha256), model)
    out: list[tuple[int, float] | None] = []
    for query, image in zip(queries, images, strict=True):
        copy = stored.get(image.sha256 or "")
        out.append(None if copy is None or copy[1] is None else (copy[0], float(copy[1] @ query)))
    return out


def probe_outside(
    stage1: Stage1,
    index: CategoryIndex,
    queries: np.ndarray,
    positions: np.ndarray,
    top: int,
    nprobe: int | None,
    need: list[bool],
) -> list[list[tuple[int, float]]]:
    """For the queries that `need` it (no stored copy of their bytes), the CANDIDATES nearest (id, score) in
    the categories `probe_categories` picks outside their top `top`; [] for the others."""
    rows = [q for q, wanted in enumerate(need) if wanted]
    out: list[list[tuple[int, float]]] = [[] for _ in queries]
    if not rows:
        return out
    probe = probe_categories(stage1, index, queries[rows], positions[rows], top)
    for q, found in zip(rows, nearest_outside(index, queries[rows], probe, nprobe), strict=True):
        out[q] = found
    return out


def probe_categories(stage1: Stage1, index: CategoryIndex, queries: np.ndarray, positions: np.ndarray, top: int) -> np.ndarray:
    """(n, P) index categories to probe for each query beyond its top `top` ones by stage 1 (`positions`, best
    first; -1: none)."""
    nearest = positions[:, top : top + PROBE_BY_RANK]
    by_centroid = stage1.nearest_categories(index, queries, PROBE_SUB_CENTROIDS)
    if by_centroid is not None:
        nearest = np.concatenate([nearest, by_centroid], axis=1)
    searched = positions[:, :top]
    outside = (nearest[:, :, None] != searched[:, None, :]).all(axis=2)
    return np.where(outside, nearest, -1)


def nearest_outside(
    index: CategoryIndex, queries: np.ndarray, probe: np.ndarray, nprobe: int | None
) -> list[list[tuple[int, float]]]:
    """Each query's CANDIDATES nearest (id, score) in its probed categories."""
    if probe.size == 0 or (probe < 0).all():
        return [[] for _ in queries]
    hits = index.search(queries, CANDIDATES, probe, PROBE_LISTS if nprobe is None else min(nprobe, PROBE_LISTS))
    return [
        [(int(i), float(s)) for s, i in zip(hs, hi, strict=True) if i >= 0] for hs, hi in zip(hits.scores, hits.ids, strict=True)
    ]


def results(
    session: Session,
    queries: np.ndarray,
    hits: SearchHits,
    exclude: int | None,
    outside: list[list[tuple[int, float]]],
    images: list[QueryImage] | None,
    same: list[tuple[int, float] | None],
    limit: int,
) -> list[list[tuple[int, float]]]:
    """Each query's (id, score) results: stage 2's hits (without `exclude`), its own image first if it has one
    (`same`: the stored copy of its bytes, from `same_bytes`)."""
    found = [
        [(int(i), float(s)) for s, i in zip(scores, ids, strict=True) if i >= 0 and i != exclude]
        for scores, ids in zip(hits.scores, hits.ids, strict=True)
    ]
    own = list(same)
    if images is not None:
        candidates = [f[:CANDIDATES] + o for f, o in zip(found, outside, strict=True)]
        own = find_own(session, images, candidates, same)
    return [own_first(f, o, limit) for f, o in zip(found, own, strict=True)]


def own_first(hits: list[tuple[int, float]], own: tuple[int, float] | None, limit: int) -> list[tuple[int, float]]:
    """`hits` (id, score), best first, with `own` put first (and not repeated), at most `limit` long."""
    if own is None:
        return hits[:limit]
    return [own, *[h for h in hits if h[0] != own[0]]][:limit]


def find_own(
    session: Session, images: list[QueryImage], candidates: list[list[tuple[int, float]]], same: list[tuple[int, float] | None]
) -> list[tuple[int, float] | None]:
    """For each query, the stored image it is a copy of, with its cosine score: the same bytes (`same`), else
    the best-scoring candidate whose thumbnail matches (None when there is neither). Only the candidates of
    queries without a stored copy of their bytes are read and compared."""
    unmatched = [cands for cands, copy in zip(candidates, same, strict=True) if copy is None]
    check = {i for cands in unmatched for i, score in cands if score >= NEAR_COPY_MIN_COSINE}
    stored_thumbnails = {i: _stored_thumbnail(raw) for i, raw in catalogue.image_data(session, check).items()}
    out: list[tuple[int, float] | None] = []
    for image, cands, copy in zip(images, candidates, same, strict=True):
        if copy is not None:
            out.append(copy)
            continue
        matches = [
            (i, score)
            for i, score in cands
            if (t := stored_thumbnails.get(i)) is not None and float(np.abs(t - image.thumbnail).mean()) <= NEAR_COPY_MAX_DIFF
        ]
        out.append(max(matches, key=lambda m: m[1]) if matches else None)
    return out


def _stored_thumbnail(data: bytes) -> np.ndarray | None:
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image.draft("L", (THUMBNAIL[0] * 4, THUMBNAIL[1] * 4))  # JPEGs decode at a fraction of their size
            return thumbnail(image)
    except (OSError, ValueError, PILImage.DecompressionBombError):
        return None
