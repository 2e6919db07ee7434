"""The two-stage FAISS index: an IndexIVFFlat whose inverted lists ARE the categories.

Stage 1 ranks the category prototypes (the IVF's coarse centroids). Stage 2 scans only the
inverted lists of the top-C categories via `search_preassigned`, so its cost is proportional to
the vectors in those categories. Probing every list is an exact search over all vectors.
Scores are inner products of L2-normalised vectors, i.e. cosine similarities.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from faiss import swig_ptr

from backend.catalogue import PrototypeMatrix, StoredVectors


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
        self.state: dict[str, int] = {}

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
        self.ivf.search_preassigned_c(
            n, swig_ptr(x), k, swig_ptr(lists), swig_ptr(coarse), swig_ptr(scores), swig_ptr(ids), False, params
        )
        scanned = self.list_sizes()[lists].sum(axis=1)
        return SearchHits(scores, ids, scanned)

    # --- persistence: the file is a cache, stamped with the database state it reflects ------

    @staticmethod
    def paths(directory: Path, model: str) -> tuple[Path, Path]:
        slug = model.replace("/", "_")
        return directory / f"{slug}.faiss", directory / f"{slug}.json"

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        index_path, meta_path = self.paths(directory, self.model)
        meta = {
            "model": self.model,
            "dim": self.dim,
            "category_ids": self.category_ids,
            "prototype_counts": self.prototype_counts.tolist(),
            "state": self.state,
        }
        # Write-then-rename so a crash never leaves a half-written cache behind.
        tmp_index, tmp_meta = index_path.with_suffix(".faiss.tmp"), meta_path.with_suffix(".json.tmp")
        faiss.write_index(self.ivf, str(tmp_index))
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_index, index_path)
        os.replace(tmp_meta, meta_path)

    @classmethod
    def load(cls, directory: Path, model: str) -> "TwoStageIndex | None":
        index_path, meta_path = cls.paths(directory, model)
        if not index_path.is_file() or not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            ivf = faiss.read_index(str(index_path))  # already the concrete type; owns its quantizer
        except (OSError, ValueError, RuntimeError):
            return None  # unreadable cache: the caller rebuilds from the database
        if meta.get("model") != model or not isinstance(ivf, faiss.IndexIVFFlat):
            return None
        index = cls.__new__(cls)
        index.model = model
        index.dim = int(meta["dim"])
        index.category_ids = [int(c) for c in meta["category_ids"]]
        index.list_of = {cid: i for i, cid in enumerate(index.category_ids)}
        index.ivf = ivf
        index.quantizer = faiss.downcast_index(ivf.quantizer)
        index.prototype_counts = np.asarray(meta["prototype_counts"], dtype=np.int64)
        index.state = dict(meta["state"])
        return index
