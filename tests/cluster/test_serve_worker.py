"""Serve's own job worker on a cluster: each chunk it commits reaches the shards through the server's
follow_write (catch_up), not at the shards' next look at the change log, which is set 300 s away here."""

import io
import time
import zipfile
from collections.abc import Iterator

import httpx
import pytest

from backend.sources.datasets import Dataset
from tests.cluster.test_cluster import search
from tests.utils.images import reencoded
from tests.utils.server import RunningServer, running_server

pytest.importorskip("ray", reason="the cluster extra (requirements-cluster.txt) is not installed")


@pytest.fixture(scope="module")
def server_with_worker(local_cluster: dict[str, str]) -> Iterator[RunningServer]:
    """The first server on this cluster: its shards follow the change log every 300 s, not sooner."""
    env = {**local_cluster, "SERVE_WORKER": "true", "INDEX_REFRESH_SECONDS": "300", "JOB_CHUNK_SIZE": "2"}
    with running_server(env, start_timeout_s=300) as server:
        yield server


def test_serve_workers_chunks_are_found_on_the_shards_at_once(server_with_worker: RunningServer, cifar_queries: Dataset) -> None:
    url = server_with_worker.url
    samples = cifar_queries.samples[70:74]  # test-split images: not in the catalogue
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for i, s in enumerate(samples):
            z.writestr(f"{s.label}/{i}.png", s.load())
    job = httpx.post(f"{url}/jobs/archive", files={"file": ("a.zip", archive.getvalue())}, timeout=60).json()
    deadline = time.monotonic() + 120
    while (state := httpx.get(f"{url}/jobs/{job['id']}", timeout=30).json())["state"] != "succeeded":
        assert time.monotonic() < deadline and state["state"] in ("queued", "running"), state
        time.sleep(0.1)
    assert state["added"] == len(samples)
    done = time.monotonic()
    for s in samples:  # every group is asked (use_prototypes=false); other bytes: found through the shards
        # The job reads "succeeded" when its last chunk commits, before the worker's catch_up ends (at most
        # twice the deadline); 20 s is still far from the shards' own refresh, 300 s away.
        while search(url, reencoded(s.load()), use_prototypes="false")["results"][0]["score"] < 0.9999:
            assert time.monotonic() - done < 20, "the shards did not follow the worker's commit"
            time.sleep(0.05)
