"""FAISS `IndexIVF` plumbing for the two-stage index: making lists of a codec, reading them back, training
codecs and sub-list centroids, reserving and copying lists. No knowledge of categories or searches."""

from collections.abc import Callable
from typing import cast

import faiss
import numpy as np
from faiss import swig_ptr

from backend.core.index_options import pq_m
from backend.core.vectors import l2_normalise
from backend.index.layout import IndexLayout

SQ_TYPES = {"float16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}
NO_MAP, HASHTABLE = faiss.DirectMap.NoMap, faiss.DirectMap.Hashtable  # type: ignore[attr-defined]
KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234
PQ_CENTROIDS = 256  # 8-bit sub-quantizers


def new_ivf(codec: str, dim: int, nlist: int) -> faiss.IndexIVF:
    """Empty lists storing vectors with `codec`, never by residual: codes do not depend on their list."""
    quantizer = faiss.IndexFlatIP(dim)
    ivf: faiss.IndexIVF
    if codec == "float32":
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    elif codec in SQ_TYPES:
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, SQ_TYPES[codec], faiss.METRIC_INNER_PRODUCT, False)
    else:
        m = pq_m(codec)
        assert m is not None
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = False
    ivf.is_trained = True  # lists are assigned by us (per category); codecs are trained in train_codec
    return ivf


def read_ivf(source: Callable[[int], bytes], codec: str, dim: int, nlist: int, layout: IndexLayout) -> faiss.IndexIVF:
    """Lists written by `faiss.write_index`; ValueError unless they are `nlist` lists of `codec`."""
    try:
        ivf = faiss.read_index(faiss.PyCallbackIOReader(source))  # type: ignore[attr-defined]  # owns its quantizer
    except RuntimeError as exc:
        raise ValueError(f"not a FAISS index: {exc}") from exc
    expected = type(new_ivf(codec, dim, 1))
    if not isinstance(ivf, expected) or ivf.d != dim or ivf.nlist != nlist or ivf.code_size != layout.code_bytes(dim, codec):
        raise ValueError("the FAISS index does not match its description")
    return ivf


def train_codec(ivf: faiss.IndexIVF, layout: IndexLayout, sample: np.ndarray) -> int:
    """Train sq8 ranges / PQ codebooks on the sample. A catalogue too small to train on (PQ needs 256
    vectors) is padded with jittered copies; status reports it as stale and the next rebuild retrains."""
    if not layout.trains_codec:
        return 0
    x = np.ascontiguousarray(sample[: layout.codec_train_points], dtype=np.float32)
    real = len(x)
    need = PQ_CENTROIDS if layout.pq_m else 2
    if len(x) < need:
        rng = np.random.default_rng(KMEANS_SEED)
        base = x if len(x) else l2_normalise(rng.standard_normal((1, ivf.d), dtype=np.float32))
        jitter = base[rng.integers(0, len(base), need)] + 0.01 * rng.standard_normal((need, ivf.d), dtype=np.float32)
        x = np.concatenate([x, l2_normalise(jitter)])
    if layout.pq_m:
        cast(faiss.IndexIVFPQ, ivf).pq.cp.min_points_per_centroid = 1  # small catalogues train anyway, quietly
    ivf.train_encoder(len(x), swig_ptr(x), None)
    return real


def copy_codec(source: faiss.IndexIVF, target: faiss.IndexIVF, layout: IndexLayout) -> None:
    if layout.codec in SQ_TYPES:
        cast(faiss.IndexIVFScalarQuantizer, target).sq = cast(faiss.IndexIVFScalarQuantizer, source).sq
    elif layout.pq_m:
        cast(faiss.IndexIVFPQ, target).pq = cast(faiss.IndexIVFPQ, source).pq


def sub_list_centroids(x: np.ndarray, k: int) -> np.ndarray:
    """`k` unit centroids of one category's sample `x`: its mean for one, else spherical k-means."""
    if k == 1:
        return l2_normalise(x.mean(axis=0, keepdims=True))
    km = faiss.Kmeans(  # few points a centroid is expected here (small categories): no FAISS warning
        x.shape[1],
        k,
        niter=KMEANS_ITERATIONS,
        seed=KMEANS_SEED,
        spherical=True,
        max_points_per_centroid=256,
        min_points_per_centroid=1,
    )
    km.train(np.ascontiguousarray(x[: k * 256]))
    return np.asarray(km.centroids)


def reserve(ivf: faiss.IndexIVF, per_list: np.ndarray) -> None:
    """Give list i room for `per_list[i]` entries (+10 %), so lists filled chunk by chunk never reallocate,
    which would hold up to twice their memory. Lists that are not plain arrays are left alone."""
    invlists = faiss.downcast_InvertedLists(ivf.invlists) if ivf.invlists is not None else None
    if not isinstance(invlists, faiss.ArrayInvertedLists):
        return
    for list_no, expected in enumerate(per_list):
        if expected >= 1:
            invlists.resize(list_no, int(expected * 1.1) + 8)  # grows the capacity ...
            invlists.resize(list_no, 0)  # ... which shrinking the size keeps


def copy_lists(source: faiss.IndexIVF, target: faiss.IndexIVF, moves: list[tuple[int, int]], hashed: bool) -> None:
    """Copy the entries of list `old` of `source` into list `new` of `target` for each (old, new) move, as
    stored (no re-encoding); `hashed`: the target keeps a hash-table direct map, rebuilt after the copy."""
    if hashed:
        target.set_direct_map_type(NO_MAP)  # entries go in below, around the map
    old_lists, new_lists = source.invlists, target.invlists
    assert old_lists is not None and new_lists is not None
    for old_list, new_list in moves:
        size = source.get_list_size(old_list)
        if size:
            new_lists.add_entries(new_list, size, old_lists.get_ids(old_list), old_lists.get_codes(old_list))
    target.ntotal = source.ntotal
    if hashed:
        target.set_direct_map_type(HASHTABLE)  # rebuilt from the lists


def rerank_exactly(store: faiss.IndexIVF, x: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's shortlist `ids[i]`, re-scored from the re-ranking copy `store` (looked up by id)."""
    out_scores = np.full((len(x), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(x), k), -1, dtype=np.int64)
    for i in range(len(x)):
        found = ids[i][ids[i] >= 0]
        if not len(found):
            continue
        exact = store.reconstruct_batch(found) @ x[i]
        best = np.argsort(-exact, kind="stable")[:k]
        out_scores[i, : len(best)], out_ids[i, : len(best)] = exact[best], found[best]
    return out_scores, out_ids
