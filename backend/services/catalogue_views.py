"""Pictures of the catalogue for the page: what each category looks like (the stored images nearest its
prototype, found through the index) and a 2-D map: a PCA projection of a uniform sample of the stored
embeddings that the database keeps (`vector_reader.map_sample`, at most MAP_POINTS vectors read whatever the
catalogue's size), refreshed in the background by `backend.services.catalogue`; queries are placed on it
with the same axes, which are refitted only every MAP_REFIT_CHANGES changes."""

from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import Engine

from backend.search.live_index import LiveIndex
from backend.storage import catalogue, change_log, vector_reader
from backend.storage.engine import session_scope


@dataclass(frozen=True)
class GalleryRow:
    category_id: int
    image_ids: list[int]  # nearest the prototype first
    scores: list[float]  # their cosine to the prototype


@dataclass(frozen=True)
class CatalogueMap:
    mean: np.ndarray  # (dim,)
    axes: np.ndarray  # (2, dim): the first two principal components
    ids: np.ndarray  # (n,) image ids drawn
    category_ids: np.ndarray  # (n,)
    xy: np.ndarray  # (n, 2)
    explained: list[float]  # share of the variance along each axis
    as_of_seq: int = 0  # the newest change the sample reflects
    fitted_seq: int = 0  # the change number the axes were fitted at

    def place(self, vectors: np.ndarray) -> np.ndarray:
        return (np.asarray(vectors, dtype=np.float32) - self.mean) @ self.axes.T

    def fits(self, dim: int, seq: int, refit_changes: int) -> bool:
        """These axes may still serve a sample of `dim`-dimensional vectors at change `seq`."""
        return self.mean.shape == (dim,) and len(self.ids) >= 3 and 0 <= seq - self.fitted_seq < refit_changes


def gallery(engine: Engine, cache: LiveIndex, model: str, per_category: int) -> list[GalleryRow]:
    """Per category with a prototype, the stored images nearest to it (searched in that category only)."""
    with session_scope(engine) as session:
        prototypes = catalogue.load_prototypes(session, model)
    with cache.reading() as index:
        known = [j for j, cid in enumerate(prototypes.category_ids) if int(cid) in index.list_of]
        if not known:
            return []
        own_category = np.array([[index.list_of[int(prototypes.category_ids[j])]] for j in known], dtype=np.int64)
        hits = index.search(prototypes.vectors[known], per_category, own_category, None)
    return [
        GalleryRow(
            int(prototypes.category_ids[j]),
            [int(i) for i in ids if i >= 0],
            [float(s) for s, i in zip(scores, ids, strict=True) if i >= 0],
        )
        for j, scores, ids in zip(known, hits.scores, hits.ids, strict=True)
    ]


def catalogue_map(engine: Engine, model: str, points: int, previous: CatalogueMap | None, refit_changes: int) -> CatalogueMap:
    """The map of `model`'s sample as it is now (at most `points` vectors read): on `previous`'s axes while
    they were fitted fewer than `refit_changes` changes ago, else on axes fitted to this sample."""
    with session_scope(engine, snapshot=True) as session:
        seq = change_log.latest_seq(session, model)
        sample = vector_reader.map_sample(session, model, points)
    dim = sample.vectors.shape[1]
    if previous is not None and previous.fits(dim, seq, refit_changes):
        xy = previous.place(sample.vectors) if len(sample.ids) else np.zeros((0, 2))
        return replace(previous, ids=sample.ids, category_ids=sample.category_ids, xy=xy, as_of_seq=seq)
    return project(sample.ids, sample.category_ids, sample.vectors, seq)


def project(ids: np.ndarray, category_ids: np.ndarray, vectors: np.ndarray, seq: int = 0) -> CatalogueMap:
    """PCA to two dimensions of `vectors` (the map's sample), fitted at change `seq`."""
    x = np.asarray(vectors, dtype=np.float64)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    if len(x) < 3:
        axes = np.eye(2, dim, dtype=np.float32)
        return CatalogueMap(np.zeros(dim, np.float32), axes, ids, category_ids, np.zeros((len(x), 2)), [0.0, 0.0], seq, seq)
    mean = x.mean(axis=0)
    axes, explained = _top_two_components(x - mean)
    axes *= np.where(axes.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)  # a fixed orientation for a stable picture
    made = CatalogueMap(mean.astype(np.float32), axes.astype(np.float32), ids, category_ids, np.zeros(0), explained, seq, seq)
    return replace(made, xy=made.place(vectors))


def _top_two_components(centred: np.ndarray, oversample: int = 10, iterations: int = 6) -> tuple[np.ndarray, list[float]]:
    """The two directions of largest spread and their share of the variance, by randomized subspace
    iteration: a few (n x d) products instead of a (d x d) eigendecomposition, which took seconds and
    tens of seconds when several requests ran it at once."""
    rng = np.random.default_rng(0)
    basis = centred @ rng.standard_normal((centred.shape[1], 2 + oversample))
    for _ in range(iterations):
        basis, _ = np.linalg.qr(centred @ (centred.T @ basis))
    _, singular, vt = np.linalg.svd(basis.T @ centred, full_matrices=False)
    total = max(float((centred**2).sum()), 1e-12)
    return vt[:2], [float(v) ** 2 / total for v in singular[:2]]
