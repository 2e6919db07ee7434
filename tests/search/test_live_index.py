"""The index cache against a real PostgreSQL with the real model: racing writers and rebuilds, cache files
that must not be believed, concurrent saves, and following other processes' writes incrementally."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import Engine, func, select

from backend.core.config import PROJECT_ROOT
from backend.core.search_params import SearchParams
from backend.imaging import decode_image
from backend.search.index_file import MAGIC
from backend.search.live_index import LiveIndex, prune_change_log
from backend.services.assembly import Services
from backend.services.search import SearchService
from backend.sources.datasets import Dataset
from backend.storage import catalogue
from backend.storage.engine import session_scope
from backend.storage.schema import Embedding
from tests.utils.catalogue import fill
from tests.utils.server import running_server
from tests.utils.settings import CIFAR_SUBSET, make_settings

EXACT_TOP1 = SearchParams(limit=1, top_categories=1, use_prototypes=False)
EXACT_50 = SearchParams(limit=50, top_categories=1, use_prototypes=False)


def vector_of(engine: Engine, model: str, image_id: int) -> np.ndarray:
    with session_scope(engine) as s:
        v = catalogue.image_vector(s, image_id, model)
    assert v is not None
    return v[None, :]


def stored_count(engine: Engine, model: str) -> int:
    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(Embedding).where(Embedding.model == model)) or 0


@pytest.fixture
def service(engine: Engine, embedder, cifar_train: Dataset, tmp_path: Path) -> SearchService:
    fill(engine, embedder, cifar_train.samples, 200)
    svc = SearchService(make_settings(tmp_path, engine), engine, embedder)
    svc.cache.get()
    return svc


def fresh(service: SearchService) -> SearchService:
    """Another process's view: same database and DATA_DIR, nothing in memory."""
    return SearchService(service.settings, service.engine, service.embedder)


# --- never lose an acknowledged write ----------------------------------------------------------------


def test_acknowledged_writes_survive_racing_rebuilds_and_refreshes(service: SearchService, engine: Engine, cifar_queries) -> None:
    stop = threading.Event()
    failures: list[BaseException] = []
    rounds = {"rebuild": 0, "refresh": 0}

    def loop(name: str, step) -> None:  # type: ignore[no-untyped-def]
        try:
            while not stop.is_set():
                step()
                rounds[name] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=loop, args=("rebuild", lambda: service.cache.rebuild("test race"))),
        threading.Thread(target=loop, args=("refresh", service.cache.refresh)),
    ]
    for t in threads:
        t.start()
    uploaded, deleted = [], []
    try:
        for i, sample in enumerate(cifar_queries.samples[:40]):
            result = service.upload(decode_image(sample.load(), 10**7), sample.label)
            assert not result.duplicate
            vec = vector_of(engine, service.model, result.image_id)
            # Acknowledged: it is its own nearest neighbour from this moment on.
            assert service.search_vectors(vec, EXACT_TOP1)[0].results[0].image_id == result.image_id
            uploaded.append((result.image_id, vec))
            if i % 4 == 3:  # and an acknowledged delete is never returned again
                victim, victim_vec = uploaded.pop(0)
                Services.around(service).writes.delete(victim)
                deleted.append((victim, victim_vec))
            for gone, gone_vec in deleted:
                assert gone not in [h.image_id for h in service.search_vectors(gone_vec, EXACT_50)[0].results]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures
    assert rounds["rebuild"] >= 3 and rounds["refresh"] >= 3, rounds  # the race really ran
    for image_id, vec in uploaded:
        assert service.search_vectors(vec, EXACT_TOP1)[0].results[0].image_id == image_id
    assert service.cache.loaded is not None and service.cache.loaded.ntotal == stored_count(engine, service.model)
    assert service.cache.is_current()


# --- verify before believing ---------------------------------------------------------------------


def test_a_foreign_databases_cache_is_not_believed(
    service: SearchService, databases, embedder, cifar_train: Dataset, tmp_path: Path
) -> None:
    service.cache.save()
    other = databases.new()  # a different catalogue whose images get the same ids
    fill(other, embedder, cifar_train.samples, 200, reverse=True)
    there = SearchService(make_settings(tmp_path, other), other, embedder)  # same DATA_DIR, same file name
    index = there.cache.get()
    assert "catalogue_id" in there.cache.origin and there.cache.origin.startswith("rebuilt")
    with session_scope(other) as s:
        some_id = s.scalar(select(Embedding.image_id).order_by(Embedding.image_id.desc()).limit(1))
    assert there.search_vectors(vector_of(other, there.model, some_id), EXACT_TOP1)[0].results[0].image_id == some_id
    assert index.ntotal == 200
    other.dispose()


def test_changed_bytes_in_the_middle_are_detected(service: SearchService, caplog) -> None:
    service.cache.save()
    path = service.cache.path
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(16)  # zeros over part of the vectors: still a loadable FAISS index
    path.write_bytes(bytes(raw))
    again = fresh(service)
    with caplog.at_level("WARNING"):
        again.cache.get()
    assert "checksum mismatch" in again.cache.origin
    assert sum("not used" in r.message for r in caplog.records) == 1  # one log line saying why
    assert again.cache.loaded is not None and again.cache.loaded.ntotal == 200


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "truncated"),
        (b"garbage" * 100, "not an index cache"),
        (b"x" + json.dumps({"format": 2, "model": 5}).encode(), "wrong shape"),
        (b"x" + json.dumps([1, 2, 3]).encode(), "wrong shape"),
    ],
)
def test_unreadable_or_wrong_shape_cache_is_rebuilt(service: SearchService, content: bytes, reason: str) -> None:
    if content.startswith(b"x"):  # a well-framed file whose header is valid JSON of the wrong shape
        header = content[1:]
        content = b"payload" + header + len(header).to_bytes(8, "little") + MAGIC
    service.settings.index_dir.mkdir(parents=True, exist_ok=True)
    service.cache.path.write_bytes(content)
    again = fresh(service)
    assert again.cache.get().ntotal == 200
    assert reason in again.cache.origin


def test_cli_status_survives_a_wrong_shape_cache(service: SearchService, engine: Engine, tmp_path: Path) -> None:
    header = json.dumps({"format": 2, "catalogue_id": None}).encode()
    service.cache.path.write_bytes(header + len(header).to_bytes(8, "little") + MAGIC)
    env = {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(tmp_path),
        "INDEX_REFRESH_SECONDS": "0",
    }
    out = subprocess.run(
        [sys.executable, "-m", "backend.cli", "status", "--json"],
        check=False,
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    index = json.loads(out.stdout)["index"]
    assert index["vectors"] == 200 and index["current"] and "wrong shape" in index["origin"]


def test_concurrent_saves_leave_one_valid_file(service: SearchService) -> None:
    others = [fresh(service) for _ in range(3)]
    for other in others:
        other.cache.get()
    caches = [service.cache, *(o.cache for o in others)] * 3
    with ThreadPoolExecutor(len(caches)) as pool:
        list(pool.map(lambda c: c.save(), caches))
    leftovers = [p.name for p in service.settings.index_dir.iterdir() if p != service.cache.path]
    assert leftovers == []
    again = fresh(service)
    assert again.cache.get().ntotal == 200 and again.cache.origin.startswith("loaded from cache")


def test_a_cache_older_than_the_pruned_deletion_log_is_rebuilt(service: SearchService, engine: Engine) -> None:
    service.cache.save()
    with session_scope(engine) as s:
        victim = s.scalar(select(Embedding.image_id).limit(1))
        catalogue.delete_image(s, victim)
    assert prune_change_log(engine, keep_days=-1) == 1  # every deletion logged so far is forgotten
    again = fresh(service)
    assert again.cache.get().ntotal == 199
    assert "pruned" in again.cache.origin and again.cache.origin.startswith("rebuilt")


# --- following other processes' writes ------------------------------------------------------------


def test_a_saved_cache_is_loaded_and_brought_up_to_date(service: SearchService, engine: Engine, embedder, cifar_queries) -> None:
    service.cache.save()
    fill(engine, embedder, cifar_queries.samples[:7], 7)
    with session_scope(engine) as s:
        catalogue.delete_image(s, s.scalar(select(Embedding.image_id).order_by(Embedding.image_id).limit(1)))
    again = fresh(service)
    index = again.cache.get()
    assert again.cache.origin.startswith("loaded from cache") and "7 added / 1 removed" in again.cache.origin
    assert index.ntotal == 206 and again.cache.is_current()


def run_python(code: str, engine: Engine, data_dir: Path) -> None:
    """Run `code` in a separate Python process against the same database."""
    env = {**os.environ, "DATABASE_URL": engine.url.render_as_string(hide_password=False), "DATA_DIR": str(data_dir)}
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]


ANOTHER_WRITER = """
import dataclasses
from sqlalchemy import select
from backend.storage import catalogue
from backend.sources.datasets import Dataset, load_dataset
from backend.storage.schema import Embedding
from backend.storage.engine import get_engine, session_scope
from backend.embedding.cache import model_cache
from backend.core.config import get_settings
from backend.ingest.populate import ingest
settings = get_settings()
engine = get_engine()
with session_scope(engine) as s:  # delete the three oldest images
    for image_id in s.scalars(select(Embedding.image_id).order_by(Embedding.image_id).limit(3)).all():
        catalogue.delete_image(s, image_id)
data = load_dataset("cifar10", None, "test", 30, settings)
samples = [s for s in data.samples if s.label in ("cat", "ship")][:6]
samples[:2] = [dataclasses.replace(s, label="brand-new-category") for s in samples[:2]]  # never seen by the server
ingest(Dataset("x", samples), model_cache.get(settings), engine, 10**7, progress=False)
"""


def test_another_processs_adds_and_deletes_are_followed_incrementally(
    service: SearchService, engine: Engine, tmp_path: Path
) -> None:
    with session_scope(engine) as s:
        oldest = s.scalars(select(Embedding.image_id).order_by(Embedding.image_id).limit(3)).all()
        vectors = {i: vector_of(engine, service.model, i) for i in oldest}
    full_before = service.cache.refreshes["full"]
    shutil.copytree(service.embedder.onnx_dir, tmp_path / "other" / "cache" / "onnx")  # no second export
    run_python(f"import os; os.environ['CIFAR10_DIR'] = {str(CIFAR_SUBSET)!r}\n" + ANOTHER_WRITER, engine, tmp_path / "other")
    report = service.cache.refresh()
    assert (report.kind, report.added, report.removed) == ("incremental", 6, 3)
    assert service.cache.refreshes["full"] == full_before  # no full rebuild ran
    assert service.cache.is_current()
    index = service.cache.loaded
    assert index is not None and index.ntotal == 203 == stored_count(engine, service.model)
    for gone, vec in vectors.items():
        assert gone not in [h.image_id for h in service.search_vectors(vec, EXACT_50)[0].results]
    with session_scope(engine) as s:
        newest = s.scalars(select(Embedding.image_id).order_by(Embedding.image_id.desc()).limit(6)).all()
    for image_id in newest:  # the new category is searchable in stage 2 too
        result = service.search_vectors(
            vector_of(engine, service.model, image_id), SearchParams(limit=1, top_categories=3, use_prototypes=True)
        )[0]
        assert result.results[0].image_id == image_id
    assert "brand-new-category" in {c.category for c in result.categories}


def test_a_running_server_follows_another_process_without_a_full_rebuild(
    engine: Engine, embedder, cifar_train: Dataset, cifar_queries, tmp_path: Path
) -> None:
    fill(engine, embedder, cifar_train.samples, 100)
    shutil.copytree(embedder.onnx_dir, tmp_path / "cache" / "onnx")
    env = {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(tmp_path),
        "CIFAR10_DIR": str(CIFAR_SUBSET),
        "INDEX_REFRESH_SECONDS": "0.3",
    }
    with running_server(env) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        start = http.get("/status").json()["index"]
        assert start["vectors"] == 100
        victim = http.get("/categories").json()[0]["id"]
        first = http.get(f"/categories/{victim}/images?limit=1").json()["items"][0]
        victim_bytes = http.get(first["url"]).content
        run_python(
            f"from backend.storage import catalogue\nfrom backend.storage.engine import session_scope, get_engine\n"
            f"with session_scope(get_engine()) as s: catalogue.delete_image(s, {first['id']})",
            engine,
            tmp_path,
        )
        out = subprocess.run(
            [sys.executable, "-m", "backend.cli", "populate", "--split", "test", "--num-images", "20", "--quiet"],
            check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 20
        while (index := http.get("/status").json()["index"])["vectors"] != 119 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert index["vectors"] == 119 and index["current"]
        assert index["refreshes"]["full"] == start["refreshes"]["full"] and index["refreshes"]["incremental"] >= 1
        assert index["last_refresh"]["kind"] == "incremental"
        hits = http.post("/search?limit=50&use_prototypes=false", files={"file": ("q.png", victim_bytes)}).json()["results"]
        assert first["id"] not in [h["image_id"] for h in hits]
        newest = cifar_queries.samples[0]  # among the 20 the CLI added: found as its own top-1
        top = http.post("/search?limit=1&use_prototypes=false", files={"file": ("q.png", newest.load())}).json()["results"][0]
        assert top["score"] > 0.9999


def test_index_cache_has_no_index_before_first_use(engine: Engine, tmp_path: Path) -> None:
    cache = LiveIndex(engine, "m/none/0px", 8, tmp_path)
    assert cache.loaded is None and not cache.is_current() and cache.memory_bytes() == 0


# --- index types and codecs (issue 10) ------------------------------------------------------------


def test_a_streamed_rebuild_equals_an_in_memory_one(service: SearchService, engine: Engine, cifar_queries) -> None:
    """Two streamed passes (a training sample, then every vector in chunks, never all in memory) give the
    same index as one in-memory pass, for a codec and sub-lists that both train on the sample."""
    from backend.index.layout import IndexLayout
    from backend.search import build

    layout = IndexLayout("ivf", "sq8", list_size=8)
    model, dim = service.model, service.embedder.dim
    in_memory = build.build_from_database(engine, model, dim, layout).index
    old_chunk, build.CHUNK_ROWS = build.CHUNK_ROWS, 37  # many chunks, the last one partial
    try:
        streamed = build.build_from_database(engine, model, dim, layout, in_memory_bytes=0).index
    finally:
        build.CHUNK_ROWS = old_chunk
    assert streamed.describe() == in_memory.describe() and streamed.ntotal == 200
    np.testing.assert_array_equal(streamed._read_sizes(), in_memory._read_sizes())
    np.testing.assert_array_equal(streamed.centroids, in_memory.centroids)
    queries = service.embed([decode_image(s.load(), 10**7).rgb for s in cifar_queries.samples[:20]])
    _, cats = in_memory.rank_categories(queries, 3)
    a, b = streamed.search(queries, 10, cats, 4), in_memory.search(queries, 10, cats, 4)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores)


def test_ivf_sq8_server_index_follows_writes_and_a_changed_setting_rebuilds(
    service: SearchService, engine: Engine, embedder, cifar_queries, tmp_path: Path, caplog
) -> None:
    settings = service.settings.model_copy(update={"faiss_index_type": "ivf", "vector_codec": "sq8", "faiss_list_size": 8})
    ivf = SearchService(settings, engine, embedder)
    ivf.cache.get()
    assert "cache not used" in ivf.cache.origin  # the flat float32 file on disk is not this layout
    status = Services.around(ivf).lifecycle.status().index
    assert (status.type, status.codec) == ("ivf", "sq8") and status.lists > 10 and status.retrain == []
    flat = Services.around(service).lifecycle.status().index
    assert status.memory_bytes < flat.memory_bytes / 2  # 1 byte a dimension, not 4 (+ centroids)
    # An upload is searchable at once, through a sub-list of its category.
    image = decode_image(cifar_queries.samples[0].load(), 10**7)
    added = ivf.upload(image, "cat")
    (hit,) = ivf.search([image.rgb], SearchParams(limit=1, top_categories=3, use_prototypes=True, nprobe=2))
    assert hit.results[0].image_id == added.image_id and hit.vectors_scanned < hit.vectors_total / 3
    # Restarted with the same settings, it loads its own file.
    again = SearchService(settings, engine, embedder)
    again.cache.get()
    assert again.cache.origin.startswith("loaded from cache")
