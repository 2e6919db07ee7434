"""Stage 2 in this process against stage 2 on a local Ray cluster (`cluster up`: 3 nodes on loopback, 3 category
groups), over the same database, in one run: p50/p99 of one query at a time (the paths taking turns query by
query, beside Ray's own cost: a call that does nothing, to the same groups), and requests/s from 4 threads.
Stage 1 (the query's top-3 categories by prototype) is the same for both and not timed; embedding and the
database fetch are not part of it either: only what moves to the cluster is compared."""

import sys
import tempfile
import time
from collections.abc import Callable
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


def _paths(stage2: "RayStage2", index, q: np.ndarray, searched: np.ndarray) -> dict[str, Callable[[int], object]]:
    """Query i through each path: stage 2 in this process, on the cluster, and Ray alone (a call that does
    nothing, catch_up to 0, to the same groups as query i's search, and to one actor)."""
    import ray

    inproc = InProcessStage2()
    ids = index.category_ids
    groups = [sorted({stage2.assignment.group_for(int(ids[c])) for c in row if c >= 0}) for row in searched]
    one = stage2.replicas[0][0]
    return {
        "in_process": lambda i: inproc.search(index, q[i : i + 1], K, searched[i : i + 1], None, 100),
        "cluster": lambda i: stage2.search(index, q[i : i + 1], K, searched[i : i + 1], None, 100),
        "noop_same_groups": lambda i: ray.get([stage2.replicas[g][0].catch_up.remote(0) for g in groups[i]]),
        "noop_one": lambda i: ray.get(one.catch_up.remote(0)),
    }


def _time(paths: dict[str, Callable[[int], object]], n: int, rounds: int) -> dict[str, dict]:
    """p50/p99 of one query at a time, the paths taking turns query by query, so that a machine whose load
    changes (2 shared cores here) weighs on all of them alike; then requests/s of each from 4 threads."""
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for i in range(n):
            for name, path in paths.items():
                t = time.perf_counter()
                path(i)
                seconds[name].append(time.perf_counter() - t)
    stats = {name: percentiles(s) for name, s in seconds.items()}
    for name in ("in_process", "cluster"):
        with ThreadPoolExecutor(4) as pool:
            t = time.perf_counter()
            list(pool.map(paths[name], range(n)))
            stats[name]["requests_per_s"] = round(n / (time.perf_counter() - t), 1)
    return stats


def _ids(stage2: Stage2, index, q: np.ndarray, searched: np.ndarray) -> list[list[int]]:
    out = []
    for i in range(len(q)):
        found = stage2.search(index, q[i : i + 1], K, searched[i : i + 1], None, 100)
        assert not found.left_out[0], "a group missed the deadline"
        out.append(found.hits.ids[0].tolist())
    return out


def run(quick: bool) -> dict:
    import ray

    from backend.cluster import local
    from backend.cluster.router import RayStage2

    n, n_queries, rounds = (3_000, 100, 3) if quick else (30_000, 300, 3)
    x, labels, q = clustered(n, n_queries=n_queries)
    with TempDatabase() as db, tempfile.TemporaryDirectory(prefix="imsrc-bench-cluster-") as tmp:
        seed_vectors(db.engine, MODEL, x, labels)
        cache = LiveIndex(db.engine, MODEL, DIM, db.data_dir / "index", IndexLayout())
        index = cache.get()
        _, searched = index.prototypes.search(q, TOP)
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
            try:
                same = sum(
                    a == b
                    for a, b in zip(
                        _ids(InProcessStage2(), index, q, searched), _ids(ray_stage2, index, q, searched), strict=True
                    )
                )
                stats = _time(_paths(ray_stage2, index, q, searched), n_queries, rounds)
            finally:
                ray_stage2.close()  # its epoch follower polls the temporary database, dropped next
        finally:
            ray.shutdown()  # before the cluster goes: a driver left connected is ended by Ray 60 s later
            local.stop(cluster)
    result = {"vectors": n, "queries": n_queries, "rounds": rounds, "groups": 3, **stats}
    result.update(same_ids=f"{same}/{n_queries}", cluster_up_s=round(up_s, 1), shards_ready_s=round(shards_s, 1))
    print(f"  stage 2, {n:,} vectors, top-{TOP} of 10 categories, k={K}; cluster: 3 nodes, 3 groups", file=sys.stderr)
    print(f"  {n_queries} queries x {rounds} rounds, the paths taking turns query by query", file=sys.stderr)
    for name, r in (("in-process", stats["in_process"]), ("cluster", stats["cluster"])):
        line = f"p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  {r['requests_per_s']:8.1f} requests/s (4 threads)"
        print(f"    {name:<11} {line}", file=sys.stderr)
    print(
        f"    Ray alone: a no-op call p50 {stats['noop_one']['p50']:.2f} ms, to the same groups as each search"
        f" {stats['noop_same_groups']['p50']:.2f} ms",
        file=sys.stderr,
    )
    print(f"    same ids: {same}/{n_queries}; cluster up {up_s:.1f} s, shards ready {shards_s:.1f} s", file=sys.stderr)
    return result
