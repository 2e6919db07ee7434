"""Stage 2 in this process against stage 2 on a local Ray cluster (`cluster up`: 3 nodes on loopback, 3 category
groups), over the same database, in one run: p50/p99 of one query at a time, and requests/s from 4 threads.
Stage 1 (the query's top-3 categories by prototype) is the same for both and not timed; embedding and the
database fetch are not part of it either: only what moves to the cluster is compared."""

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.core.config import Settings
from backend.index.layout import IndexLayout
from backend.search.live_index import LiveIndex
from backend.search.stage2 import InProcessStage2, Stage2
from benchmarks.harness import DIM, TempDatabase, clustered, percentiles, seed_vectors
from tests.utils.server import free_port

if TYPE_CHECKING:
    from backend.cluster.router import RayStage2

MODEL = "synthetic/none/0px"
TOP = 3
K = 10


def _time(stage2: Stage2, index, q: np.ndarray, searched: np.ndarray) -> tuple[dict, list[list[int]]]:
    seconds, ids = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        found = stage2.search(index, q[i : i + 1], K, searched[i : i + 1], None, 100)
        seconds.append(time.perf_counter() - t)
        assert not found.left_out[0], "a group missed the deadline"
        ids.append(found.hits.ids[0].tolist())
    stats = percentiles(seconds)
    with ThreadPoolExecutor(4) as pool:
        t = time.perf_counter()
        list(pool.map(lambda i: stage2.search(index, q[i : i + 1], K, searched[i : i + 1], None, 100), range(len(q))))
        stats["requests_per_s"] = round(len(q) / (time.perf_counter() - t), 1)
    return stats, ids


def _noop(stage2: "RayStage2", n: int) -> dict:
    """What Ray itself costs here: a call that does nothing (catch_up to 0), to one actor and to 3 at once."""
    import ray

    one, three = [], []
    actors = [replicas[0] for replicas in stage2.replicas.values()]
    for _ in range(n):
        t = time.perf_counter()
        ray.get(actors[0].catch_up.remote(0))
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        ray.get([a.catch_up.remote(0) for a in actors])
        three.append(time.perf_counter() - t)
    return {"one_p50": percentiles(one)["p50"], "fan_out_3_p50": percentiles(three)["p50"]}


def run(quick: bool) -> dict:
    from backend.cluster import local
    from backend.cluster.router import RayStage2

    n, n_queries = (3_000, 100) if quick else (30_000, 300)
    x, labels, q = clustered(n, n_queries=n_queries)
    with TempDatabase() as db, tempfile.TemporaryDirectory(prefix="imsrc-bench-cluster-") as tmp:
        seed_vectors(db.engine, MODEL, x, labels)
        cache = LiveIndex(db.engine, MODEL, DIM, db.data_dir / "index", IndexLayout())
        index = cache.get()
        _, searched = index.prototypes.search(q, TOP)
        inproc, inproc_ids = _time(InProcessStage2(), index, q, searched)
        t = time.perf_counter()
        cluster = local.up(Path(tmp), nodes=3, port=free_port())
        up_s = time.perf_counter() - t
        try:
            url = db.url.render_as_string(hide_password=False)
            settings = Settings(_env_file=None, database_url=url, data_dir=db.data_dir, ray_address=cluster.address,  # type: ignore[call-arg]
                                shard_groups=3, shard_replicas=1, shard_deadline_seconds=10)  # fmt: skip
            t = time.perf_counter()
            ray_stage2 = RayStage2(settings, db.engine, MODEL, DIM, IndexLayout())
            shards_s = time.perf_counter() - t
            on_cluster, cluster_ids = _time(ray_stage2, index, q, searched)
            noop = _noop(ray_stage2, len(q))
        finally:
            local.stop(cluster)
    same = sum(a == b for a, b in zip(inproc_ids, cluster_ids, strict=True))
    result = {"vectors": n, "queries": n_queries, "groups": 3, "in_process": inproc, "cluster": on_cluster}
    result.update(
        noop_call_ms=noop, same_ids=f"{same}/{n_queries}", cluster_up_s=round(up_s, 1), shards_ready_s=round(shards_s, 1)
    )
    print(f"  stage 2, {n:,} vectors, top-{TOP} of 10 categories, k={K}; cluster: 3 nodes, 3 groups", file=sys.stderr)
    for name, r in (("in-process", inproc), ("cluster", on_cluster)):
        line = f"p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  {r['requests_per_s']:8.1f} requests/s (4 threads)"
        print(f"    {name:<11} {line}", file=sys.stderr)
    print(
        f"    Ray alone: a no-op call p50 {noop['one_p50']:.2f} ms, to 3 actors at once {noop['fan_out_3_p50']:.2f} ms",
        file=sys.stderr,
    )
    print(f"    same ids: {same}/{n_queries}; cluster up {up_s:.1f} s, shards ready {shards_s:.1f} s", file=sys.stderr)
    return result
