"""The category bookkeeping `TwoStageIndex` and `FastScanIndex` share: one FAISS `IndexIVF` whose inverted
lists each belong to one category (a contiguous block of sub-lists per category, with their k-means
centroids), the stage-1 prototypes, training, the sizes status shows and the description the cache file
stores. What the lists hold, and so adding, removing, searching and (de)serialising, is each sibling's own.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Self, cast

import faiss
import numpy as np
from faiss import swig_ptr

from backend.core.vectors import PrototypeMatrix, StoredVectors
from backend.index import ivf_lists
from backend.index.category_index import SearchHits
from backend.index.layout import STALE_GROWTH, IndexDescription, IndexLayout
from backend.index.sampling import train_sample


class CategoryLists(ABC):
    KINDS: ClassVar[tuple[str, ...]]  # the layouts a class builds (see build.index_class)

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
        self.centroids = np.zeros((int(self.offsets[-1]), dim), dtype=np.float32)
        self._sizes = np.zeros(int(self.offsets[-1]), dtype=np.int64)
        self.prototypes = faiss.IndexFlatIP(dim)
        self.prototypes.add(np.zeros((len(counts), dim), dtype=np.float32))
        self.prototype_counts = np.zeros(len(counts), dtype=np.int64)
        self.prototypes_set = False

    # --- what each sibling does its own way -----------------------------------------------------

    @abstractmethod
    def _new_lists(self, nlist: int) -> faiss.IndexIVF: ...

    @abstractmethod
    def _train_codec(self, sample: StoredVectors) -> int:
        """Train the lists' codec (sq8, PQ) on the sample; the vectors it was trained on."""

    @abstractmethod
    def add(self, ids: np.ndarray, category_ids: np.ndarray, vectors: np.ndarray) -> None: ...

    @abstractmethod
    def remove(self, ids: np.ndarray) -> int: ...

    @abstractmethod
    def search(
        self, queries: np.ndarray, k: int, categories: np.ndarray | None = None, nprobe: int | None = None, shortlist: int = 0
    ) -> SearchHits: ...

    @abstractmethod
    def memory_bytes(self) -> int: ...

    @abstractmethod
    def write(self, sink: Callable[[bytes], object]) -> None: ...

    @classmethod
    @abstractmethod
    def read(cls, source: Callable[[int], bytes], description: IndexDescription, store_dir: Path | None = None) -> Self:
        """The inverse of `write` + `describe`, without prototypes (they come from the database)."""

    def _ivfs(self) -> list[faiss.IndexIVF]:
        """Every IndexIVF laid out by these lists (a re-ranking copy is a second one)."""
        return [self.ivf]

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
    ) -> Self:
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
    ) -> Self:
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

    def has_categories(self, category_ids: list[int]) -> bool:
        return all(int(c) in self.list_of for c in category_ids)

    def with_categories(self, category_ids: list[int]) -> Self:
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
            # a second IndexIVF is the re-ranking copy, looked up by id through a hash-table direct map
            ivf_lists.copy_lists(old_ivf, new_ivf, moves, hashed=new_ivf is not grown.ivf)
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

    # --- stage 1 and the lists' sizes -----------------------------------------------------------

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

    # --- what status shows ------------------------------------------------------------------

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

    def _loaded(self, trained_sizes: list[int], codec_trained_on: int) -> None:
        """The state kept beside the FAISS lists, after a sibling's `read` put them in place."""
        self.trained_sizes = np.asarray(trained_sizes, dtype=np.int64)
        self.codec_trained_on = codec_trained_on
        quantizer = cast(faiss.IndexFlatIP, faiss.downcast_index(self.ivf.quantizer))
        if quantizer.ntotal != self.ivf.nlist:
            raise ValueError("the FAISS index has no centroid for every list")
        self.centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
        self._sizes = self._read_sizes()
