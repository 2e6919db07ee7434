"""Catalogue jobs: ingestion through the job queue with 1 and 2 worker processes (real CIFAR-10 images,
Lite0), against embedding alone in one process; and how soon a server without its own worker finds a
separate worker's images (its index follows the database every INDEX_REFRESH_SECONDS)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine

from backend import jobs
from backend.core.config import PROJECT_ROOT, Settings
from backend.embedding.cache import model_cache
from backend.imaging import decode_image
from benchmarks.harness import TempDatabase, cifar_samples, throughput


def _workers(url: str, data_dir: Path, onnx_dir: Path, n: int) -> list[subprocess.Popen]:
    env = {**os.environ, "DATABASE_URL": url, "DATA_DIR": str(data_dir), "ONNX_CACHE_DIR": str(onnx_dir)}
    cmd = [sys.executable, "-m", "backend.cli", "worker"]
    return [
        subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)
    ]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def _cifar_job(settings: Settings, engine: Engine, queue: Any, model: str, n: int, chunk: int) -> int:
    """A dataset job of `n` balanced CIFAR-10 train images (the ones `cifar_samples` picks), staged now."""
    params = {"dataset": "cifar10", "split": "train", "num_images": n}
    job_id = jobs.create_job(settings, engine, "dataset", model, params, None)
    jobs.stage_job(settings.model_copy(update={"job_chunk_size": chunk}), engine, queue, job_id)
    return job_id


def run(settings: Settings, quick: bool) -> dict:
    n = 64 if quick else 2000
    dataset = cifar_samples(settings, n, "train")
    embedder = model_cache.get(settings)
    embedder.load()
    pixels = [decode_image(s.load(), settings.max_image_pixels).rgb for s in dataset.samples[:256]]
    alone = throughput(lambda: embedder.embed(pixels), len(pixels), 0.5 if quick else 2.0)
    out: dict = {"images": n, "embedding_alone_images_per_s": round(alone, 1), "workers": {}}
    onnx_dir = settings.onnx_dir  # the exported graphs are cached by model id: workers reuse this process's
    for count in (1,) if quick else (1, 2):
        with TempDatabase() as db:
            url = db.url.render_as_string(hide_password=False)
            procs = _workers(url, db.data_dir, onnx_dir, count)
            try:
                # Warm-up: each worker loads the model on its first chunk; time the real job only.
                queue = jobs.open_queue(db.engine)
                warm = _cifar_job(settings, db.engine, queue, embedder.model_id, 4 * count, 2)
                jobs.wait_for(db.engine, warm, 300)
                start = time.perf_counter()
                job_id = _cifar_job(settings, db.engine, queue, embedder.model_id, n, settings.job_chunk_size)
                job = jobs.wait_for(db.engine, job_id, 1800)
                seconds = time.perf_counter() - start
                queue.close()
            finally:
                _stop(procs)
            out["workers"][count] = {"images_per_s": round(job.added / seconds, 1), "added": job.added, "state": job.state}
            print(f"  jobs: {count} worker(s): {job.added / seconds:.1f} images/s ({job.added} added)", file=sys.stderr)
    # --quick leaves out the second server and worker: starting them was a third of the smoke run
    out["server_sees_worker_s"] = None if quick else _visibility(settings, onnx_dir)
    return out


def _visibility(settings: Settings, onnx_dir: Path) -> float:
    """Seconds from a separate worker's job ending to the server (SERVE_WORKER=false) answering with one
    of its images as the top hit; bounded by INDEX_REFRESH_SECONDS (default 2)."""
    import socket

    with TempDatabase() as db, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        url = db.url.render_as_string(hide_password=False)
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "DATA_DIR": str(db.data_dir / "server"),
            "SERVE_WORKER": "false",
            "ONNX_CACHE_DIR": str(onnx_dir),
            "AUTH_MODE": "off",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs = _workers(url, db.data_dir, onnx_dir, 1)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            queue = jobs.open_queue(db.engine)
            job_id = _cifar_job(settings, db.engine, queue, "efficientnet_lite0/imagenet/224px", 64, 32)
            queue.close()
            jobs.wait_for(db.engine, job_id, 600)
            ended = time.perf_counter()
            query = cifar_samples(settings, 64).samples[-1].load()  # the same 64 the job staged
            while time.perf_counter() - ended < 60:
                hit = httpx.post(
                    f"{base}/search?limit=1&use_prototypes=false", files={"file": ("q.png", query, "image/png")}, timeout=30
                ).json()["results"]
                if hit and hit[0]["score"] > 0.9999:
                    break
                time.sleep(0.05)
            seen = time.perf_counter() - ended
        finally:
            _stop([*procs, server])
    print(f"  jobs: a server found a separate worker's image {seen:.2f} s after its job ended", file=sys.stderr)
    return round(seen, 2)
