"""The two-stage FAISS index: an IndexIVFFlat whose inverted lists ARE the categories.

Stage 1 ranks the category prototypes (the IVF's coarse centroids). Stage 2 scans only the
inverted lists of the top-C categories via `search_preassigned`, so its cost is proportional to
the vectors in those categories. Probing every list is an exact search over all vectors.
Scores are inner products of L2-normalised vectors, i.e. cosine similarities.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import faiss
import numpy as np
from faiss import swig_ptr

from backend.vectors import PrototypeMatrix, StoredVectors


@dataclass(frozen=True)
class SearchHits:
    scores: np.ndarray  # (n, k) float32 cosine similarities, -inf where fewer than k were found
    ids: np.ndarray  # (n, k) int64 image ids, -1 where fewer than k were found
    scanned: np.ndarray  # (n,) vectors each query compared against


class TwoStageIndex:
    def __init__(self, model: str, dim: int, category_ids: list[int]) -> None:
        self.model = model
        self.dim = dim
        self.category_ids = list(category_ids)
        self.list_of = {cid: i for i, cid in enumerate(self.category_ids)}
        nlist = max(1, len(self.category_ids))
        self.quantizer = faiss.IndexFlatIP(dim)
        self.ivf = faiss.IndexIVFFlat(self.quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self.ivf.is_trained = True  # centroids are the prototypes we set, not k-means output
        self.prototype_counts = np.zeros(nlist, dtype=np.int64)
        self.quantizer.add(np.zeros((nlist, dim), dtype=np.float32))

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls, model: str, dim: int, category_ids: list[int], stored: StoredVectors, prototypes: PrototypeMatrix
    ) -> "TwoStageIndex":
        index = cls(model, dim, sorted(category_ids))
        index.set_prototypes(prototypes)
        index.add(stored.ids, stored.category_ids, stored.vectors)
        return index

    def set_prototypes(self, prototypes: PrototypeMatrix) -> None:
        """Replace all centroids. Categories without given-label images keep a zero centroid (score 0)."""
        centroids = np.zeros((len(self.category_ids) or 1, self.dim), dtype=np.float32)
        counts = np.zeros(len(centroids), dtype=np.int64)
        for cid, vec, count in zip(prototypes.category_ids, prototypes.vectors, prototypes.counts, strict=True):
            if int(cid) in self.list_of:
                centroids[self.list_of[int(cid)]] = vec
                counts[self.list_of[int(cid)]] = count
        self.quantizer.reset()
        self.quantizer.add(centroids)
        self.prototype_counts = counts

    def add(self, ids: np.ndarray, category_ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        unknown = {int(c) for c in category_ids if int(c) not in self.list_of}
        if unknown:
            raise KeyError(f"categories {sorted(unknown)} are not in this index")
        lists = np.ascontiguousarray([self.list_of[int(c)] for c in category_ids], dtype=np.int64)
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.ivf.add_core(len(x), swig_ptr(x), swig_ptr(ids), swig_ptr(lists))

    def remove(self, ids: np.ndarray) -> int:
        return int(self.ivf.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))

    def has_categories(self, category_ids: list[int]) -> bool:
        return all(int(c) in self.list_of for c in category_ids)

    def with_categories(self, category_ids: list[int]) -> "TwoStageIndex":
        """A copy with lists for these categories too: entries and centroids are copied in memory, list by
        list, so a new category costs a memory copy, not a rebuild from the database."""
        grown = TwoStageIndex(self.model, self.dim, sorted(set(self.category_ids) | {int(c) for c in category_ids}))
        centroids = np.zeros((grown.ivf.nlist, self.dim), dtype=np.float32)
        counts = np.zeros(grown.ivf.nlist, dtype=np.int64)
        old_centroids = self.quantizer.reconstruct_n(0, self.quantizer.ntotal)
        for old_list, cid in enumerate(self.category_ids):
            new_list = grown.list_of[cid]
            centroids[new_list], counts[new_list] = old_centroids[old_list], self.prototype_counts[old_list]
            size = self.ivf.get_list_size(old_list)
            if size:
                source, target = self.ivf.invlists, grown.ivf.invlists
                assert source is not None and target is not None
                target.add_entries(new_list, size, source.get_ids(old_list), source.get_codes(old_list))
        grown.ivf.ntotal = self.ivf.ntotal
        grown.quantizer.reset()
        grown.quantizer.add(centroids)
        grown.prototype_counts = counts
        return grown

    # --- searching --------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.ivf.ntotal)

    def list_sizes(self) -> np.ndarray:
        return np.array([self.ivf.get_list_size(i) for i in range(self.ivf.nlist)], dtype=np.int64)

    def rank_categories(self, queries: np.ndarray, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: (scores, list numbers), best first, for the top `top` categories (all if None)."""
        k = len(self.category_ids) if top is None else min(top, len(self.category_ids))
        scores, lists = self.quantizer.search(np.ascontiguousarray(queries, dtype=np.float32), max(k, 1))
        return scores[:, :k], lists[:, :k]

    def search(self, queries: np.ndarray, k: int, lists: np.ndarray | None = None) -> SearchHits:
        """Stage 2 over the given lists (n, C); `lists=None` scans every list: exact search."""
        x = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(x)
        if lists is None:
            lists = np.tile(np.arange(self.ivf.nlist, dtype=np.int64), (n, 1))
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if lists.shape[1] == 0 or self.ntotal == 0:
            return SearchHits(scores, ids, np.zeros(n, dtype=np.int64))
        params = faiss.SearchParametersIVF()
        params.nprobe = lists.shape[1]  # per call, so concurrent searches with different C are safe
        params.max_codes = 0
        coarse = np.zeros(lists.shape, dtype=np.float32)
        self.ivf.search_preassigned_c(  # type: ignore[attr-defined]
            n, swig_ptr(x), k, swig_ptr(lists), swig_ptr(coarse), swig_ptr(scores), swig_ptr(ids), False, params
        )
        scanned = self.list_sizes()[lists].sum(axis=1)
        return SearchHits(scores, ids, scanned)

    # --- serialisation (the cache file's format and checks live in backend/index_cache.py) ---

    def describe(self) -> dict:
        return {
            "model": self.model,
            "dim": self.dim,
            "category_ids": self.category_ids,
            "prototype_counts": self.prototype_counts.tolist(),
        }

    def write(self, sink: Callable[[bytes], object]) -> None:
        faiss.write_index(self.ivf, faiss.PyCallbackIOWriter(sink))  # type: ignore[attr-defined]

    @classmethod
    def read(
        cls, source: Callable[[int], bytes], model: str, dim: int, category_ids: list[int], prototype_counts: list[int]
    ) -> "TwoStageIndex":
        """The inverse of `write` + `describe`; raises ValueError when the bytes do not fit the description."""
        try:
            ivf = faiss.read_index(faiss.PyCallbackIOReader(source))  # type: ignore[attr-defined]  # owns its quantizer
        except RuntimeError as exc:
            raise ValueError(f"not a FAISS index: {exc}") from exc
        if not isinstance(ivf, faiss.IndexIVFFlat) or ivf.d != dim or ivf.nlist != max(1, len(category_ids)):
            raise ValueError("the FAISS index does not match its description")
        if len(prototype_counts) != ivf.nlist:
            raise ValueError("prototype counts do not match the lists")
        index = cls.__new__(cls)
        index.model, index.dim = model, dim
        index.category_ids = [int(c) for c in category_ids]
        index.list_of = {cid: i for i, cid in enumerate(index.category_ids)}
        index.ivf = ivf
        index.quantizer = cast(faiss.IndexFlatIP, faiss.downcast_index(ivf.quantizer))
        index.prototype_counts = np.asarray(prototype_counts, dtype=np.int64)
        return index
