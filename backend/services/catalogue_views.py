"""Pictures of the catalogue for the page: what each category looks like (the stored images nearest its
prototype, found through the index) and a 2-D map (a PCA projection of the stored embeddings, computed
from an evenly spread sample, kept per catalogue state by `backend.services.catalogue`; queries are placed on
it with the same axes)."""

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine

from backend.search.live_index import LiveIndex
from backend.storage import catalogue, vector_reader
from backend.storage.engine import session_scope

MAP_POINTS = 4000  # points drawn; the axes are fitted on the same sample


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

    def place(self, vectors: np.ndarray) -> np.ndarray:
        return (np.asarray(vectors, dtype=np.float32) - self.mean) @ self.axes.T


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


def catalogue_map(engine: Engine, model: str) -> CatalogueMap:
    """The map of `model`'s vectors as they are now."""
    with session_scope(engine) as session:
        stored = vector_reader.load_vectors(session, model)
    return project(stored.ids, stored.category_ids, stored.vectors)


def project(ids: np.ndarray, category_ids: np.ndarray, vectors: np.ndarray) -> CatalogueMap:
    """PCA to two dimensions of an evenly spread sample of at most MAP_POINTS vectors."""
    order = np.argsort(ids, kind="stable")
    pick = order[np.linspace(0, len(order) - 1, min(MAP_POINTS, len(order))).astype(np.int64)] if len(order) else order
    x = np.asarray(vectors[pick], dtype=np.float64)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    if len(x) < 3:
        axes = np.eye(2, dim, dtype=np.float32)
        return CatalogueMap(np.zeros(dim, np.float32), axes, ids[pick], category_ids[pick], np.zeros((len(x), 2)), [0.0, 0.0])
    mean = x.mean(axis=0)
    axes, explained = _top_two_components(x - mean)
    axes *= np.where(axes.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)  # a fixed orientation for a stable picture
    made = CatalogueMap(mean.astype(np.float32), axes.astype(np.float32), ids[pick], category_ids[pick], np.zeros(0), explained)
    return CatalogueMap(made.mean, made.axes, made.ids, made.category_ids, made.place(vectors[pick]), explained)


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
