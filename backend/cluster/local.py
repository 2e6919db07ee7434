"""A Ray cluster on this machine for trying and testing: a head and N-1 more nodes (`ray start`, detached, so
it outlives the command), every node on 127.0.0.1 with shard slots, all under one temporary directory of its
own. `down` stops exactly the processes under that directory (and their children), found by their ids."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from backend.core.config import PROJECT_ROOT
from backend.core.errors import AppError

SLOTS_PER_NODE = 8
STATE_FILE = "cluster.json"


@dataclass(frozen=True)
class LocalCluster:
    address: str
    temp_dir: str  # short: Ray's unix sockets live under it (a path of at most 107 bytes)

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its directory, and their children (workers, agents)."""
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in arg for arg in p.info["cmdline"] or ()):
                    roots.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found: dict[int, psutil.Process] = {}
        for root in roots:
            try:
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                continue
        return list(found.values())


def _ray_env() -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def _ray_start(args: list[str]) -> subprocess.Popen[bytes]:
    ray = Path(sys.executable).with_name("ray")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--resources={json.dumps({'imsrc_shard': SLOTS_PER_NODE})}"]
    common += ["--disable-usage-stats", "--dashboard-agent-listen-port=0"]
    return subprocess.Popen([str(ray), "start", *args, *common], env=_ray_env(), cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def _finish(proc: subprocess.Popen[bytes], what: str) -> None:
    out, _ = proc.communicate(timeout=180)
    if proc.returncode:
        raise AppError(f"{what} did not start: {out.decode(errors='replace')[-1500:]}")


def up(data_dir: Path, nodes: int, port: int) -> LocalCluster:
    """Start the head, then the other nodes in parallel; the state is kept in DATA_DIR/cluster.json."""
    state = data_dir / STATE_FILE
    if state.exists():
        raise AppError(f"a cluster is already up ({json.loads(state.read_text())['address']}): cluster down first")
    cluster = LocalCluster(f"127.0.0.1:{port}", f"/tmp/imsrc-ray-{port}")
    head = ["--head", f"--port={port}", f"--temp-dir={cluster.temp_dir}", "--include-dashboard=false"]
    try:
        _finish(_ray_start(head), "the head node")
        others = [_ray_start([f"--address={cluster.address}"]) for _ in range(nodes - 1)]
        for i, proc in enumerate(others, 1):
            _finish(proc, f"node {i}")
    except BaseException:
        stop(cluster)
        raise
    state.write_text(json.dumps({"address": cluster.address, "temp_dir": cluster.temp_dir}))
    return cluster


def read_state(data_dir: Path) -> LocalCluster | None:
    state = data_dir / STATE_FILE
    if not state.exists():
        return None
    raw = json.loads(state.read_text())
    return LocalCluster(raw["address"], raw["temp_dir"])


def stop(cluster: LocalCluster, grace_s: float = 10.0) -> int:
    """SIGTERM every process of the cluster, SIGKILL what is left after `grace_s`; the processes stopped."""
    procs = cluster.processes()
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    deadline = time.monotonic() + grace_s  # children started meanwhile (a worker respawned) go too
    while (left := cluster.processes()) and time.monotonic() < deadline:
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return len(procs)


def down(data_dir: Path) -> int:
    cluster = read_state(data_dir)
    if cluster is None:
        raise AppError(f"no cluster is up (no {data_dir / STATE_FILE})")
    stopped = stop(cluster)
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped
