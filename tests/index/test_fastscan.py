"""fastscan (4-bit PQ sub-lists re-ranked from a float16 file) and auto, on the real CIFAR-10 catalogue
embedded with the real Lite0 weights, through the index, the cache and the service."""

import os
import shutil
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest
from sqlalchemy import Engine

from backend.core.search_params import SearchParams
from backend.core.vectors import StoredVectors
from backend.imaging import decode_image
from backend.index import rerank_file
from backend.index.fastscan import FastScanIndex
from backend.index.layout import IndexLayout
from backend.index.sampling import train_sample
from backend.index.two_stage import TwoStageIndex
from backend.search import build
from backend.services.assembly import Services
from backend.services.search import SearchService
from backend.sources.datasets import Dataset
from backend.storage import vector_reader
from backend.storage.engine import session_scope
from tests.utils.catalogue import fill
from tests.utils.server import running_server
from tests.utils.settings import make_settings

SPEC = IndexLayout("fastscan", "pq320", 6)  # 10 sub-lists a category of 60, 160 bytes a vector
# Measured here (recall@10 vs exact search inside the same top-3 categories, 100 queries, shortlist 50):
# nprobe 8 of 30: 0.905 (69 vectors scanned); nprobe 16: 0.994 (123); every list: 1.000 (180).
RECALL = [(8, 0.85), (16, 0.95), (10_000, 0.99)]


def exact_top3(stored, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vectors, prototypes = stored.vectors, stored.prototypes
    cats = sorted(set(vectors.category_ids.tolist()))
    exact = TwoStageIndex.build("m", vectors.vectors.shape[1], cats, vectors, prototypes)
    _, top = exact.rank_categories(queries, 3)
    return top, exact.search(queries, 10, top).ids


@pytest.mark.parametrize(("nprobe", "floor"), RECALL)
def test_recall_on_real_vectors_and_only_top_categories(stored, query_vectors, nprobe: int, floor: float) -> None:
    vectors, prototypes = stored.vectors, stored.prototypes
    queries = query_vectors[0]
    cats = sorted(set(vectors.category_ids.tolist()))
    index = FastScanIndex.build("m", vectors.vectors.shape[1], cats, vectors, prototypes, SPEC)
    assert isinstance(index, FastScanIndex) and index.ntotal == len(vectors)
    top, truth = exact_top3(stored, queries)
    hits = index.search(queries, 10, top, nprobe, shortlist=50)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hits.ids, truth, strict=True)])
    print(f"\nfastscan pq320x4 nprobe {nprobe}: recall@10 {recall:.3f}, scanned {hits.scanned.mean():.0f}")
    assert recall >= floor
    allowed = [set(np.array(cats)[row].tolist()) for row in top]
    category_of = dict(zip(vectors.ids.tolist(), vectors.category_ids.tolist(), strict=True))
    assert all(category_of[i] in allowed[r] for r, row in enumerate(hits.ids) for i in row if i >= 0)
    # The re-ranked scores are the exact cosine similarities (float16 rows), best first.
    by_id = dict(zip(vectors.ids.tolist(), vectors.vectors, strict=True))
    for q, row, scores in zip(queries, hits.ids, hits.scores, strict=True):
        np.testing.assert_allclose(scores, [by_id[i] @ q for i in row], atol=2e-3)
        assert (np.diff(scores) <= 0).all()


def test_one_query_in_cpp_equals_the_batch_path(stored, query_vectors, tmp_path: Path) -> None:
    """One query whose rows are all in the mapped file is one IndexRefine call (on one OpenMP thread); it
    returns what the batch path (scan, then re-rank in Python) returns: after deletions, with rows added since
    the build (then it is the batch path itself), and with a dead row left in a list (the guard)."""
    vectors, prototypes = stored.vectors, stored.prototypes
    cats = sorted(set(vectors.category_ids.tolist()))
    index = FastScanIndex.build("m", vectors.vectors.shape[1], cats, vectors, prototypes, SPEC, tmp_path)
    queries = query_vectors[0]
    _, top = index.rank_categories(queries, 3)
    threads = faiss.omp_get_max_threads()

    def same(nprobe: int | None) -> np.ndarray:
        batch = index.search(queries, 10, top, nprobe, 50)
        for i in range(len(queries)):
            one = index.search(queries[i : i + 1], 10, top[i : i + 1], nprobe, 50)
            np.testing.assert_array_equal(one.ids[0], batch.ids[i])
            np.testing.assert_allclose(one.scores[0], batch.scores[i], rtol=1e-6)
            assert one.scanned[0] == batch.scanned[i]
        assert faiss.omp_get_max_threads() == threads
        return batch.ids

    same(8)
    same(None)
    assert index._refine is not None  # the C++ path was taken
    gone = same(8)[0, :3]
    index.remove(gone)
    assert not np.isin(same(8), gone).any()
    refine = index._refine
    best = same(8)[0, 0]
    index.row_ids.data[np.flatnonzero(index.row_ids.view == best)] = -1  # dead but still in its list
    assert best not in same(8)[0] and index._refine is refine
    same(8)  # rows appended to the spool before it is published: mapped again, a new view
    index.vectors.publish(index.rerank_path(tmp_path))  # as a saved index: later rows live in RAM
    back = np.isin(vectors.ids, gone)
    index.add(vectors.ids[back] + 10**6, vectors.category_ids[back], vectors.vectors[back])  # into RAM
    assert index.vectors.view_index() is None and np.isin(same(8), vectors.ids[back] + 10**6).any()


@pytest.mark.skipif(not rerank_file._PREFETCH, reason="no posix_fadvise / preadv here: the mapping is always used")
def test_a_rerank_file_larger_than_memory_is_read_directly_with_the_same_results(
    stored, query_vectors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-rank file too large for the page cache (here any file: COLD_SHARE 0) is read by announced
    `preadv`s instead of page faults: the same hits, the same scores, also once rows live in RAM beside it;
    a file cut short under it is an error, not a crash through the mapping."""
    vectors, prototypes = stored.vectors, stored.prototypes
    cats = sorted(set(vectors.category_ids.tolist()))
    index = FastScanIndex.build("m", vectors.vectors.shape[1], cats, vectors, prototypes, SPEC, tmp_path)
    queries = query_vectors[0]
    _, top = index.rank_categories(queries, 3)
    warm = [index.search(queries[i : i + 1], 10, top[i : i + 1], 8, 50) for i in range(len(queries))]
    assert not index.vectors.cold and index.vectors.view_index() is not None  # the C++ path, over the mapping
    monkeypatch.setattr(rerank_file, "COLD_SHARE", 0.0)
    assert index.vectors.cold and index.vectors.view_index() is None
    for i, hits in enumerate(warm):
        cold = index.search(queries[i : i + 1], 10, top[i : i + 1], 8, 50)
        np.testing.assert_array_equal(cold.ids, hits.ids)
        np.testing.assert_allclose(cold.scores, hits.scores, rtol=1e-6)
    rows = np.array([0, 7, index.vectors.file_rows - 1])
    np.testing.assert_array_equal(index.vectors.get(rows), index.vectors._mapped()[rows])
    index.vectors.publish(index.rerank_path(tmp_path))  # as a saved index that then follows writes: rows in RAM
    index.add(vectors.ids[:3] + 10**6, vectors.category_ids[:3], vectors.vectors[:3])
    mixed = np.array([0, index.vectors.file_rows - 1, index.vectors.file_rows + 2])
    got = index.vectors.get(mixed)
    np.testing.assert_array_equal(got[:2], index.vectors._mapped()[mixed[:2]])
    np.testing.assert_array_equal(got[2], vectors.vectors[2].astype(np.float16))
    assert index.vectors.path is not None
    os.truncate(index.vectors.path, rerank_file.HEADER_BYTES + 3 * index.vectors.row_bytes)
    with pytest.raises(ValueError, match="truncated"):
        index.vectors.get(np.array([5, index.vectors.file_rows]))


@pytest.mark.skipif(not hasattr(os, "sysconf"), reason="no sysconf here")
def test_a_containers_memory_limit_counts_as_the_memory_a_rerank_file_is_judged_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(rerank_file, "CGROUP_LIMIT", limit)
    assert rerank_file.usable_memory() == physical  # no cgroup file: the machine's memory
    limit.write_text("max\n")
    assert rerank_file.usable_memory() == physical
    limit.write_text(f"{2**30}\n")
    assert rerank_file.usable_memory() == min(physical, 2**30)


def list_contents(index: FastScanIndex) -> list[dict[int, bytes]]:
    """Each list as {image id: its unpacked code}: what the lists hold, whatever the row numbering."""
    out = []
    for list_no in range(index.ivf.nlist):
        rows, packed = index._entries(list_no)
        codes = index._unpack(packed, len(rows))
        out.append({int(index.row_ids.view[r]): c.tobytes() for r, c in zip(rows, codes, strict=True)})
    return out


def test_incremental_adds_and_deletes_equal_a_rebuild(stored, query_vectors) -> None:
    vectors, prototypes = stored.vectors, stored.prototypes
    dim, cats = vectors.vectors.shape[1], sorted(set(vectors.category_ids.tolist()))
    sizes = {c: int((vectors.category_ids == c).sum()) for c in cats}
    pick = train_sample(vectors.ids, SPEC.train_fraction(sizes))
    sample = StoredVectors(vectors.ids[pick], vectors.category_ids[pick], vectors.vectors[pick])

    def trained() -> FastScanIndex:
        index = FastScanIndex.train("m", dim, cats, SPEC, sizes, sample)
        index.set_prototypes(prototypes)
        assert isinstance(index, FastScanIndex)
        return index

    gone = vectors.ids[::7]  # deleted after the adds
    keep = ~np.isin(vectors.ids, gone)
    rebuilt = trained()
    rebuilt.add(vectors.ids[keep], vectors.category_ids[keep], vectors.vectors[keep])
    # Added in uneven chunks (lists reach multiples of 32 entries and grow past them), then deleted.
    followed = trained()
    for start, stop in ((0, 1), (1, 40), (40, 41), (41, 333), (333, 600)):
        followed.add(vectors.ids[start:stop], vectors.category_ids[start:stop], vectors.vectors[start:stop])
    assert followed.remove(gone) == len(gone) and followed.remove(gone) == 0
    assert followed.ntotal == rebuilt.ntotal == keep.sum()
    assert list_contents(followed) == list_contents(rebuilt)
    queries = query_vectors[0]
    _, top = rebuilt.rank_categories(queries, 3)
    a, b = followed.search(queries, 10, top, 8, 50), rebuilt.search(queries, 10, top, 8, 50)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores)
    assert not np.isin(a.ids, gone).any()
    # A new category (a memory copy of the lists) keeps every entry where it was.
    grown = followed.with_categories([max(cats) + 1])
    assert isinstance(grown, FastScanIndex)
    assert [c for c in list_contents(grown) if c] == [c for c in list_contents(followed) if c]
    np.testing.assert_array_equal(grown.search(queries, 10, None, None, 50).ids, followed.search(queries, 10, None, None, 50).ids)


@pytest.fixture
def fastscan(engine: Engine, embedder, cifar_train: Dataset, tmp_path: Path) -> SearchService:
    fill(engine, embedder, cifar_train.samples, 200)
    svc = SearchService(make_settings(tmp_path, engine, faiss_index_type="fastscan", faiss_list_size=8), engine, embedder)
    svc.cache.get()
    return svc


def again(service: SearchService) -> SearchService:
    """Another process's view: same database and DATA_DIR, nothing in memory."""
    fresh = SearchService(service.settings, service.engine, service.embedder)
    fresh.cache.get()
    return fresh


def test_service_follows_writes_and_never_returns_a_deleted_image(fastscan: SearchService, cifar_queries) -> None:
    status = Services.around(fastscan).lifecycle.status().index
    assert (status.type, status.codec, status.rerank) == ("fastscan", "pq320x4", "float16 file")
    assert status.why == "FAISS_INDEX_TYPE=fastscan" and status.vectors == 200 and status.lists > 10
    image = decode_image(cifar_queries.samples[0].load(), 10**7)
    added = fastscan.upload(image, "cat")
    params = SearchParams(limit=5, top_categories=3, use_prototypes=True, nprobe=4)
    (hit,) = fastscan.search([image.rgb], params)
    assert hit.results[0].image_id == added.image_id and hit.results[0].score > 0.99
    assert hit.vectors_scanned < hit.vectors_total / 2
    Services.around(fastscan).writes.delete(added.image_id)
    (hit,) = fastscan.search([image.rgb], params)
    assert added.image_id not in [r.image_id for r in hit.results] and len(hit.results) == 5
    # The saved file (built before the upload) is loaded by another process and brought up to date.
    other = again(fastscan)
    assert other.cache.origin.startswith("loaded from cache")
    (hit,) = other.search([image.rgb], params)
    assert added.image_id not in [r.image_id for r in hit.results]


def test_a_server_loads_the_saved_fastscan_index_and_searches_it(fastscan: SearchService, cifar_queries, tmp_path: Path) -> None:
    shutil.copytree(fastscan.embedder.onnx_dir, tmp_path / "cache" / "onnx")
    env = {
        **os.environ,
        "DATABASE_URL": fastscan.engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(tmp_path),
        "FAISS_INDEX_TYPE": "fastscan",
        "FAISS_LIST_SIZE": "8",
    }
    query = cifar_queries.samples[0].load()
    with running_server(env) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        body = http.post("/search?limit=5&top_categories=2&nprobe=4", files={"file": ("q.png", query)}).json()
        assert len(body["results"]) == 5 and body["vectors_scanned"] < body["vectors_total"] == 200
        status = http.get("/status").json()["index"]  # what the page shows
        assert (status["type"], status["why"], status["rerank"]) == ("fastscan", "FAISS_INDEX_TYPE=fastscan", "float16 file")
        assert status["origin"].startswith("loaded from cache")
        assert 'id="status"' in http.get("/", follow_redirects=True).text


def spoil_missing(path: Path, _: Path) -> None:
    path.unlink()


def spoil_truncated(path: Path, _: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


def spoil_foreign(path: Path, other: Path) -> None:
    shutil.copy(other, path)  # the same catalogue's rows, from another build


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [(spoil_missing, "is missing"), (spoil_truncated, "truncated or damaged"), (spoil_foreign, "belongs to another build")],
)
def test_a_bad_rerank_file_is_rejected_and_rebuilt(fastscan: SearchService, tmp_path: Path, spoil, reason: str) -> None:
    path = fastscan.settings.index_dir / f"{fastscan.model.replace('/', '_')}.rerank"
    assert path.exists()
    (exact,) = fastscan.search_vectors(vector_probe(fastscan), SearchParams(limit=10, top_categories=3, use_prototypes=True))
    foreign = tmp_path / "foreign.rerank"
    shutil.copy(path, foreign)
    fastscan.cache.rebuild("a second build")  # a new token: the copy above is now another build's file
    spoil(path, foreign)
    other = again(fastscan)
    assert other.cache.origin.startswith("rebuilt from database") and reason in other.cache.origin, other.cache.origin
    (hit,) = other.search_vectors(vector_probe(fastscan), SearchParams(limit=10, top_categories=3, use_prototypes=True))
    assert [r.image_id for r in hit.results] == [r.image_id for r in exact.results]
    assert again(fastscan).cache.origin.startswith("loaded from cache")  # the rebuild wrote a good pair


def vector_probe(service: SearchService) -> np.ndarray:
    with session_scope(service.engine) as session:
        first = vector_reader.load_vectors(session, service.model).vectors[:1]
    return first


def test_streamed_build_spools_the_rerank_file_and_equals_the_in_memory_one(fastscan: SearchService, query_vectors) -> None:
    layout, engine, model, dim = fastscan.cache.layout, fastscan.engine, fastscan.model, fastscan.embedder.dim
    store_dir = fastscan.cache.directory
    in_memory = build.build_from_database(engine, model, dim, layout).index
    old_chunk, build.CHUNK_ROWS = build.CHUNK_ROWS, 37
    try:
        streamed = build.build_from_database(engine, model, dim, layout, in_memory_bytes=0, store_dir=store_dir).index
    finally:
        build.CHUNK_ROWS = old_chunk
    assert isinstance(streamed, FastScanIndex) and isinstance(in_memory, FastScanIndex)
    assert streamed.vectors.file_rows == 200 and in_memory.vectors.file_rows == 0  # spooled to disk, held in RAM
    queries = query_vectors[0][:20]
    _, cats = in_memory.rank_categories(queries, 3)
    a, b = streamed.search(queries, 10, cats, 4, 50), in_memory.search(queries, 10, cats, 4, 50)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores)


def test_auto_is_flat_below_its_threshold_and_fastscan_from_it(
    engine: Engine, embedder, cifar_train: Dataset, tmp_path: Path
) -> None:
    fill(engine, embedder, cifar_train.samples, 100)
    below = SearchService(make_settings(tmp_path, engine, faiss_auto_threshold=101, faiss_list_size=8), engine, embedder)
    below.cache.get()
    status = Services.around(below).lifecycle.status().index
    assert (status.type, status.why) == ("flat", "auto: 100 vectors < FAISS_AUTO_THRESHOLD=101")
    at = SearchService(make_settings(tmp_path, engine, faiss_auto_threshold=100, faiss_list_size=8), engine, embedder)
    at.cache.get()
    assert "cache not used" in at.cache.origin  # the flat file is not what auto wants at this threshold
    status = Services.around(at).lifecycle.status().index
    assert (status.type, status.why) == ("fastscan", "auto: 100 vectors >= FAISS_AUTO_THRESHOLD=100")
    assert again(at).cache.origin.startswith("loaded from cache")
    # One more image past the threshold of the flat index: it follows, and says what a rebuild would do.
    below.upload(decode_image(cifar_train.samples[-1].load(), 10**7), "cat")
    why = Services.around(below).lifecycle.status().index.why
    assert why.endswith("flat when last built, the next build-index makes it fastscan")
