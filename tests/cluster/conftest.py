"""A real 3-node Ray cluster on loopback (`cluster up`), a real catalogue in PostgreSQL, real servers."""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from backend.core.config import PROJECT_ROOT
from backend.sources.datasets import Dataset, balanced, load_cifar10
from tests.utils.server import RunningServer, free_port, running_server
from tests.utils.settings import CIFAR_SUBSET

CLUSTER_IMAGES = 1_000  # 100 per CIFAR-10 category, as the cluster is specified for; embedding them costs a minute or two


def cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def cluster_engine(databases, embedder) -> Engine:
    """CLUSTER_IMAGES train-split images: more than the shared catalogue (`cifar_train`) holds."""
    from backend.ingest.populate import ingest

    engine = databases.new()
    images = Dataset("cifar10", balanced(load_cifar10(CIFAR_SUBSET, "train"), CLUSTER_IMAGES))
    report = ingest(images, embedder, engine, 10**7, progress=False)
    assert report.added == CLUSTER_IMAGES
    return engine


@pytest.fixture(scope="module")
def base_env(cluster_engine: Engine, embedder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What every process of the test shares: the database, one DATA_DIR (job files, the ONNX graph)."""
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(embedder.onnx_dir, data / "cache" / "onnx")
    return {
        **os.environ,
        "DATABASE_URL": cluster_engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(data),
        "CIFAR10_DIR": str(CIFAR_SUBSET),
        "AUTH_MODE": "off",
        "INDEX_REFRESH_SECONDS": "0.3",
        "SERVE_WORKER": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@pytest.fixture(scope="module")
def local_cluster(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`cluster up --nodes 3`; yields the env of a process that uses it; `cluster down` afterwards."""
    from backend.cluster import local

    env = {**base_env, "DATA_DIR": str(tmp_path_factory.mktemp("cluster"))}
    out = cli(["cluster", "up", "--nodes", "3", "--port", str(free_port())], env)
    assert out.returncode == 0, out.stdout + out.stderr
    address = out.stdout.strip().splitlines()[-1]
    yield {
        **base_env,
        "RAY_ADDRESS": address,
        "SHARD_GROUPS": "3",
        "SHARD_REPLICAS": "2",
        # 2 cores shared by several test runs: the deadline is set for this machine's load, not for speed
        "SHARD_DEADLINE_SECONDS": "4",
        "CLUSTER_DATA_DIR": env["DATA_DIR"],
    }
    state = local.read_state(Path(env["DATA_DIR"]))
    if state is not None:  # the last test brings it down itself and checks nothing is left
        cli(["cluster", "down"], env)


@pytest.fixture(scope="module")
def plain_server(base_env: dict[str, str]) -> Iterator[RunningServer]:
    """An in-process server (no RAY_ADDRESS) on the same database: the ids the cluster must answer."""
    with running_server(base_env) as server:
        yield server
