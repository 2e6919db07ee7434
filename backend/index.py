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
  file (backend/index_fastscan.py). `auto` picks flat or fastscan by catalogue size at each build.
Probing every list is an exact search over all vectors (with the float32 codec). The codec (float32,
float16, sq8, pq<M>) is how the lists store vectors: never by residual, so codes do not depend on the
list, and a list can be copied or a vector moved without re-encoding.
Scores are inner products of L2-normalised vectors, i.e. cosine similarities.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import faiss
import numpy as np
from faiss import swig_ptr

from backend.core.config import Settings
from backend.core.errors import ConfigurationError
from backend.core.search_params import AUTO_FASTSCAN_FROM, CODEC_PATTERN, INDEX_KINDS, IndexKind
from backend.vectors import PrototypeMatrix, StoredVectors, l2_normalise

_SQ_TYPES = {"float16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}
_NO_MAP, _HASHTABLE = faiss.DirectMap.NoMap, faiss.DirectMap.Hashtable  # type: ignore[attr-defined]
KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234
TRAIN_POINTS_PER_LIST = 64  # k-means sample per sub-list; FAISS asks for at least 39
PQ_CENTROIDS = 256  # 8-bit sub-quantizers
# sq8 ranges and PQ codebooks are trained on at most this many vectors (PQ's k-means is the slow part).
SQ_TRAIN_POINTS, PQ_TRAIN_POINTS = 65_536, 16_384
RERANK_CODECS = ("none", "float32", "float16")
STALE_GROWTH = 4.0  # a trained category this many times its training size (and several lists over) is retrained


@dataclass(frozen=True)
class IndexSpec:
    """How the index is laid out and stores its vectors; checked once, at start-up."""

    kind: IndexKind = "flat"
    codec: str = "float32"
    list_size: int = 256  # ivf: vectors per sub-list when a category is trained
    rerank: str = "none"  # a second copy of the vectors (float32/float16) to re-rank a shortlist exactly
    fastscan_m: int = 0  # auto: the PQ sub-quantizers of fastscan above the threshold (fastscan: codec pq<M>)
    auto_threshold: int = AUTO_FASTSCAN_FROM  # auto: fastscan from this many vectors, flat below
    store_dir: Path | None = field(default=None, compare=False)  # fastscan: where its re-rank file lives

    def __post_init__(self) -> None:
        if self.rerank not in RERANK_CODECS:
            raise ValueError(f"unknown re-ranking codec {self.rerank!r}; choose one of: {', '.join(RERANK_CODECS)}")
        if self.rerank != "none" and self.codec == "float32":
            raise ValueError("re-ranking needs a compressed VECTOR_CODEC (float16, sq8, pq<M>): float32 is exact already")
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index type {self.kind!r}; choose one of: {', '.join(INDEX_KINDS)}")
        if not CODEC_PATTERN.match(self.codec):
            raise ValueError(f"unknown vector codec {self.codec!r}; choose float32, float16, sq8 or pq<M> (e.g. pq64)")
        if self.list_size < 1:
            raise ValueError("list size must be at least 1")
        if self.kind == "fastscan" and (self.pq_m is None or self.rerank != "none"):
            raise ValueError("fastscan stores 4-bit PQ codes (codec pq<M>) and re-ranks from its own float16 file")

    @property
    def pq_m(self) -> int | None:
        return _pq_m(self.codec)

    @property
    def codec_train_points(self) -> int:
        return PQ_TRAIN_POINTS if self.pq_m else SQ_TRAIN_POINTS

    def check_dim(self, dim: int) -> None:
        for m, name in ((self.pq_m, f"codec {self.codec}"), (self.fastscan_m or None, f"FASTSCAN_M={self.fastscan_m}")):
            if m is not None and dim % m:
                raise ValueError(f"{name}: {m} does not divide the vector dimension {dim}")

    def lists_for(self, vectors: int) -> int:
        return 1 if self.kind == "flat" else max(1, round(vectors / self.list_size))

    @property
    def trains_codec(self) -> bool:
        return self.codec not in ("float32", "float16")

    def train_fraction(self, sizes: dict[int, int]) -> float:
        """Which share of a catalogue of `sizes[category]` vectors to train on: enough for k-means
        (TRAIN_POINTS_PER_LIST per sub-list) and for the codec, and no more."""
        total = sum(sizes.values())
        need = TRAIN_POINTS_PER_LIST * sum(self.lists_for(n) for n in sizes.values()) if self.kind != "flat" else 0
        if self.trains_codec:
            need = max(need, self.codec_train_points)
        return 1.0 if total == 0 else min(1.0, need / total)

    def code_bytes(self, dim: int, codec: str | None = None) -> int:
        codec = codec or self.codec
        m = _pq_m(codec)
        return m if m is not None else {"float32": 4, "float16": 2, "sq8": 1}[codec] * dim


def index_spec(settings: Settings, dim: int) -> IndexSpec:
    """The layout the settings ask for, checked against the model's dimension: one clear error at start-up."""
    try:
        kind, codec, rerank = settings.faiss_index_type, settings.vector_codec, settings.rerank
        m = settings.fastscan_m or dim // 4
        if kind == "fastscan":
            if (codec, rerank) != ("float32", "none"):
                raise ValueError("fastscan has its own codes (FASTSCAN_M) and re-rank file: unset VECTOR_CODEC and RERANK")
            codec = f"pq{m}"
        spec = IndexSpec(kind, codec, settings.faiss_list_size, rerank, m, settings.faiss_auto_threshold, settings.index_dir)
        spec.check_dim(dim)
    except ValueError as exc:
        raise ConfigurationError(f"FAISS_INDEX_TYPE / VECTOR_CODEC / RERANK / FASTSCAN_M: {exc}") from None
    return spec


def index_class(kind: str) -> type["TwoStageIndex"]:
    """The class behind an index type: fastscan's lists and re-rank file live in backend/index_fastscan.py."""
    if kind == "fastscan":
        from backend.index_fastscan import FastScanIndex

        return FastScanIndex
    if kind not in ("flat", "ivf"):
        raise ValueError(f"no index of type {kind!r} can be built (auto is resolved by catalogue size first)")
    return TwoStageIndex


def sample_cut(fraction: float) -> int:
    return min(SAMPLE_MODULUS, max(1, round(fraction * SAMPLE_MODULUS))) if fraction > 0 else 0


def train_sample(ids: np.ndarray, fraction: float) -> np.ndarray:
    """Which of `ids` train the index: a fixed pseudo-random subset decided by the id alone, so a streamed
    rebuild (which asks the database for the same rule, see `catalogue.vector_sample`) and an in-memory
    build train on the same vectors."""
    return (np.asarray(ids, dtype=np.int64) * SAMPLE_MULTIPLIER) % SAMPLE_MODULUS < sample_cut(fraction)


SAMPLE_MULTIPLIER, SAMPLE_MODULUS = 2654435761, 10_000


@dataclass(frozen=True)
class SearchHits:
    scores: np.ndarray  # (n, k) float32 cosine similarities, -inf where fewer than k were found
    ids: np.ndarray  # (n, k) int64 image ids, -1 where fewer than k were found
    scanned: np.ndarray  # (n,) vectors each query compared against


class TwoStageIndex:
    def __init__(self, model: str, dim: int, category_ids: list[int], spec: IndexSpec, lists_per_category: list[int]) -> None:
        """An empty, untrained layout: `lists_per_category[j]` sub-lists for category j (see `train`)."""
        spec.check_dim(dim)
        self.model, self.dim, self.spec = model, dim, spec
        self.category_ids = [int(c) for c in category_ids]
        self.list_of = {cid: i for i, cid in enumerate(self.category_ids)}
        counts = np.asarray(lists_per_category or [1], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # category j: lists offsets[j]..[j+1]
        self.trained_sizes = np.zeros(len(counts), dtype=np.int64)  # vectors at training; 0 = untrained
        self.codec_trained_on = 0  # vectors the sq8 / PQ codec was trained on
        self.ivf = self._new_lists(int(self.offsets[-1]))
        # The re-ranking copy: same lists and ids, looked up by id (a hash-table direct map) for a shortlist.
        self.store = None if spec.rerank == "none" else _new_ivf(spec.rerank, dim, int(self.offsets[-1]))
        if self.store is not None:
            self.store.set_direct_map_type(_HASHTABLE)
        self.centroids = np.zeros((int(self.offsets[-1]), dim), dtype=np.float32)
        self._sizes = np.zeros(int(self.offsets[-1]), dtype=np.int64)
        self.prototypes = faiss.IndexFlatIP(dim)
        self.prototypes.add(np.zeros((len(counts), dim), dtype=np.float32))
        self.prototype_counts = np.zeros(len(counts), dtype=np.int64)
        self.prototypes_set = False

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def train(
        cls, model: str, dim: int, category_ids: list[int], spec: IndexSpec, sizes: dict[int, int], sample: StoredVectors
    ) -> "TwoStageIndex":
        """An empty index trained for a catalogue of `sizes[category]` vectors, on a sample of them: the
        codec (sq8, pq) on the whole sample, each category's sub-lists by k-means on its own vectors."""
        category_ids = sorted(int(c) for c in category_ids)
        per_category = []
        for cid in category_ids:
            have = int((sample.category_ids == cid).sum())
            per_category.append(max(1, min(spec.lists_for(sizes.get(cid, 0)), have)))
        index = index_class(spec.kind)(model, dim, category_ids, spec, per_category)
        for j, cid in enumerate(category_ids):
            x = sample.vectors[sample.category_ids == cid]
            if spec.kind == "flat":
                index.trained_sizes[j] = max(1, sizes.get(cid, 0))  # one list, always scanned whole
                continue
            if not len(x):
                continue  # untrained: one list with a zero centroid, always scanned
            k = per_category[j]
            if k == 1:
                centroids = l2_normalise(x.mean(axis=0, keepdims=True))
            else:
                km = faiss.Kmeans(  # few points a centroid is expected here (small categories): no FAISS warning
                    dim,
                    k,
                    niter=KMEANS_ITERATIONS,
                    seed=KMEANS_SEED,
                    spherical=True,
                    max_points_per_centroid=256,
                    min_points_per_centroid=1,
                )
                km.train(np.ascontiguousarray(x[: k * 256]))
                centroids = np.asarray(km.centroids)
            index.centroids[index.offsets[j] : index.offsets[j + 1]] = centroids
            index.trained_sizes[j] = max(1, sizes.get(cid, len(x)))
        for ivf in index._ivfs():
            ivf.quantizer.add(index.centroids)  # kept in the file; not used to assign (we do, per category)
        index._reserve(sizes, sample)
        index.codec_trained_on = index._train_codec(sample)
        return index

    def _new_lists(self, nlist: int) -> faiss.IndexIVF:
        return _new_ivf(self.spec.codec, self.dim, nlist)

    def _train_codec(self, sample: StoredVectors) -> int:
        return _train_codec(self.ivf, self.spec, sample.vectors)

    @classmethod
    def build(
        cls,
        model: str,
        dim: int,
        category_ids: list[int],
        stored: StoredVectors,
        prototypes: PrototypeMatrix,
        spec: IndexSpec | None = None,
    ) -> "TwoStageIndex":
        """Train on the `train_sample` of `stored`, then add all of it: the in-memory twin of a streamed rebuild."""
        spec = spec or IndexSpec()
        cats, counts = np.unique(stored.category_ids, return_counts=True)
        sizes = {int(c): int(n) for c, n in zip(cats, counts, strict=True)}
        pick = train_sample(stored.ids, spec.train_fraction(sizes))
        sample = StoredVectors(stored.ids[pick], stored.category_ids[pick], stored.vectors[pick])
        index = cls.train(model, dim, category_ids, spec, sizes, sample)
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
            invlists = faiss.downcast_InvertedLists(ivf.invlists) if ivf.invlists is not None else None
            if not isinstance(invlists, faiss.ArrayInvertedLists):
                continue
            for list_no, expected in enumerate(per_list):
                if expected >= 1:
                    invlists.resize(list_no, int(expected * 1.1) + 8)  # grows the capacity ...
                    invlists.resize(list_no, 0)  # ... which shrinking the size keeps

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
        grown = type(self)(self.model, self.dim, union, self.spec, per_category)
        _copy_codec(self.ivf, grown.ivf, self.spec)
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
            if new_ivf is grown.store:
                new_ivf.set_direct_map_type(_NO_MAP)  # entries go in below, around the map
            source, target = old_ivf.invlists, new_ivf.invlists
            assert source is not None and target is not None
            for old_list, new_list in moves:
                size = old_ivf.get_list_size(old_list)
                if size:
                    target.add_entries(new_list, size, source.get_ids(old_list), source.get_codes(old_list))
            new_ivf.ntotal = old_ivf.ntotal
            new_ivf.quantizer.add(grown.centroids)
            if new_ivf is grown.store:
                new_ivf.set_direct_map_type(_HASHTABLE)  # rebuilt from the lists
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
        scores, cats = self.prototypes.search(np.ascontiguousarray(queries, dtype=np.float32), max(k, 1))
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
                self.probe_lists(x[i], np.asarray(categories[i]), nprobe if self.spec.kind == "ivf" else None) for i in range(n)
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
            scores, ids = self._rerank(x, scores, ids, final_k)
        return SearchHits(scores, ids, scanned)

    def _rerank(self, x: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.store is not None
        out_scores = np.full((len(x), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(x), k), -1, dtype=np.int64)
        for i in range(len(x)):
            found = ids[i][ids[i] >= 0]
            if not len(found):
                continue
            exact = self.store.reconstruct_batch(found) @ x[i]
            best = np.argsort(-exact, kind="stable")[:k]
            out_scores[i, : len(best)], out_ids[i, : len(best)] = exact[best], found[best]
        return out_scores, out_ids

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
            self.spec.trains_codec
            and self.codec_trained_on < self.spec.codec_train_points
            and self.ntotal >= STALE_GROWTH * max(1, self.codec_trained_on)
        ):
            why.append(
                f"the {self.spec.codec} codec was trained on {self.codec_trained_on} vectors, the index holds {self.ntotal}"
            )
        return why

    def stale_categories(self) -> list[int]:
        """Categories a rebuild would lay out differently: untrained ones holding vectors, and trained ones
        grown to STALE_GROWTH times their training size and more lists than they have."""
        if self.spec.kind == "flat":
            return []
        sizes = self.category_sizes()
        lists = np.diff(self.offsets)
        stale = []
        for j, cid in enumerate(self.category_ids):
            want = self.spec.lists_for(int(sizes[j]))
            if (self.trained_sizes[j] == 0 and sizes[j] > 0) or (
                sizes[j] >= STALE_GROWTH * self.trained_sizes[j] and want > lists[j]
            ):
                stale.append(cid)
        return stale

    # --- serialisation (the cache file's format and checks live in backend/index_cache.py) ---

    def describe(self) -> dict:
        return {
            "model": self.model,
            "dim": self.dim,
            "category_ids": self.category_ids,
            "index_type": self.spec.kind,
            "codec": self.spec.codec,
            "list_size": self.spec.list_size,
            "rerank": self.spec.rerank,
            "lists_per_category": np.diff(self.offsets).tolist(),
            "trained_sizes": self.trained_sizes.tolist(),
            "codec_trained_on": self.codec_trained_on,
        }

    def write(self, sink: Callable[[bytes], object]) -> None:
        for ivf in self._ivfs():  # one after the other in the same stream; `read` reads them back in turn
            faiss.write_index(ivf, faiss.PyCallbackIOWriter(sink))  # type: ignore[attr-defined]

    @classmethod
    def read(
        cls,
        source: Callable[[int], bytes],
        model: str,
        dim: int,
        category_ids: list[int],
        index_type: IndexKind,
        codec: str,
        list_size: int,
        rerank: str,
        lists_per_category: list[int],
        trained_sizes: list[int],
        codec_trained_on: int,
        store_dir: Path | None = None,  # where fastscan's re-rank file lives; the others keep everything in `source`
    ) -> "TwoStageIndex":
        """The inverse of `write` + `describe`, without prototypes (they come from the database: see
        `set_prototypes`); raises ValueError when the bytes do not fit the description."""
        spec = IndexSpec(index_type, codec, list_size, rerank)
        if len(lists_per_category) != max(1, len(category_ids)) or len(trained_sizes) != len(lists_per_category):
            raise ValueError("the list layout does not match the categories")
        index = cls(model, dim, category_ids, spec, lists_per_category)
        loaded = [_read_ivf(source, c, dim, sum(lists_per_category), spec) for c in (codec, rerank) if c != "none"]
        index.ivf, index.store = loaded[0], (loaded[1] if len(loaded) > 1 else None)
        if index.store is not None and index.store.ntotal != index.ivf.ntotal:
            raise ValueError("the re-ranking copy does not match the index")
        index._loaded(trained_sizes, codec_trained_on)
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


def _pq_m(codec: str) -> int | None:
    match = CODEC_PATTERN.match(codec)
    return int(match.group(2)) if match and match.group(2) else None


def _read_ivf(source: Callable[[int], bytes], codec: str, dim: int, nlist: int, spec: IndexSpec) -> faiss.IndexIVF:
    try:
        ivf = faiss.read_index(faiss.PyCallbackIOReader(source))  # type: ignore[attr-defined]  # owns its quantizer
    except RuntimeError as exc:
        raise ValueError(f"not a FAISS index: {exc}") from exc
    expected = type(_new_ivf(codec, dim, 1))
    if not isinstance(ivf, expected) or ivf.d != dim or ivf.nlist != nlist or ivf.code_size != spec.code_bytes(dim, codec):
        raise ValueError("the FAISS index does not match its description")
    return ivf


def _new_ivf(codec: str, dim: int, nlist: int) -> faiss.IndexIVF:
    quantizer = faiss.IndexFlatIP(dim)
    ivf: faiss.IndexIVF
    if codec == "float32":
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    elif codec in _SQ_TYPES:
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, _SQ_TYPES[codec], faiss.METRIC_INNER_PRODUCT, False)
    else:
        m = _pq_m(codec)
        assert m is not None
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = False
    ivf.is_trained = True  # lists are assigned by us (per category); codecs are trained in _train_codec
    return ivf


def _train_codec(ivf: faiss.IndexIVF, spec: IndexSpec, sample: np.ndarray) -> int:
    """Train sq8 ranges / PQ codebooks on the sample. A catalogue too small to train on (PQ needs 256
    vectors) is padded with jittered copies; status reports it as stale and the next rebuild retrains."""
    if not spec.trains_codec:
        return 0
    x = np.ascontiguousarray(sample[: spec.codec_train_points], dtype=np.float32)
    real = len(x)
    need = PQ_CENTROIDS if spec.pq_m else 2
    if len(x) < need:
        rng = np.random.default_rng(KMEANS_SEED)
        base = x if len(x) else l2_normalise(rng.standard_normal((1, ivf.d), dtype=np.float32))
        jitter = base[rng.integers(0, len(base), need)] + 0.01 * rng.standard_normal((need, ivf.d), dtype=np.float32)
        x = np.concatenate([x, l2_normalise(jitter)])
    if spec.pq_m:
        cast(faiss.IndexIVFPQ, ivf).pq.cp.min_points_per_centroid = 1  # small catalogues train anyway, quietly
    ivf.train_encoder(len(x), swig_ptr(x), None)
    return real


def _copy_codec(source: faiss.IndexIVF, target: faiss.IndexIVF, spec: IndexSpec) -> None:
    if spec.codec in _SQ_TYPES:
        cast(faiss.IndexIVFScalarQuantizer, target).sq = cast(faiss.IndexIVFScalarQuantizer, source).sq
    elif spec.pq_m:
        cast(faiss.IndexIVFPQ, target).pq = cast(faiss.IndexIVFPQ, source).pq
