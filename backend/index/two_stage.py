"""The two-stage FAISS index: category prototypes first, then only the top categories' vectors.

Stage 1 ranks the category prototypes. Stage 2 searches only the vectors of the top-C categories, through
one `IndexIVF` whose inverted lists each belong to exactly one category:
- `flat`: one list per category, scanned whole: exact inside the top categories (the original design).
- `ivf`: each category is split by k-means into sub-lists of about `list_size` vectors; a query scans the
  `nprobe` sub-lists nearest to it among the top categories' sub-lists. Cost grows with nprobe, not with
  the catalogue. New vectors go to their category's nearest sub-list, so adding needs no retraining; a
  category new since training has one list that is always scanned, and `stale_categories` names the
  categories a rebuild should retrain.
- `fastscan`: the same sub-lists holding 4-bit PQ codes scanned by SIMD, re-ranked exactly from a float16
  file (backend/index/fastscan.py). `auto` picks flat or fastscan by catalogue size at each build.
Probing every list is an exact search over all vectors (with the float32 codec). The codec (float32,
float16, sq8, pq<M>) is how the lists store vectors: never by residual, so codes do not depend on the
list, and a list can be copied or a vector moved without re-encoding.
Scores are inner products of L2-normalised vectors, i.e. cosine similarities. This module is flat and ivf;
`CategoryLists` (backend/index/category_lists.py) is what it shares with its sibling `FastScanIndex`.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Self

import faiss
import numpy as np
from faiss import swig_ptr

from backend.core.vectors import StoredVectors
from backend.index import ivf_lists
from backend.index.category_index import SearchHits
from backend.index.category_lists import CategoryLists
from backend.index.layout import IndexDescription, IndexLayout


class TwoStageIndex(CategoryLists):
    KINDS = ("flat", "ivf")  # fastscan: FastScanIndex

    def __init__(
        self,
        model: str,
        dim: int,
        category_ids: list[int],
        layout: IndexLayout,
        lists_per_category: list[int],
        store_dir: Path | None = None,
    ) -> None:
        """As `CategoryLists`, with a re-ranking copy when the layout asks for one."""
        super().__init__(model, dim, category_ids, layout, lists_per_category, store_dir)
        # The re-ranking copy: same lists and ids, looked up by id (a hash-table direct map) for a shortlist.
        self.store = None if layout.rerank == "none" else ivf_lists.new_ivf(layout.rerank, dim, int(self.offsets[-1]))
        if self.store is not None:
            self.store.set_direct_map_type(ivf_lists.HASHTABLE)

    def _new_lists(self, nlist: int) -> faiss.IndexIVF:
        return ivf_lists.new_ivf(self.layout.codec, self.dim, nlist)

    def _train_codec(self, sample: StoredVectors) -> int:
        return ivf_lists.train_codec(self.ivf, self.layout, sample.vectors)

    def add(self, ids: np.ndarray, category_ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        x, lists = self.placed(category_ids, vectors)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        for ivf in self._ivfs():
            ivf.add_core(len(x), swig_ptr(x), swig_ptr(ids), swig_ptr(lists))
        np.add.at(self._sizes, lists, 1)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        removed = int(self.ivf.remove_ids(faiss.IDSelectorBatch(ids)))
        if self.store is not None:  # with a hash-table direct map FAISS removes by an id array only
            self.store.remove_ids(faiss.IDSelectorArray(ids))
        if removed:
            self._sizes = self._read_sizes()
        return removed

    def _ivfs(self) -> list[faiss.IndexIVF]:
        return [self.ivf] if self.store is None else [self.ivf, self.store]

    # --- searching --------------------------------------------------------------------------

    def probe_lists(self, query: np.ndarray, categories: np.ndarray, nprobe: int | None) -> np.ndarray:
        """Stage 2's lists for one query: every list of the given categories (flat, or nprobe None), else
        the `nprobe` sub-lists nearest the query among them; untrained categories' lists always."""
        cats = [int(c) for c in categories if c >= 0]
        bounds = [(int(self.offsets[c]), int(self.offsets[c + 1])) for c in cats]
        lists = np.concatenate([np.arange(lo, hi) for lo, hi in bounds]) if bounds else np.zeros(0, dtype=np.int64)
        if nprobe is None or len(lists) <= nprobe:
            return lists
        # Each category's centroids are one contiguous block: score the blocks in place (no gather).
        scores = np.concatenate(
            [
                np.full(hi - lo, np.inf, np.float32) if self.trained_sizes[c] == 0 else self.centroids[lo:hi] @ query
                for c, (lo, hi) in zip(cats, bounds, strict=True)
            ]
        )
        return lists[np.argpartition(-scores, nprobe - 1)[:nprobe]]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        categories: np.ndarray | None = None,
        nprobe: int | None = None,
        shortlist: int = 0,
    ) -> SearchHits:
        """Stage 2 over the given categories (n, C) with `nprobe` sub-lists per query (ivf; None = all their
        lists); `categories=None` scans every list: exact search (with the float32 codec). With a re-ranking
        copy, the best max(k, shortlist) by the compressed codes are re-scored from it and the best k kept."""
        final_k = k
        if self.store is not None and shortlist > k:
            k = shortlist
        x = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(x)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if categories is None:
            lists = np.tile(np.arange(self.ivf.nlist, dtype=np.int64), (n, 1))
        else:
            probe = [
                self.probe_lists(x[i], np.asarray(categories[i]), nprobe if self.layout.kind == "ivf" else None) for i in range(n)
            ]
            lists = np.full((n, max((len(p) for p in probe), default=0)), -1, dtype=np.int64)  # -1: FAISS skips
            for i, p in enumerate(probe):
                lists[i, : len(p)] = p
        if lists.shape[1] == 0 or self.ntotal == 0:
            return SearchHits(scores, ids, np.zeros(n, dtype=np.int64))
        params = faiss.SearchParametersIVF()
        params.nprobe = lists.shape[1]  # per call, so concurrent searches with different C are safe
        params.max_codes = 0
        coarse = np.zeros(lists.shape, dtype=np.float32)
        self.ivf.search_preassigned_c(  # type: ignore[attr-defined]
            n, swig_ptr(x), k, swig_ptr(lists), swig_ptr(coarse), swig_ptr(scores), swig_ptr(ids), False, params
        )
        scanned = np.where(lists >= 0, self._sizes[np.maximum(lists, 0)], 0).sum(axis=1)
        if self.store is not None:
            scores, ids = ivf_lists.rerank_exactly(self.store, x, ids, final_k)
        return SearchHits(scores, ids, scanned)

    # --- what status shows, and the cache file ------------------------------------------------

    def memory_bytes(self) -> int:
        """Codes, ids, centroids and prototypes held in memory (and the re-ranking copy with its id map)."""
        per_vector = sum(ivf.code_size + 8 for ivf in self._ivfs()) + (16 if self.store is not None else 0)
        return self.ntotal * per_vector + (len(self.centroids) * len(self._ivfs()) + len(self.category_ids)) * self.dim * 4

    def write(self, sink: Callable[[bytes], object]) -> None:
        for ivf in self._ivfs():  # one after the other in the same stream; `read` reads them back in turn
            faiss.write_index(ivf, faiss.PyCallbackIOWriter(sink))  # type: ignore[attr-defined]

    @classmethod
    def read(cls, source: Callable[[int], bytes], description: IndexDescription, store_dir: Path | None = None) -> Self:
        """The inverse of `write` + `describe`, without prototypes (they come from the database: see
        `set_prototypes`); raises ValueError when the bytes do not fit the description. `store_dir`: where
        fastscan's re-rank file lives; the others keep everything in `source`."""
        description.check_lists()
        layout, lists = description.layout, description.lists_per_category
        index = cls(description.model, description.dim, description.category_ids, layout, lists)
        nlist = sum(lists)
        codecs = [c for c in (layout.codec, layout.rerank) if c != "none"]
        loaded = [ivf_lists.read_ivf(source, c, description.dim, nlist, layout) for c in codecs]
        index.ivf, index.store = loaded[0], (loaded[1] if len(loaded) > 1 else None)
        if index.store is not None and index.store.ntotal != index.ivf.ntotal:
            raise ValueError("the re-ranking copy does not match the index")
        index._loaded(description.trained_sizes, description.codec_trained_on)
        return index
