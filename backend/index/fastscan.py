"""`fastscan`: the ivf type's category x k-means sub-lists holding 4-bit PQ codes, re-ranked exactly.

The lists are one `IndexIVFPQFastScan` (M sub-quantizers of 4 bits, by residual, inner product) whose
list numbers are laid out as `TwoStageIndex`'s (both are `CategoryLists`): stage 1, the top-C
restriction and nprobe are unchanged. Codes
are scanned with SIMD lookup tables (tens of times more vectors per millisecond than sq8); the best
max(k, RERANK_CANDIDATES) by the codes are re-scored from float16 rows in a memory-mapped file
(backend/index/rerank_file.py), so RAM holds the codes and two small arrays per row only.

Facts of faiss 1.15.1 this relies on:
- fast-scan lists hold codes packed in blocks of 32; `add_core` / `add_sa_codes` would store unpacked
  ones. We encode (`encode_vectors`), pack with the index's `CodePacker` and `add_entries` ourselves.
  `BlockInvertedLists.add_entries` overruns its buffer when a list already holds a multiple of
  `block_size` entries: such a list is rewritten whole instead of appended to.
- by residual with inner product, the coarse score (query . centroid) is part of every code's score, so
  `search_preassigned` gets the real coarse scores.
- One query whose rows are all in the mapped file runs as one `IndexRefine` call over the lists and a
  float16 `IndexScalarQuantizer` whose codes are a view of the mapping (no gather, no Python between the
  list choice, the scan and the re-ranking), on one OpenMP thread; batches and the rest take `_scan`.
- List entries are row numbers of the re-rank file (`row_ids` maps a row to its image). A deletion
  compacts the lists it touches at once, under the index's write lock (fast-scan lists cannot drop an
  entry in place): a deleted image is never returned, and its row is also marked dead (-1) and skipped
  by the re-ranking, a second guard.
"""

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self

import faiss
import numpy as np
from faiss import swig_ptr

from backend.core.vectors import StoredVectors
from backend.index import ivf_lists
from backend.index.byte_streams import ByteSink, ByteSource
from backend.index.category_index import SearchHits
from backend.index.category_lists import CategoryLists
from backend.index.layout import PQ_TRAIN_POINTS, IndexDescription, IndexLayout
from backend.index.probe_plan import ProbePlan
from backend.index.rerank_file import Growing, RerankFile

NBITS, BLOCK = 4, 32  # 4-bit codes, 32 to a SIMD block
PLANS_KEPT = 4096  # category sets whose probe selectors are cached


class FastScanIndex(CategoryLists):
    KINDS = ("fastscan",)

    def __init__(
        self,
        model: str,
        dim: int,
        category_ids: list[int],
        layout: IndexLayout,
        lists_per_category: list[int],
        store_dir: Path | None = None,
    ) -> None:
        """As `CategoryLists`; rows are spooled to a re-rank file under `store_dir` (in RAM without one)."""
        super().__init__(model, dim, category_ids, layout, lists_per_category, store_dir)
        self.packer = self.ivf.get_CodePacker()
        self.row_ids = Growing(np.int64)  # row -> image id; -1 once deleted
        self.row_list = Growing(np.int32)  # row -> list number
        self.vectors = RerankFile(dim, store_dir)
        self._plans: dict[bytes, ProbePlan] = {}  # per (sorted) category set; the layout never changes
        self._params_by_width: dict[int, faiss.SearchParametersIVF] = {}
        self._refine: tuple[tuple[np.ndarray, faiss.IndexScalarQuantizer], faiss.IndexIVF, faiss.IndexRefine] | None = None

    def _new_lists(self, nlist: int) -> faiss.IndexIVF:
        m = self.layout.pq_m
        assert m is not None
        ivf = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(self.dim), self.dim, nlist, m, NBITS, faiss.METRIC_INNER_PRODUCT, BLOCK)
        ivf.by_residual = True
        ivf.is_trained = True  # lists are assigned by us; the codec is trained in _train_codec
        return ivf

    def _train_codec(self, sample: StoredVectors) -> int:
        """PQ codebooks on residuals to each vector's own sub-list centroid (trained plainly on them)."""
        known = np.isin(sample.category_ids, self.category_ids)
        x = sample.vectors[known][:PQ_TRAIN_POINTS]
        residuals = x - self.centroids[self.assign(sample.category_ids[known][:PQ_TRAIN_POINTS], x)]
        self.ivf.by_residual = False
        # M small k-means (16 centroids in dim/M dimensions): OpenMP's start-up per iteration dominates them,
        # 18x slower with 2 threads than 1 on a busy 2-core machine (measured: 200 s against 11 s).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return ivf_lists.train_codec(self.ivf, self.layout, residuals)
        finally:
            self.ivf.by_residual = True
            faiss.omp_set_num_threads(threads)

    # --- the lists: packed blocks in, packed blocks out ------------------------------------

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        blocks = -(-len(codes) // BLOCK)
        padded = np.zeros((blocks * BLOCK, self.ivf.code_size), dtype=np.uint8)
        padded[: len(codes)] = codes
        packed = np.zeros(blocks * self.packer.block_size, dtype=np.uint8)
        for b in range(blocks):
            self.packer.pack_all(swig_ptr(padded[b * BLOCK :]), swig_ptr(packed[b * self.packer.block_size :]))
        return packed

    def _entries(self, list_no: int) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, packed blocks) of a list, copied."""
        invlists = self.ivf.invlists
        assert invlists is not None
        n = invlists.list_size(list_no)
        if not n:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8)
        size = -(-n // BLOCK) * self.packer.block_size
        rows = faiss.rev_swig_ptr(invlists.get_ids(list_no), n).copy()
        packed = faiss.rev_swig_ptr(invlists.get_codes(list_no), size).copy()
        return rows, packed

    def _unpack(self, packed: np.ndarray, n: int) -> np.ndarray:
        codes = np.zeros((-(-n // BLOCK) * BLOCK, self.ivf.code_size), dtype=np.uint8)
        for b in range(len(codes) // BLOCK):
            self.packer.unpack_all(swig_ptr(packed[b * self.packer.block_size :]), swig_ptr(codes[b * BLOCK :]))
        return codes[:n]

    def _append(self, list_no: int, rows: np.ndarray, codes: np.ndarray) -> None:
        invlists = self.ivf.invlists
        assert invlists is not None
        held = invlists.list_size(list_no)
        if held and held % self.packer.block_size == 0:  # FAISS would overrun here: rewrite the list whole
            old_rows, old_packed = self._entries(list_no)  # whole blocks only, as held is a multiple of 32
            rows, packed = np.concatenate([old_rows, rows]), np.concatenate([old_packed, self._pack(codes)])
            invlists.resize(list_no, 0)
        else:
            packed = self._pack(codes)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        invlists.add_entries(list_no, len(rows), swig_ptr(rows), swig_ptr(packed))  # FAISS copies both

    def add(self, ids: np.ndarray, category_ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        x, lists = self.placed(category_ids, vectors)
        codes = np.zeros((len(x), self.ivf.code_size), dtype=np.uint8)
        self.ivf.encode_vectors(len(x), swig_ptr(x), swig_ptr(lists), swig_ptr(codes), False)
        first = self.vectors.append(x)
        self.row_ids.extend(np.asarray(ids, dtype=np.int64))
        self.row_list.extend(lists.astype(np.int32))
        rows = np.arange(first, first + len(x), dtype=np.int64)
        order = np.argsort(lists, kind="stable")
        bounds = np.flatnonzero(np.diff(lists[order])) + 1
        for group in np.split(order, bounds):
            self._append(int(lists[group[0]]), rows[group], codes[group])
        self.ivf.ntotal += len(x)
        np.add.at(self._sizes, lists, 1)

    def remove(self, ids: np.ndarray) -> int:
        """Compact every list holding one of `ids`; their rows are marked dead."""
        rows = np.flatnonzero(np.isin(self.row_ids.view, np.asarray(ids, dtype=np.int64)))
        if not len(rows):
            return 0
        self.row_ids.data[rows] = -1
        invlists = self.ivf.invlists
        assert invlists is not None
        for list_no in np.unique(self.row_list.view[rows]):
            held, packed = self._entries(int(list_no))
            keep = self.row_ids.view[held] >= 0
            codes = self._unpack(packed, len(held))[keep]
            invlists.resize(int(list_no), 0)
            if keep.any():
                kept, packed = np.ascontiguousarray(held[keep]), self._pack(codes)  # alive while FAISS copies them
                invlists.add_entries(int(list_no), len(kept), swig_ptr(kept), swig_ptr(packed))
        self.ivf.ntotal -= len(rows)
        self._sizes = self._read_sizes()
        return len(rows)

    def with_categories(self, category_ids: list[int]) -> Self:
        grown = super().with_categories(category_ids)  # lists copied block by block, rows unchanged
        new_list = np.zeros(self.ivf.nlist, dtype=np.int32)  # old list number -> new
        for j, cid in enumerate(self.category_ids):
            lo, hi = self.offsets[j], self.offsets[j + 1]
            new_list[lo:hi] = grown.offsets[grown.list_of[cid]] + np.arange(hi - lo)
        grown.row_ids.extend(self.row_ids.view)
        grown.row_list.extend(new_list[self.row_list.view])
        grown.vectors = self.vectors  # append-only: rows the old index holds stay valid for it
        grown.store_dir = self.store_dir
        return grown

    # --- searching ----------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        categories: np.ndarray | None = None,
        nprobe: int | None = None,
        shortlist: int = 0,
    ) -> SearchHits:
        """The best max(k, shortlist) by the codes among the probed sub-lists (every list when `categories`
        is None), re-scored exactly from the float16 rows; the best k kept."""
        x = np.ascontiguousarray(queries, dtype=np.float32)
        n, short = len(x), max(k, shortlist)
        # One query is ~0.1 ms of work: an OpenMP team would cost more to wake than it saves, and on a busy
        # machine FAISS's unconditional parallel regions wait a scheduler slice (measured: 8 ms p50) for it.
        threads = faiss.omp_get_max_threads()
        if n == 1:
            faiss.omp_set_num_threads(1)  # this thread's setting only (an OpenMP ICV), restored below
        try:
            lists, coarse, plans = self._probe_all(x, categories, nprobe)
            if lists.shape[1] == 0 or self.ntotal == 0:
                return SearchHits(*_no_hits(n, k), np.zeros(n, dtype=np.int64))
            refine = self._refiner() if n == 1 and not len(plans[0].untrained) else None
            found = None if refine is None else self._refine_one(refine, x, k, short, plans[0], lists.shape[1])
            scores, ids = self._scan(x, k, short, lists, coarse) if found is None else found
        finally:
            if n == 1:
                faiss.omp_set_num_threads(threads)
        # one query's lists are all real; a batch's rows are padded with -1
        scanned = (
            self._sizes[lists].sum(axis=1) if n == 1 else np.where(lists >= 0, self._sizes[np.maximum(lists, 0)], 0).sum(axis=1)
        )
        return SearchHits(scores, ids, scanned)

    def _scan(self, x: np.ndarray, k: int, short: int, lists: np.ndarray, coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The general path: the given lists scanned for `short` rows each, re-ranked here: (scores, ids)."""
        n = len(x)
        scores, ids = _no_hits(n, k)
        rough = np.empty((n, short), dtype=np.float32)
        rows = np.empty((n, short), dtype=np.int64)
        self.ivf.search_preassigned_c(  # type: ignore[attr-defined]
            n, swig_ptr(x), short, swig_ptr(lists), swig_ptr(coarse), swig_ptr(rough), swig_ptr(rows), False,
            self._ivf_params(lists.shape[1]),
        )  # fmt: skip
        for i in range(n):
            found = rows[i][rows[i] >= 0]
            found = found[self.row_ids.data[found] >= 0]  # a dead row is never returned
            best, best_rows = self.vectors.best(found, x[i], k)
            scores[i, : len(best)], ids[i, : len(best)] = best, self.row_ids.data[best_rows]
        return scores, ids

    def _refiner(self) -> faiss.IndexRefine | None:
        """One query's path, all in C++: `IndexRefine` over the lists and the mapped file (None while rows live
        in RAM too: `_scan` then). It chooses the same lists as `_probe` (same quantizer, selector and nprobe),
        scans them and scores the shortlist by row number from the mapping: no Python between, no copy."""
        view = self.vectors.view_index()
        if view is None:
            return None
        cached = self._refine
        if cached is None or cached[0] is not view or cached[1] is not self.ivf:
            rows = view[1].ntotal
            view[1].ntotal = self.ivf.ntotal  # its constructor wants equal counts; deleted rows are gone from the lists
            try:
                refine = faiss.IndexRefine(self.ivf, view[1])
            finally:
                view[1].ntotal = rows
            cached = self._refine = (view, self.ivf, refine)  # the mapping lives as long as this refine
        return cached[2]

    def _refine_one(
        self, refine: faiss.IndexRefine, x: np.ndarray, k: int, short: int, plan: ProbePlan, width: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(1, k) scores and image ids of one query by `refine`; None if a dead row came back (`_scan` filters them)."""
        dist, rows = np.empty((1, k), np.float32), np.empty((1, k), np.int64)
        refine.search_c(1, swig_ptr(x), k, swig_ptr(dist), swig_ptr(rows), plan.refine_params(width, k, short))  # type: ignore[attr-defined]
        if rows.min() >= 0:  # the usual case: k found
            ids = self.row_ids.data[rows]
            return None if ids.min() < 0 else (dist, ids)
        found = rows[0] >= 0
        got = self.row_ids.data[rows[0][found]]
        if (got < 0).any():
            return None
        dist[0, ~found], rows[0, found], rows[0, ~found] = -np.inf, got, -1
        return dist, rows

    def _ivf_params(self, width: int) -> faiss.SearchParametersIVF:
        """nprobe per call (so concurrent searches with different C are safe); FAISS only reads them, so one
        object per width is shared instead of built per query."""
        params = self._params_by_width.get(width)
        if params is None:
            params = faiss.SearchParametersIVF()
            params.nprobe = width
            self._params_by_width[width] = params
        return params

    def _probe_all(
        self, x: np.ndarray, categories: np.ndarray | None, nprobe: int | None
    ) -> tuple[np.ndarray, np.ndarray, list[ProbePlan]]:
        """(n, width) list numbers (-1: FAISS skips) and their coarse scores, for `_probe` of each query; and
        each query's plan."""
        every = range(len(self.category_ids))
        chosen = [every] * len(x) if categories is None else np.asarray(categories)
        probe = [self._probe(x[i : i + 1], chosen[i], nprobe) for i in range(len(x))]
        plans = [plan for _, _, plan in probe]
        if len(probe) == 1:
            return probe[0][0][None, :], probe[0][1][None, :], plans
        width = max((len(p) for p, _, _ in probe), default=0)
        lists = np.full((len(x), width), -1, dtype=np.int64)
        coarse = np.zeros((len(x), width), dtype=np.float32)
        for i, (p, c, _) in enumerate(probe):
            lists[i, : len(p)], coarse[i, : len(p)] = p, c
        return lists, coarse, plans

    def _probe(
        self, query: np.ndarray, categories: Iterable[int], nprobe: int | None
    ) -> tuple[np.ndarray, np.ndarray, ProbePlan]:
        """`probe_lists`' choice for one query (1, d) with each list's coarse score (query . centroid), which by
        residual is part of every code's score: one FAISS call on the centroids, restricted to the categories'
        trained sub-lists by a bitmap selector built once per category set; untrained lists (zero centroid,
        score 0) are always scanned."""
        cats = np.asarray(categories, dtype=np.int64)
        plan = self._plan(np.sort(cats[cats >= 0]))
        fixed = plan.untrained if nprobe is None else plan.untrained[:nprobe]
        want = plan.trained if nprobe is None else max(0, min(plan.trained, nprobe - len(fixed)))
        if not want:
            return fixed, np.zeros(len(fixed), np.float32), plan
        scores, lists = np.empty(want, np.float32), np.empty(want, np.int64)
        self.ivf.quantizer.search_c(1, swig_ptr(query), want, swig_ptr(scores), swig_ptr(lists), plan.params)  # type: ignore[attr-defined]
        if not len(fixed):
            return lists, scores, plan
        return np.concatenate([lists, fixed]), np.concatenate([scores, np.zeros(len(fixed), np.float32)]), plan

    def _plan(self, cats: np.ndarray) -> ProbePlan:
        key = cats.tobytes()
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= PLANS_KEPT:  # many distinct category sets (a filter per request): start over
                self._plans.clear()
            plan = self._plans[key] = ProbePlan(self.offsets, self.trained_sizes, cats.tolist(), self.ivf.nlist)
        return plan

    # --- what status shows, and the cache file ----------------------------------------------

    def memory_bytes(self) -> int:
        """Packed codes, list ids, the row arrays, centroids, prototypes and the rows not yet in the file."""
        codes = int((-(-self._sizes.astype(np.int64) // BLOCK)).sum()) * self.packer.block_size  # numpy: /status reads it
        rows = self.row_ids.nbytes + self.row_list.nbytes + self.vectors.tail.nbytes
        return codes + 8 * self.ntotal + rows + (len(self.centroids) + len(self.category_ids)) * self.dim * 4

    def rerank_path(self, directory: Path) -> Path:
        return directory / f"{self.model.replace('/', '_')}.rerank"

    def write(self, sink: Callable[[bytes], object]) -> None:
        """The lists, then the row arrays, the re-rank file's token and the rows not in it; the file itself
        is published (renamed into place) first, under the index's store_dir."""
        directory = self.vectors.directory or self.store_dir
        if directory is None:
            raise ValueError("fastscan needs a directory for its re-rank file")
        self.vectors.publish(self.rerank_path(directory))
        faiss.write_index(self.ivf, faiss.PyCallbackIOWriter(sink))  # type: ignore[attr-defined]
        out = ByteSink(sink)
        token = np.frombuffer(self.vectors.token, dtype=np.uint8)
        counts = np.array([self.vectors.file_rows, self.row_ids.n], dtype=np.int64)
        for array in (token, counts, self.row_ids.view, self.row_list.view, self.vectors.tail.view):
            np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)

    @classmethod
    def read(cls, source: Callable[[int], bytes], description: IndexDescription, store_dir: Path | None = None) -> Self:
        """The inverse of `write`; ValueError when the lists, the arrays or the re-rank file do not fit."""
        description.check_lists()
        lists_per_category, dim = description.lists_per_category, description.dim
        # no store_dir: nothing to spool, the published file is opened below
        index = cls(description.model, dim, description.category_ids, description.layout, lists_per_category)
        try:
            ivf = faiss.read_index(faiss.PyCallbackIOReader(source))  # type: ignore[attr-defined]
        except RuntimeError as exc:
            raise ValueError(f"not a FAISS index: {exc}") from exc
        nlist, m = sum(lists_per_category), description.layout.pq_m
        if not isinstance(ivf, faiss.IndexIVFPQFastScan) or (ivf.d, ivf.nlist, ivf.pq.M, ivf.pq.nbits) != (dim, nlist, m, NBITS):
            raise ValueError("the FAISS index does not match its description")
        reader = ByteSource(source)
        try:
            token, counts, row_ids, row_list, tail = (np.lib.format.read_array(reader, allow_pickle=False) for _ in range(5))
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"the row arrays are damaged: {exc}") from exc
        file_rows, rows = (int(c) for c in counts)
        if len(row_ids) != rows or len(row_list) != rows or tail.shape != (rows - file_rows, dim):
            raise ValueError("the row arrays do not match each other")
        if int((row_ids >= 0).sum()) != ivf.ntotal:
            raise ValueError("the row arrays do not match the lists")
        if store_dir is None:
            raise ValueError("fastscan needs a directory for its re-rank file")
        index.ivf, index.packer, index.store_dir = ivf, ivf.get_CodePacker(), store_dir
        index.vectors = RerankFile.open(index.rerank_path(store_dir), dim, token.tobytes(), file_rows)
        index.vectors.tail.extend(tail)
        index.row_ids.extend(row_ids)
        index.row_list.extend(row_list)
        index._loaded(description.trained_sizes, description.codec_trained_on)
        return index


def _no_hits(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) meaning "nothing found" (-inf, -1), to be filled in."""
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
