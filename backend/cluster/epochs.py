"""The shard actors of one catalogue and model, epoch by epoch: joining the cluster, starting (or finding) an
epoch's replicas and waiting until they are built, catching them up to a change, and retiring old epochs —
each replica drops its cache directory on its own node, then it is killed, then the epoch is marked retired.
The router (router.py) and the rebalancer (rebalance.py) both use them."""

import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray._private import ray_constants
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from backend.cluster.local import SHARD_RESOURCE  # nodes that declare it hold shards; without any, every node does
from backend.cluster.packing import bin_pack
from backend.cluster.shard import PROTOCOL, ShardActor
from backend.core.config import Settings
from backend.index.layout import IndexLayout
from backend.storage import catalogue, change_log, shards
from backend.storage.engine import session_scope

log = logging.getLogger(__name__)

NAMESPACE = "imsrc"
GROUPS_PER_NODE = 2
DROP_TIMEOUT_S = 30.0  # a retiring replica's own clean-up; it is killed after this either way
_Shard = ray.remote(ShardActor)


def connect(address: str) -> None:
    """Join the cluster as a driver (no resources of ours); on loopback every socket of ours stays there."""
    if ray.is_initialized():
        return
    loopback = address.rpartition(":")[0] in ("127.0.0.1", "localhost")
    extra: dict[str, Any] = {}
    if loopback:  # Ray would swap a loopback address for the machine's own, where a local cluster does not listen
        ray_constants.ENABLE_RAY_CLUSTER = False  # its switch for "this machine's address is 127.0.0.1"
        extra["_node_ip_address"] = "127.0.0.1"
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False, **extra)


def shard_nodes() -> list[dict[str, Any]]:
    """Alive nodes with a shard slot (all alive nodes where none declares one), in a stable order."""
    alive = sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: n["NodeID"])
    return [n for n in alive if n["Resources"].get(SHARD_RESOURCE)] or alive


def default_groups(settings: Settings) -> int:
    """SHARD_GROUPS, or 2 per node that holds shards now."""
    return settings.shard_groups or GROUPS_PER_NODE * len(shard_nodes())


@dataclass(frozen=True)
class Epoch:
    """One epoch as a router uses it: the assignment and each group's replica handles, replaced as one object
    so that a search reads both from the same epoch."""

    assignment: shards.Assignment
    replicas: dict[int, list[Any]]

    @property
    def number(self) -> int:
        return self.assignment.epoch


@dataclass(frozen=True)
class ShardFleet:
    settings: Settings
    db: Engine
    model: str
    dim: int
    layout: IndexLayout
    prefix: str  # imsrc-p<protocol>-<catalogue>-<model>: actor names and cache directories start with it

    @classmethod
    def of(cls, settings: Settings, db: Engine, model: str, dim: int, layout: IndexLayout) -> "ShardFleet":
        with session_scope(db) as session:
            catalogue_id = change_log.identity(session).catalogue_id
        # The protocol version in the name: actors left by an older release (other methods) are never reused.
        prefix = f"imsrc-p{PROTOCOL}-{catalogue_id[:8]}-{re.sub(r'[^A-Za-z0-9]+', '_', model)}"
        return cls(settings, db, model, dim, layout, prefix)

    def name(self, epoch: int, group: int, replica: int) -> str:
        return f"{self.prefix}-e{epoch}-g{group}-r{replica}"

    @property
    def shard_dir(self) -> Path:
        return self.settings.index_dir / "shards"

    def packing(self, session: Session, groups: int) -> tuple[dict[int, int], dict[int, int]]:
        """Every category packed into `groups` groups by its vectors of this model now, and those counts."""
        vectors = {c: 0 for c in catalogue.category_ids(session).values()}
        vectors.update(catalogue.category_vector_counts(session, self.model))
        return bin_pack(vectors, groups), vectors

    def replicas_of(self, assignment: shards.Assignment) -> int:
        return assignment.replicas or self.settings.shard_replicas

    def start(self, assignment: shards.Assignment, timeout_s: float = 300) -> Epoch:
        """The epoch's replicas, created where missing (replicas of a group on different nodes while there are
        enough), then waited for: each builds its part of the index before it answers."""
        nodes, r_count = shard_nodes(), self.replicas_of(assignment)
        resources = {SHARD_RESOURCE: 1} if any(n["Resources"].get(SHARD_RESOURCE) for n in nodes) else {}
        url = self.db.url.render_as_string(hide_password=False)
        refresh_s = max(0.2, self.settings.index_refresh_seconds or 1.0)
        out: dict[int, list[Any]] = {}
        for g in range(assignment.groups):
            out[g] = []
            for r in range(r_count):
                node = nodes[(g * r_count + r) % len(nodes)]
                name = self.name(assignment.epoch, g, r)
                handle = _Shard.options(
                    name=name,
                    namespace=NAMESPACE,
                    lifetime="detached",
                    get_if_exists=True,
                    max_restarts=-1,
                    max_task_retries=-1,
                    max_concurrency=4,
                    num_cpus=0,
                    resources=resources,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=True),
                ).remote(
                    url,
                    self.settings.db_timeout_seconds,
                    self.model,
                    self.dim,
                    self.layout,
                    str(self.shard_dir / name),
                    assignment.categories(g),
                    refresh_s,
                )
                out[g].append(handle)
        ray.get([h.info.remote() for hs in out.values() for h in hs], timeout=timeout_s)
        return Epoch(assignment, out)

    def catch_up(self, epoch: Epoch, seq: int, timeout_s: float) -> None:
        """Every replica of `epoch` has applied the change log up to `seq` (raises when one has not in time)."""
        ray.get([h.catch_up.remote(seq) for hs in epoch.replicas.values() for h in hs], timeout=timeout_s)

    def retire(self, epochs: Sequence[int], active: int) -> int:
        """Kill the actors of `epochs` (older than the `active` one), each dropping its cache directory first;
        mark the epochs retired; remove what is left on this machine of every directory of an epoch older
        than `active`. One process at a time does it (routers and the rebalancer may all try), holding no
        transaction through the Ray waits; the number of actors killed."""
        with shards.retirement_claimed(self.db) as claimed:
            if not claimed:
                return 0
            handles = self._actors_of(epochs)
            drops: list[Any] = []
            for h in handles:
                try:
                    drops.append(h.drop.remote())
                except (AttributeError, RayError):  # an actor of another release, or gone: killed anyway
                    continue
            if drops:
                ray.wait(drops, num_returns=len(drops), timeout=DROP_TIMEOUT_S)
            for h in handles:
                try:
                    ray.kill(h)
                except (AttributeError, RayError, ValueError):
                    continue
            with session_scope(self.db) as session:
                shards.retired(session, list(epochs))
        # A replica that was dead or restarting did not drop its own directory, nor did epochs' replicas
        # that were killed by hand.
        for directory in self.shard_dir.glob(f"{self.prefix}-e*-g*"):
            made_at = re.fullmatch(rf"{re.escape(self.prefix)}-e(\d+)-g\d+-r\d+", directory.name)
            if made_at and int(made_at.group(1)) < active:
                shutil.rmtree(directory, ignore_errors=True)
        log.info("cluster: epochs %s retired, %d actors killed", list(epochs), len(handles))
        return len(handles)

    def _actors_of(self, epochs: Sequence[int]) -> list[Any]:
        """Handles of the named actors of `epochs` that exist now."""
        handles: list[Any] = []
        named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
        for name in named:
            if any(name.startswith(f"{self.prefix}-e{e}-g") for e in epochs):
                try:
                    handles.append(ray.get_actor(name, namespace=NAMESPACE))
                except ValueError:  # gone meanwhile
                    continue
        return handles
