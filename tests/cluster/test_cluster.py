"""Issue 30's done-when, on `cluster up --nodes 3` with real servers over one PostgreSQL catalogue: the
shards in /status, the same ids as an in-process server, a replica SIGKILLed under load, read-your-writes
through the cluster and on another server, deletions, and `cluster down` leaving no Ray process."""

import io
import os
import signal
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backend.sources.datasets import Dataset
from tests.cluster.conftest import CLUSTER_IMAGES, cli
from tests.utils.images import reencoded
from tests.utils.server import RunningServer, running_server

pytest.importorskip("ray", reason="the cluster extra (requirements-cluster.txt) is not installed")

QUERIES = 50


@pytest.fixture(scope="module")
def cluster_server(local_cluster: dict[str, str]) -> Iterator[RunningServer]:
    with running_server(local_cluster, start_timeout_s=300) as server:
        yield server


def search(url: str, image: bytes, **params: object) -> dict:
    r = httpx.post(f"{url}/search", params={"limit": 10, **params}, files={"file": ("q.png", image)}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def ids(result: dict) -> list[int]:
    return [h["image_id"] for h in result["results"]]


def same_stage1(*servers: RunningServer, timeout_s: float = 180) -> None:
    """Wait until every server ranks with the same trained stage 1: each trains (or loads) it in the background
    after start, and a server still ranking by prototype picks other top categories than one that has it."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = [httpx.get(f"{s.url}/status", timeout=30).json()["stage1"] for s in servers]
        if states[0]["trained_change"] is not None and len({(st["ranker"], st["trained_change"]) for st in states}) == 1:
            return
        assert time.monotonic() < deadline, f"the servers' stage 1 differ: {states}"
        time.sleep(0.5)


def test_status_shows_the_groups_and_their_replicas(cluster_server: RunningServer) -> None:
    stage2 = httpx.get(f"{cluster_server.url}/status", timeout=30).json()["stage2"]
    assert stage2["engine"] == "ray" and stage2["epoch"] >= 1
    assert len(stage2["groups"]) >= 2
    held = []
    for group in stage2["groups"]:
        replicas = group["replicas"]
        assert len(replicas) == 2 and all(r["state"] == "ready" for r in replicas), replicas
        assert replicas[0]["node"] != replicas[1]["node"]  # spread over nodes
        assert replicas[0]["vectors"] == replicas[1]["vectors"] == group["vectors_packed"]
        held += group["categories"]
    assert len(held) == len(set(held)) == 10  # every CIFAR category in exactly one group
    assert sum(g["vectors_packed"] for g in stage2["groups"]) == CLUSTER_IMAGES


def test_the_cluster_answers_the_same_ids_as_an_in_process_server(
    cluster_server: RunningServer, plain_server: RunningServer, cifar_queries: Dataset
) -> None:
    assert httpx.get(f"{plain_server.url}/status", timeout=30).json()["stage2"]["engine"] == "in-process"
    same_stage1(cluster_server, plain_server)
    for i, sample in enumerate(cifar_queries.samples[:QUERIES]):
        image = sample.load()
        for params in ({}, {"use_prototypes": "false"})[: 1 + (i % 5 == 0)]:  # every 5th also over every category
            on_cluster, in_process = search(cluster_server.url, image, **params), search(plain_server.url, image, **params)
            assert not on_cluster["partial"]
            assert ids(on_cluster) == ids(in_process), (sample.source, params)
            assert [h["score"] for h in on_cluster["results"]] == pytest.approx([h["score"] for h in in_process["results"]])


def test_a_replica_killed_during_200_queries_costs_no_error_and_no_partial_result(
    cluster_server: RunningServer, cifar_queries: Dataset
) -> None:
    stage2 = httpx.get(f"{cluster_server.url}/status", timeout=30).json()["stage2"]
    victim = stage2["groups"][0]["replicas"][0]
    images = [s.load() for s in cifar_queries.samples]
    answers: list[int] = []
    partial: list[int] = []

    def kill_soon() -> None:
        while len(answers) < 20:
            time.sleep(0.01)
        os.kill(victim["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with httpx.Client(base_url=cluster_server.url, timeout=30) as http:
        for i in range(200):
            r = http.post("/search", params={"top_categories": 10}, files={"file": ("q.png", images[i % len(images)])})
            answers.append(r.status_code)
            if r.status_code == 200 and r.json()["partial"]:
                partial.append(i)
    killer.join()
    assert answers == [200] * 200 and partial == []
    deadline = time.monotonic() + 120  # Ray restarts it (max_restarts=-1) and it builds its part again
    while time.monotonic() < deadline:
        replica = httpx.get(f"{cluster_server.url}/status", timeout=30).json()["stage2"]["groups"][0]["replicas"][0]
        if replica["state"] == "ready" and replica["pid"] != victim["pid"]:
            break
        time.sleep(1)
    assert replica["pid"] != victim["pid"] and replica["vectors"] == victim["vectors"]


def test_an_upload_is_found_through_the_cluster_and_by_another_server_within_2_s(
    cluster_server: RunningServer, plain_server: RunningServer, cifar_queries: Dataset
) -> None:
    image = cifar_queries.samples[-1].load()  # a test-split image: not in the catalogue
    r = httpx.post(f"{cluster_server.url}/upload", files={"file": ("new.png", image)}, timeout=30)
    assert r.status_code == 201, r.text
    stored, uploaded = r.json()["image_id"], time.monotonic()
    first = search(cluster_server.url, image, use_prototypes="false")
    assert ids(first)[0] == stored and time.monotonic() - uploaded < 2
    assert ids(search(cluster_server.url, reencoded(image), use_prototypes="false"))[0] == stored  # from the shards
    while ids(search(plain_server.url, image))[:1] != [stored]:
        assert time.monotonic() - uploaded < 2, "the other server did not see the upload within 2 s"
        time.sleep(0.05)
    # ... and a delete on the other server is never returned again by the cluster
    assert httpx.delete(f"{plain_server.url}/images/{stored}", timeout=30).status_code in (200, 204)
    for _ in range(10):
        for url in (cluster_server.url, plain_server.url):
            assert stored not in ids(search(url, image, use_prototypes="false"))


def test_two_servers_and_a_worker_see_each_others_writes_and_deletes(
    cluster_server: RunningServer, plain_server: RunningServer, base_env: dict[str, str], cifar_queries: Dataset
) -> None:
    samples = cifar_queries.samples[60:64]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for i, s in enumerate(samples):
            z.writestr(f"{s.label}/{i}.png", s.load())
    worker = None
    try:
        import subprocess
        import sys

        from backend.core.config import PROJECT_ROOT

        worker = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"], cwd=PROJECT_ROOT, env=base_env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        job = httpx.post(f"{plain_server.url}/jobs/archive", files={"file": ("a.zip", archive.getvalue())}, timeout=60).json()
        deadline = time.monotonic() + 120
        while (state := httpx.get(f"{plain_server.url}/jobs/{job['id']}", timeout=30).json())["state"] != "succeeded":
            assert time.monotonic() < deadline and state["state"] in ("queued", "running"), state
            time.sleep(0.3)
        assert state["added"] == len(samples)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
    found = {}
    for s in samples:  # the worker's writes: on both servers, the cluster's shards following the change log
        for url in (cluster_server.url, plain_server.url):
            deadline = time.monotonic() + 5
            while (top := search(url, reencoded(s.load()), use_prototypes="false"))["results"][0]["score"] < 0.9999:
                assert time.monotonic() < deadline, f"{url} did not see the worker's image"
                time.sleep(0.1)
            found.setdefault(s.source, set()).add(top["results"][0]["image_id"])
    assert all(len(v) == 1 for v in found.values())
    victim = next(iter(found[samples[0].source]))
    assert httpx.delete(f"{cluster_server.url}/images/{victim}", timeout=30).status_code in (200, 204)
    for url in (cluster_server.url, plain_server.url):
        assert victim not in ids(search(url, samples[0].load(), use_prototypes="false"))


def test_cluster_down_leaves_no_ray_process(local_cluster: dict[str, str], cluster_server: RunningServer) -> None:
    from backend.cluster import local

    data_dir = Path(local_cluster["CLUSTER_DATA_DIR"])
    state = local.read_state(data_dir)
    assert state is not None and state.processes()
    out = cli(["cluster", "down"], {**local_cluster, "DATA_DIR": str(data_dir)})
    assert out.returncode == 0, out.stderr
    assert state.processes() == []
    assert local.read_state(data_dir) is None
