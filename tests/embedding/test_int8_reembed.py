"""A re-embedding job moves an fp32 catalogue to int8 vectors, kept apart under their own model id (a real
worker process with EMBED_PRECISION=int8, the real Lite0 graph quantized, real CIFAR-10 images)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from backend import jobs
from backend.core.config import PROJECT_ROOT
from backend.core.search_params import SearchParams
from backend.embedding.registry import model_id
from backend.imaging import decode_image
from backend.services.search import SearchService
from backend.sources.datasets import Dataset, balanced
from backend.storage import catalogue
from backend.storage.engine import session_scope
from tests.utils.catalogue import fill
from tests.utils.settings import CIFAR_SUBSET, make_settings


def test_a_reembedding_job_moves_the_catalogue_to_int8(databases, embedder, cifar_train: Dataset, tmp_path: Path) -> None:
    engine = databases.new()
    fill(engine, embedder, cifar_train.samples, 12)
    samples = balanced(cifar_train.samples, 12)  # the same images, in the same order
    overrides = {"embed_precision": "int8", "onnx_cache_dir": embedder.onnx_dir, "job_chunk_size": 6}
    settings = make_settings(tmp_path / "server", engine, **overrides)
    int8 = model_id(settings, "efficientnet_lite0")
    assert int8.startswith(embedder.model_id + "/int8-")
    env = {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(tmp_path / "worker"),
        "ONNX_CACHE_DIR": str(embedder.onnx_dir),
        "CIFAR10_DIR": str(CIFAR_SUBSET),
        "EMBED_PRECISION": "int8",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "worker"], cwd=PROJECT_ROOT, env=env, stderr=subprocess.DEVNULL
    )
    try:
        queue = jobs.open_queue(engine)
        job_id = jobs.create_job(settings, engine, "reembed", int8, {"model_name": "efficientnet_lite0"}, None)
        jobs.stage_job(settings, engine, queue, job_id)
        job = jobs.wait_for(engine, job_id, 300)
        queue.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    assert (job.state, job.added) == ("succeeded", 12), job.message
    with session_scope(engine) as session:
        assert dict(catalogue.model_ids(session)) == {embedder.model_id: 12, int8: 12}
    service = SearchService(settings, engine)  # an int8 server: its index holds the int8 vectors only
    query = service.embedder.embed([decode_image(samples[0].load(), 10**7).rgb])
    (result,) = service.search_vectors(query, SearchParams(limit=3, top_categories=1, use_prototypes=False))
    assert result.vectors_total == 12 and result.results[0].score > 0.999  # the image finds itself
