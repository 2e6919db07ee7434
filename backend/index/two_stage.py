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
Scores are inner products of L2-normalised vectors, i.e. cosine similarities.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, cast

import faiss
import numpy as np
from faiss import swig_ptr

from backend.core.vectors import PrototypeMatrix, StoredVectors
from backend.index import ivf_lists
from backend.index.layout import STALE_GROWTH, IndexDescription, IndexLayout
from backend.index.sampling import train_sample


@dataclass(frozen=True)
class SearchHits:
    scores: np.ndarray  # (n, k) float32 cosine similarities, -inf where fewer than k were found
    ids: np.ndarray  # (n, k) int64 image ids, -1 where fewer than k were found
    scanned: np.ndarray  # (n,) vectors each query compared against


class TwoStageIndex:
    KINDS: ClassVar[tuple[str, ...]] = ("flat", "ivf")  # the layouts this class builds (fastscan: FastScanIndex)

    def __init__(
        self,
        model: str,
        dim: int,
        category_ids: list[int],
        layout: IndexLayout,
        lists_per_category: list[int],
        store_dir: Path | None = None,
    ) -> None:
        """An empty, untrained index: `lists_per_category[j]` sub-lists for category j (see `train`).
        `store_dir`: where an index type that keeps files beside the cache (fastscan) writes them."""
        if layout.kind not in self.KINDS:
            raise ValueError(f"a {type(self).__name__} cannot hold a {layout.kind!r} layout (see build.index_class)")
        layout.check_dim(dim)
        self.model, self.dim, self.layout, self.store_dir = model, dim, layout, store_dir
        self.category_ids = [int(c) for c in category_ids]
        self.list_of = {cid: i for i, cid in enumerate(self.category_ids)}
        counts = np.asarray(lists_per_category or [1], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # category j: lists offsets[j]..[j+1]
        self.trained_sizes = np.zeros(len(counts), dtype=np.int64)  # vectors at training; 0 = untrained
        self.codec_trained_on = 0  # vectors the sq8 / PQ codec was trained on
        self.ivf = self._new_lists(int(self.offsets[-1]))
        # The re-ranking copy: same lists and ids, looked up by id (a hash-table direct map) for a shortlist.
        self.store = None if layout.rerank == "none" else ivf_lists.new_ivf(layout.rerank, dim, int(self.offsets[-1]))
        if self.store is not None:
            self.store.set_direct_map_type(ivf_lists.HASHTABLE)
        self.centroids = np.zeros((int(self.offsets[-1]), dim), dtype=np.float32)
        self._sizes = np.zeros(int(self.offsets[-1]), dtype=np.int64)
        self.prototypes = faiss.IndexFlatIP(dim)
        self.prototypes.add(np.zeros((len(counts), dim), dtype=np.float32))
        self.prototype_counts = np.zeros(len(counts), dtype=np.int64)
        self.prototypes_set = False

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        model: str,
        dim: int,
        category_ids: list[int],
        layout: IndexLayout,
        sizes: dict[int, int],
        sample: StoredVectors,
        store_dir: Path | None = None,
    ) -> "TwoStageIndex":
        """An empty index trained for a catalogue of `sizes[category]` vectors, on a sample of them: the
        codec (sq8, pq) on the whole sample, each category's sub-lists by k-means on its own vectors."""
        category_ids = sorted(int(c) for c in category_ids)
        per_category = []
        for cid in category_ids:
            have = int((sample.category_ids == cid).sum())
            per_category.append(max(1, min(layout.lists_for(sizes.get(cid, 0)), have)))
        index = cls(model, dim, category_ids, layout, per_category, store_dir)
        for j, cid in enumerate(category_ids):
            x = sample.vectors[sample.category_ids == cid]
            if layout.kind == "flat":
                index.trained_sizes[j] = max(1, sizes.get(cid, 0))  # one list, always scanned whole
                continue
            if not len(x):
                continue  # untrained: one list with a zero centroid, always scanned
            index.centroids[index.offsets[j] : index.offsets[j + 1]] = ivf_lists.sub_list_centroids(x, per_category[j])
            index.trained_sizes[j] = max(1, sizes.get(cid, len(x)))
        for ivf in index._ivfs():
            ivf.quantizer.add(index.centroids)  # kept in the file; not used to assign (we do, per category)
        index._reserve(sizes, sample)
        index.codec_trained_on = index._train_codec(sample)
        return index

    def _new_lists(self, nlist: int) -> faiss.IndexIVF:
        return ivf_lists.new_ivf(self.layout.codec, self.dim, nlist)

    def _train_codec(self, sample: StoredVectors) -> int:
        return ivf_lists.train_codec(self.ivf, self.layout, sample.vectors)

    @classmethod
    def build(
        cls,
        model: str,
        dim: int,
        category_ids: list[int],
        stored: StoredVectors,
        prototypes: PrototypeMatrix,
        layout: IndexLayout | None = None,
        store_dir: Path | None = None,
    ) -> "TwoStageIndex":
        """Train on the `train_sample` of `stored`, then add all of it: the in-memory twin of a streamed rebuild."""
        layout = layout or IndexLayout()
        cats, counts = np.unique(stored.category_ids, return_counts=True)
        sizes = {int(c): int(n) for c, n in zip(cats, counts, strict=True)}
        pick = train_sample(stored.ids, layout.train_fraction(sizes))
        sample = StoredVectors(stored.ids[pick], stored.category_ids[pick], stored.vectors[pick])
        index = cls.train(model, dim, category_ids, layout, sizes, sample, store_dir)
        index.set_prototypes(prototypes)
        index.add(stored.ids, stored.category_ids, stored.vectors)
        return index

    def _reserve(self, sizes: dict[int, int], sample: StoredVectors) -> None:
        """Give every list room for the share of its category the sample says it will get (+10 %): lists
        filled chunk by chunk then never reallocate, which would hold up to twice their memory."""
        if not len(sample):
            return
        known = np.isin(sample.category_ids, self.category_ids)
        lists = self.assign(sample.category_ids[known], sample.vectors[known])
        per_list = np.bincount(lists, minlength=int(self.offsets[-1])).astype(np.float64)
        for j, cid in enumerate(self.category_ids):
            lo, hi = self.offsets[j], self.offsets[j + 1]
            drawn = per_list[lo:hi].sum()
            if drawn:
                per_list[lo:hi] *= sizes.get(cid, 0) / drawn
        for ivf in self._ivfs():
            ivf_lists.reserve(ivf, per_list)

    def set_prototypes(self, prototypes: PrototypeMatrix) -> None:
        """Replace all prototypes. Categories without given-label images keep a zero prototype (score 0)."""
        matrix = np.zeros((len(self.category_ids) or 1, self.dim), dtype=np.float32)
        counts = np.zeros(len(matrix), dtype=np.int64)
        for cid, vec, count in zip(prototypes.category_ids, prototypes.vectors, prototypes.counts, strict=True):
            if int(cid) in self.list_of:
                matrix[self.list_of[int(cid)]] = vec
                counts[self.list_of[int(cid)]] = count
        self.prototypes.reset()
        self.prototypes.add(matrix)
        self.prototype_counts = counts
        self.prototypes_set = True

    def assign(self, category_ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """The list of each vector: the nearest sub-list centroid of its own category."""
        cats = np.asarray([self.list_of[int(c)] for c in category_ids], dtype=np.int64)
        lists = self.offsets[cats].copy()
        for j in np.unique(cats):
            lo, hi = self.offsets[j], self.offsets[j + 1]
            if hi - lo > 1:
                rows = np.flatnonzero(cats == j)
                lists[rows] = lo + np.argmax(vectors[rows] @ self.centroids[lo:hi].T, axis=1)
        return lists

    def placed(self, category_ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectors as contiguous float32, with their lists; KeyError for a category not in this index."""
        unknown = {int(c) for c in category_ids if int(c) not in self.list_of}
        if unknown:
            raise KeyError(f"categories {sorted(unknown)} are not in this index")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        return x, np.ascontiguousarray(self.assign(category_ids, x))

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

    def has_categories(self, category_ids: list[int]) -> bool:
        return all(int(c) in self.list_of for c in category_ids)

    def with_categories(self, category_ids: list[int]) -> "TwoStageIndex":
        """A copy with (untrained, one-list) categories added: the trained codec, centroids and entries are
        copied in memory, list by list, so a new category costs a memory copy, not a rebuild."""
        union = sorted(set(self.category_ids) | {int(c) for c in category_ids})
        per_category = [int(np.diff(self.offsets)[self.list_of[c]]) if c in self.list_of else 1 for c in union]
        grown = type(self)(self.model, self.dim, union, self.layout, per_category)  # no store_dir: nothing to spool
        ivf_lists.copy_codec(self.ivf, grown.ivf, self.layout)
        moves = []  # (old list, new list)
        for old_j, cid in enumerate(self.category_ids):
            new_j = grown.list_of[cid]
            grown.trained_sizes[new_j] = self.trained_sizes[old_j]
            grown.prototype_counts[new_j] = self.prototype_counts[old_j]
            for step in range(int(self.offsets[old_j + 1] - self.offsets[old_j])):
                moves.append((int(self.offsets[old_j]) + step, int(grown.offsets[new_j]) + step))
        for old_list, new_list in moves:
            grown.centroids[new_list] = self.centroids[old_list]
        for old_ivf, new_ivf in zip(self._ivfs(), grown._ivfs(), strict=True):
            ivf_lists.copy_lists(old_ivf, new_ivf, moves, hashed=new_ivf is grown.store)
            new_ivf.quantizer.add(grown.centroids)
        grown._sizes = grown._read_sizes()
        old_prototypes = self.prototypes.reconstruct_n(0, self.prototypes.ntotal)
        matrix = np.zeros((len(union), self.dim), dtype=np.float32)
        for old_j, cid in enumerate(self.category_ids):
            matrix[grown.list_of[cid]] = old_prototypes[old_j]
        grown.prototypes.reset()
        grown.prototypes.add(matrix)
        grown.prototypes_set = self.prototypes_set
        grown.codec_trained_on = self.codec_trained_on
        return grown

    # --- searching --------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.ivf.ntotal)

    def _read_sizes(self) -> np.ndarray:
        return np.array([self.ivf.get_list_size(i) for i in range(self.ivf.nlist)], dtype=np.int64)

    def category_sizes(self) -> np.ndarray:
        """Vectors per category, in category-number order."""
        return np.add.reduceat(self._sizes, self.offsets[:-1]) if len(self._sizes) else np.zeros(0, np.int64)

    def rank_categories(self, queries: np.ndarray, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: (scores, category numbers), best first, for the top `top` categories (all if None)."""
        k = len(self.category_ids) if top is None else min(top, len(self.category_ids))
        x = np.ascontiguousarray(queries, dtype=np.float32)
        scores, cats = np.empty((len(x), max(k, 1)), np.float32), np.empty((len(x), max(k, 1)), np.int64)
        # FAISS's own call without its Python wrapper: a few µs of a 0.15 ms single-query search
        self.prototypes.search_c(len(x), swig_ptr(x), max(k, 1), swig_ptr(scores), swig_ptr(cats))  # type: ignore[attr-defined]
        return scores[:, :k], cats[:, :k]

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

    # --- what status shows ------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Codes, ids, centroids and prototypes held in memory (and the re-ranking copy with its id map)."""
        per_vector = sum(ivf.code_size + 8 for ivf in self._ivfs()) + (16 if self.store is not None else 0)
        return self.ntotal * per_vector + (len(self.centroids) * len(self._ivfs()) + len(self.category_ids)) * self.dim * 4

    def needs_retraining(self) -> list[str]:
        """Why a rebuild would train this index differently (nothing when it would not)."""
        why = []
        stale = self.stale_categories()
        if stale:
            why.append(f"{len(stale)} categories grew far beyond their training (or are new): ids {stale[:20]}")
        if (
            self.layout.trains_codec
            and self.codec_trained_on < self.layout.codec_train_points
            and self.ntotal >= STALE_GROWTH * max(1, self.codec_trained_on)
        ):
            why.append(
                f"the {self.layout.codec} codec was trained on {self.codec_trained_on} vectors, the index holds {self.ntotal}"
            )
        return why

    def stale_categories(self) -> list[int]:
        """Categories a rebuild would lay out differently (see `IndexLayout.stale_categories`)."""
        return self.layout.stale_categories(self.category_ids, self.category_sizes(), self.trained_sizes, np.diff(self.offsets))

    # --- serialisation (the cache file's format and checks live in backend/search/index_file.py) ---

    def describe(self) -> IndexDescription:
        return IndexDescription(
            model=self.model,
            dim=self.dim,
            category_ids=self.category_ids,
            layout=self.layout,
            lists_per_category=np.diff(self.offsets).tolist(),
            trained_sizes=self.trained_sizes.tolist(),
            codec_trained_on=self.codec_trained_on,
        )

    def write(self, sink: Callable[[bytes], object]) -> None:
        for ivf in self._ivfs():  # one after the other in the same stream; `read` reads them back in turn
            faiss.write_index(ivf, faiss.PyCallbackIOWriter(sink))  # type: ignore[attr-defined]

    @classmethod
    def read(
        cls, source: Callable[[int], bytes], description: IndexDescription, store_dir: Path | None = None
    ) -> "TwoStageIndex":
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

    def _loaded(self, trained_sizes: list[int], codec_trained_on: int) -> None:
        """The state kept beside the FAISS lists, after `read` put them in place."""
        self.trained_sizes = np.asarray(trained_sizes, dtype=np.int64)
        self.codec_trained_on = codec_trained_on
        quantizer = cast(faiss.IndexFlatIP, faiss.downcast_index(self.ivf.quantizer))
        if quantizer.ntotal != self.ivf.nlist:
            raise ValueError("the FAISS index has no centroid for every list")
        self.centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
        self._sizes = self._read_sizes()
