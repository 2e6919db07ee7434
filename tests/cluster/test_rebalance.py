"""Rebalancing on `cluster up --nodes 3` with real servers over one PostgreSQL catalogue: `cluster rebalance
--groups 3` while queries run without pause against a server on 2 groups. No query fails, none is partial,
every one answers the in-process server's ids; the server follows the new epoch; after the grace period the
old epoch's actors are gone and their cache directories removed."""

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from backend.core.config import PROJECT_ROOT
from backend.sources.datasets import Dataset, load_cifar10
from tests.utils.images import reencoded
from tests.utils.server import RunningServer, running_server
from tests.utils.settings import CIFAR_SUBSET

pytest.importorskip("ray", reason="the cluster extra (requirements-cluster.txt) is not installed")

GRACE_S = 10  # at least the routers' 1 s epoch check plus twice the 4 s deadline (the config requires it)
QUERIES = 20  # distinct query images, asked in turn (every other one over all 10 categories)


@pytest.fixture(scope="module")
def env(local_cluster: dict[str, str]) -> dict[str, str]:
    return {**local_cluster, "SHARD_GROUPS": "2", "SHARD_GRACE_SECONDS": str(GRACE_S)}


@pytest.fixture(scope="module")
def cluster_server(env: dict[str, str]) -> Iterator[RunningServer]:
    with running_server(env, start_timeout_s=300) as server:
        yield server


def ask(http: httpx.Client, image: bytes, i: int) -> httpx.Response:
    params = {"limit": 10, "top_categories": 10 if i % 2 else 3}
    return http.post("/search", params=params, files={"file": ("q.png", image)})


def stage2(server: RunningServer) -> dict:
    return httpx.get(f"{server.url}/status", timeout=30).json()["stage2"]


def named_actors(address: str) -> list[str]:
    """The cluster's named actors in our namespace, as a separate driver sees them."""
    code = "import ray; from backend.cluster.epochs import connect; connect(%r); print(*ray.util.list_named_actors())"
    out = subprocess.run([sys.executable, "-c", code % address], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return out.stdout.split()


def query_without_pause(
    server: RunningServer,
    images: list[bytes],
    expected: list[list[int]],
    answered: list[int],
    problems: list[str],
    stop: threading.Event,
) -> None:
    """Queries in turn until `stop`, each number appended to `answered`; every failed, partial or other answer
    than `expected` to `problems`."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        i = 0
        while not stop.is_set():
            r = ask(http, images[i % QUERIES], i % QUERIES)
            if r.status_code != 200:
                problems.append(f"query {i}: {r.status_code} {r.text[:200]}")
            elif r.json()["partial"]:
                problems.append(f"query {i}: partial, {r.json()['categories_left_out']}")
            elif [h["image_id"] for h in r.json()["results"]] != expected[i % QUERIES]:
                problems.append(f"query {i}: other ids than in-process")
            answered.append(i)
            i += 1


def test_rebalancing_from_2_to_3_groups_under_queries_leaves_no_gap(
    env: dict[str, str], cluster_server: RunningServer, plain_server: RunningServer, cifar_queries: Dataset
) -> None:
    before = stage2(cluster_server)
    assert before["epoch"] == 1 and len(before["groups"]) == 2 and before["pending_epoch"] is None
    old = [r for g in before["groups"] for r in g["replicas"]]
    assert len(old) == 4 and all(r["state"] == "ready" for r in old)
    images = [s.load() for s in cifar_queries.samples[:QUERIES]]
    with httpx.Client(base_url=plain_server.url, timeout=30) as http:
        expected = [[h["image_id"] for h in ask(http, image, i).json()["results"]] for i, image in enumerate(images)]

    answered: list[int] = []
    problems: list[str] = []
    stop = threading.Event()
    querying = threading.Thread(target=query_without_pause, args=(cluster_server, images, expected, answered, problems, stop))
    querying.start()
    try:
        rebalance = subprocess.Popen([sys.executable, "-m", "backend.cli", "cluster", "rebalance", "--groups", "3"],
                                     cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)  # fmt: skip
        seen_pending, started = False, time.monotonic()
        while rebalance.poll() is None:  # /status shows the epoch being built while it is
            seen_pending |= stage2(cluster_server)["pending_epoch"] == 2
            time.sleep(0.5)
        out = rebalance.stdout.read() if rebalance.stdout else ""
        assert rebalance.returncode == 0, out
        assert "epoch 2 active" in out and "old epochs retired" in out, out
        queries_during_rebalance, rebalance_s = len(answered), time.monotonic() - started
        time.sleep(3)  # and queries on the new epoch alone, the old one gone
    finally:
        stop.set()
        querying.join()
    print(f"\n{out}{queries_during_rebalance} queries during the {rebalance_s:.0f}s rebalance, {len(answered)} in all")
    assert seen_pending
    assert problems == [] and queries_during_rebalance >= 20 and len(answered) > queries_during_rebalance

    after = stage2(cluster_server)  # the server follows the new epoch, its three groups built and ready
    assert after["epoch"] == 2 and after["pending_epoch"] is None and len(after["groups"]) == 3
    held = sorted(c for g in after["groups"] for c in g["categories"])
    assert held == sorted(c for g in before["groups"] for c in g["categories"])
    for group in after["groups"]:
        assert [r["state"] for r in group["replicas"]] == ["ready", "ready"]
        assert all(r["vectors"] == group["vectors_packed"] and "-e2-" in r["name"] for r in group["replicas"])

    # The old epoch: its actors killed (processes gone, names free), its cache directories removed.
    ray_pids = _ray_pids()
    assert not [r for r in old if r["pid"] in ray_pids]
    names = named_actors(env["RAY_ADDRESS"])
    assert not [n for n in names if "-e1-" in n] and len([n for n in names if "-e2-" in n]) == 6, names
    shard_dirs = sorted(p.name for p in (Path(env["DATA_DIR"]) / "index" / "shards").iterdir())
    assert len(shard_dirs) == 6 and all("-e2-" in d for d in shard_dirs), shard_dirs


def test_own_writes_are_found_across_the_switch_and_the_server_retires_the_old_epoch(
    env: dict[str, str], cluster_server: RunningServer
) -> None:
    """Uploads during `cluster rebalance --groups 2 --no-wait`, each searched for at once through the shards
    (by a re-encoded copy: the server's own-image look-up by hash cannot answer it): every upload is the
    top hit, before, during and after the switch. `--no-wait` returns once the epoch is active; the server
    itself retires the old epoch after the grace period."""
    fresh = iter(load_cifar10(CIFAR_SUBSET, "test")[500:])  # not in the catalogue (the train split)
    rebalance = subprocess.Popen([sys.executable, "-m", "backend.cli", "cluster", "rebalance", "--groups", "2", "--no-wait"],
                                 cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)  # fmt: skip
    missed: list[int] = []
    on_new_epoch = uploads = while_rebalancing = 0
    with httpx.Client(base_url=cluster_server.url, timeout=30) as http:
        while on_new_epoch < 5:
            image = next(fresh).load()
            r = http.post("/upload", files={"file": ("new.png", image)})
            assert r.status_code == 201, r.text
            query = {"file": ("q.png", reencoded(image))}
            found = http.post("/search", params={"use_prototypes": "false", "limit": 1}, files=query).json()["results"]
            if [h["image_id"] for h in found] != [r.json()["image_id"]]:
                missed.append(uploads)
            uploads += 1
            if rebalance.poll() is None:
                while_rebalancing = uploads
            elif rebalance.returncode:
                break
            else:
                on_new_epoch += stage2(cluster_server)["epoch"] == 3
    out = rebalance.stdout.read() if rebalance.stdout else ""
    assert rebalance.returncode == 0 and "epoch 3 active" in out, out
    print(f"\n{out}{uploads} uploads, {while_rebalancing} of them while the rebalance ran")
    assert missed == [] and while_rebalancing >= 5
    deadline = time.monotonic() + GRACE_S + 60
    while (names := named_actors(env["RAY_ADDRESS"])) and any("-e2-" in n for n in names):
        assert time.monotonic() < deadline, names
        time.sleep(1)
    assert sorted(n.rsplit("-e", 1)[1] for n in names) == [f"3-g{g}-r{r}" for g in range(2) for r in range(2)]
    shard_dirs = list((Path(env["DATA_DIR"]) / "index" / "shards").iterdir())
    assert len(shard_dirs) == 4 and all("-e3-" in d.name for d in shard_dirs)


def _ray_pids() -> set[int]:
    """Processes that are Ray workers (an old actor's pid reused by something else does not count)."""
    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("ray" in arg for arg in p.info["cmdline"] or ()):
                pids.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids
