"""A Ray cluster on this machine for trying and testing: a head and N-1 more nodes, every one on 127.0.0.1 with
shard slots, held by one detached supervisor process (so it outlives the command) and all under one temporary
directory of its own. `down` stops the supervisor, then whatever process still names that directory (or is a
child of one), found by their ids."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from backend.core.config import PROJECT_ROOT
from backend.core.errors import AppError

SLOTS_PER_NODE = 8
SHARD_RESOURCE = "imsrc_shard"  # the custom resource of nodes that hold shards (backend/cluster/router.py)
STATE_FILE = "cluster.json"


@dataclass(frozen=True)
class LocalCluster:
    address: str
    temp_dir: str  # short: Ray's unix sockets live under it (a path of at most 107 bytes)
    pid: int  # the supervisor holding it

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its directory, and their children (workers, agents)."""
        roots = []
        try:
            supervisor = psutil.Process(self.pid)
            if _is_supervisor(supervisor):
                roots.append(supervisor)
        except psutil.NoSuchProcess:
            pass
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


def _supervise(port: int, nodes: int, temp_dir: str, state_file: str) -> None:
    """The detached process that holds the cluster: `ray.cluster_utils.Cluster` (every socket on loopback),
    the state file written once all nodes are up, everything stopped on SIGTERM."""
    import signal
    import threading

    from ray.cluster_utils import Cluster

    Path("/tmp/ray").mkdir(exist_ok=True)  # where Ray notes the newest cluster's address (RAY_ADDRESS=auto)
    state = Path(state_file)
    node: dict[str, Any] = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "resources": {SHARD_RESOURCE: SLOTS_PER_NODE}}
    head = {**node, "temp_dir": temp_dir, "gcs_server_port": port, "include_dashboard": False}
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=head)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        state.write_text(json.dumps({"address": cluster.address, "temp_dir": temp_dir, "pid": os.getpid()}))
        stopping.wait()
    finally:
        cluster.shutdown()


def up(data_dir: Path, nodes: int, port: int, timeout_s: float = 300) -> LocalCluster:
    """Start the supervisor (detached: a session of its own) and wait until it says the nodes are up; the
    state is kept in DATA_DIR/cluster.json."""
    state = data_dir / STATE_FILE
    if state.exists():
        raise AppError(f"a cluster is already up ({json.loads(state.read_text())['address']}): cluster down first")
    temp_dir = f"/tmp/imsrc-ray-{port}"
    log = data_dir / "cluster.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    code = f"from backend.cluster.local import _supervise; _supervise({port}, {nodes}, {temp_dir!r}, {str(state)!r})"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not state.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(LocalCluster(f"127.0.0.1:{port}", temp_dir, proc.pid))
            raise AppError(f"the cluster did not start: {log.read_text(errors='replace')[-1500:]}")
        time.sleep(0.3)
    cluster = read_state(data_dir)
    assert cluster is not None
    return cluster


def read_state(data_dir: Path) -> LocalCluster | None:
    state = data_dir / STATE_FILE
    if not state.exists():
        return None
    raw = json.loads(state.read_text())
    return LocalCluster(raw["address"], raw["temp_dir"], raw["pid"])


def stop(cluster: LocalCluster, grace_s: float = 15.0) -> int:
    """SIGTERM the supervisor (it shuts its nodes down), then SIGKILL whatever of the cluster is left; the
    number of processes it had."""
    procs = cluster.processes()
    supervisor = [p for p in procs if p.pid == cluster.pid and _is_supervisor(p)]
    for p in supervisor:
        p.terminate()
    psutil.wait_procs(supervisor, timeout=grace_s)
    deadline = time.monotonic() + grace_s  # what it left, and children started meanwhile (a worker respawned)
    while (left := [p for p in cluster.processes() if p.pid != cluster.pid or _is_supervisor(p)]) and time.monotonic() < deadline:
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=1)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return len(procs)


def _is_supervisor(p: psutil.Process) -> bool:
    """Not another process that got the supervisor's id after a restart of the machine."""
    try:
        return any("_supervise" in arg for arg in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def down(data_dir: Path) -> int:
    cluster = read_state(data_dir)
    if cluster is None:
        raise AppError(f"no cluster is up (no {data_dir / STATE_FILE})")
    stopped = stop(cluster)
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped
