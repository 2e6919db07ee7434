"""POST /search end to end against a real server process, with 1, 2 and 8 concurrent clients, the query a
768x576 JPEG photo. Goal (issue 22): p50 with one client <= 1.3x the server's own embed + stage 1 + stage 2."""

import os
import sys
import threading
import time

import httpx
import numpy as np

from backend.core.config import Settings
from backend.core.embedding_models import DEFAULT_MODEL
from backend.embedding.cache import model_cache
from backend.ingest.populate import ingest
from benchmarks.harness import TempDatabase, cifar_samples, percentiles
from tests.utils.images import photo_jpeg
from tests.utils.server import running_server


def load(base: str, queries: list[bytes], clients: int, per_client: int) -> tuple[list[float], list[float], float]:
    """`clients` threads, each posting `per_client` searches: (latencies, server embed+search times, wall time)."""
    latencies: list[float] = []
    inner: list[float] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(per_client):
                t = time.perf_counter()
                query = queries[(offset + i) % len(queries)]
                r = http.post("/search?limit=10", files={"file": ("q.jpg", query, "image/jpeg")})
                elapsed = time.perf_counter() - t
                r.raise_for_status()
                timings = r.json()["timings_ms"]
                server_ms = timings["embed"] + timings["prototypes"] + timings["search"] + timings.get("own_image", 0)
                with lock:
                    latencies.append(elapsed)
                    inner.append(server_ms / 1000)

    threads = [threading.Thread(target=client, args=(c * 3,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies, inner, time.perf_counter() - t


def run(settings: Settings, quick: bool) -> list[dict]:
    catalogue = cifar_samples(settings, 100 if quick else 1000)
    queries = [photo_jpeg(768, 576)]
    with TempDatabase() as db:
        ingest(catalogue, model_cache.get(settings, DEFAULT_MODEL), db.engine, 10**7, progress=False)
        env = {
            **os.environ,
            "DATABASE_URL": db.url.render_as_string(hide_password=False),
            "DATA_DIR": str(db.data_dir),
            "ONNX_CACHE_DIR": str(settings.onnx_dir),  # no export at start-up: the graph is cached by model id
        }
        with running_server(env) as server:
            base = server.url
            rows = []
            per_client = 8 if quick else 24
            for clients in (1, 2, 8):
                with httpx.Client(base_url=base) as http:  # warm-up
                    http.post("/search", files={"file": ("q.jpg", queries[0], "image/jpeg")})
                latencies, inner, wall = load(base, queries, clients, per_client)
                row = {
                    "clients": clients,
                    **percentiles(latencies),
                    "requests_per_s": len(latencies) / wall,
                    "end_to_end_over_embed_plus_search": float(np.mean(latencies) / np.mean(inner)),
                    "p50_over_server_compute": float(np.median(latencies) / np.median(inner)),
                }
                rows.append(row)
                print(
                    f"  http {clients} client(s): p50 {row['p50']:.1f} ms ({row['p50_over_server_compute']:.2f}x the server's "
                    f"compute), {row['requests_per_s']:.1f} req/s",
                    file=sys.stderr,
                )
    return rows
