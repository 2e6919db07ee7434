"""Stage 2 on a Ray cluster, as the API server sees it: the group assignment (made once, kept in PostgreSQL),
the shard actors (found by name, created where missing), and each query sent only to the groups holding its
top categories — one replica each, the other one too when the first is slow or fails — merged by exact score.
A group with no answer by SHARD_DEADLINE_SECONDS is left out and the result says so (partial), never a 500."""

import itertools
import logging
import re
import threading
import time
from typing import Any

import numpy as np
import ray
from ray._private import ray_constants
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from sqlalchemy import Engine

from backend.cluster.local import SHARD_RESOURCE  # nodes that declare it hold shards; without any, every node does
from backend.cluster.packing import bin_pack
from backend.cluster.shard import ShardActor, ShardAnswer, pack, unpack
from backend.core.config import Settings
from backend.index.category_index import CategoryIndex, SearchHits
from backend.index.layout import IndexLayout
from backend.search.stage2 import Stage2Hits
from backend.storage import catalogue, change_log, shards
from backend.storage.engine import session_scope

log = logging.getLogger(__name__)

NAMESPACE = "imsrc"
GROUPS_PER_NODE = 2
SLOW_FOR_S = 10.0  # a replica that missed a hedge (dead, restarting, overloaded) is asked last this long
PAD = -(2**62)  # no category in this slot (category id -1 is "no category")
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


class RayStage2:
    engine = "ray"

    def __init__(self, settings: Settings, engine: Engine, model: str, dim: int, layout: IndexLayout) -> None:
        assert settings.ray_address
        self.settings, self.db, self.model, self.dim, self.layout = settings, engine, model, dim, layout
        connect(settings.ray_address)
        with session_scope(engine) as session:
            catalogue_id = change_log.identity(session).catalogue_id
        self.prefix = f"imsrc-{catalogue_id[:8]}-{re.sub(r'[^A-Za-z0-9]+', '_', model)}"
        self._turn = itertools.count()
        self._slow_until: dict[tuple[int, int], float] = {}  # (group, replica) that missed a hedge: asked last for a while
        self._lock = threading.Lock()
        self.assignment = self._ensure_assignment()
        self.replicas = self._ensure_actors(self.assignment)

    # --- the groups and their actors ---------------------------------------------------------------

    def _ensure_assignment(self) -> shards.Assignment:
        with session_scope(self.db) as session:
            current = shards.newest(session)
            if current.epoch:
                return current
            groups = self.settings.shard_groups or GROUPS_PER_NODE * len(shard_nodes())
            vectors = {c: 0 for c in catalogue.category_ids(session).values()}
            vectors.update(catalogue.category_vector_counts(session, self.model))
            made = shards.store(session, bin_pack(vectors, groups), vectors, expected_epoch=0)
        log.info("cluster: epoch %d, %d categories in %d groups", made.epoch, len(made.group_of), made.groups)
        return made

    def actor_name(self, epoch: int, group: int, replica: int) -> str:
        return f"{self.prefix}-e{epoch}-g{group}-r{replica}"

    def _ensure_actors(self, assignment: shards.Assignment) -> dict[int, list[Any]]:
        """Each group's SHARD_REPLICAS actors, created where missing (replicas of a group on different nodes
        while there are enough), then waited for: each builds its part of the index before it answers."""
        nodes, r_count = shard_nodes(), self.settings.shard_replicas
        resources = {SHARD_RESOURCE: 1} if any(n["Resources"].get(SHARD_RESOURCE) for n in nodes) else {}
        url = self.db.url.render_as_string(hide_password=False)
        out: dict[int, list[Any]] = {}
        for g in range(assignment.groups):
            out[g] = []
            for r in range(r_count):
                node = nodes[(g * r_count + r) % len(nodes)]
                directory = self.settings.index_dir / "shards" / f"{self.prefix}-e{assignment.epoch}-g{g}-r{r}"
                handle = _Shard.options(
                    name=self.actor_name(assignment.epoch, g, r),
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
                    str(directory),
                    assignment.categories(g),
                    max(0.2, self.settings.index_refresh_seconds or 1.0),
                )
                out[g].append(handle)
        ray.get([h.info.remote() for hs in out.values() for h in hs], timeout=300)
        return out

    # --- searching ------------------------------------------------------------------------------

    def search(
        self, index: CategoryIndex, queries: np.ndarray, k: int, searched: np.ndarray | None, nprobe: int | None, shortlist: int
    ) -> Stage2Hits:
        per_group = self._split(index, searched, len(queries))
        answers = self._ask(per_group, queries, k, nprobe, shortlist)
        left_out: list[list[int]] = [[] for _ in queries]
        for g, cats in per_group.items():
            if g not in answers:
                for q in range(len(queries)):
                    row = self.assignment.categories(g).owned if cats is None else cats[q][cats[q] != PAD].tolist()
                    left_out[q] += sorted(int(c) for c in row)
        return Stage2Hits(_merge(list(answers.values()), len(queries), k), left_out)

    def _split(self, index: CategoryIndex, searched: np.ndarray | None, n: int) -> dict[int, np.ndarray | None]:
        """Per group that holds any of the queries' categories, those categories (ids, PAD elsewhere)."""
        if searched is None:
            return {g: None for g in range(self.assignment.groups)}
        ids = np.asarray(index.category_ids, dtype=np.int64)
        cats = np.where(searched >= 0, ids[np.clip(searched, 0, None)] if len(ids) else PAD, PAD)
        group = np.vectorize(self.assignment.group_for, otypes=[np.int64])(cats) if cats.size else cats
        return {int(g): np.where((group == g) & (cats != PAD), cats, PAD) for g in np.unique(group[cats != PAD])}

    def _ask(
        self, per_group: dict[int, np.ndarray | None], queries: np.ndarray, k: int, nprobe: int | None, shortlist: int
    ) -> dict[int, ShardAnswer]:
        """Each group's answer from one replica; the next replica is asked too when the first fails or has
        not answered within a quarter of the deadline. Groups with no answer by the deadline are missing."""
        start = time.monotonic()
        deadline, hedge_at = start + self.settings.shard_deadline_seconds, start + self.settings.shard_deadline_seconds / 4
        tried = {g: 0 for g in per_group}
        first = next(self._turn)
        requests = {g: pack((queries, k, cats, nprobe, shortlist)) for g, cats in per_group.items()}
        pending: dict[Any, int] = {}
        order = {g: self._order(g, first, start) for g in per_group}

        def send(g: int) -> None:
            if tried[g] < len(order[g]):
                r = order[g][tried[g]]
                tried[g] += 1
                pending[self.replicas[g][r].search.remote(requests[g])] = g

        for g in per_group:
            send(g)
        answers: dict[int, ShardAnswer] = {}
        while pending and len(answers) < len(per_group):
            now = time.monotonic()
            if now >= deadline:
                break
            wait_for = (hedge_at if now < hedge_at else deadline) - now
            # One wake-up when every group answered (a failed call is ready at once too); one at a time while
            # a group has two replicas asked, the first answer of the two being enough.
            hedged = len(pending) > len(set(pending.values()))
            ready, _ = ray.wait(list(pending), num_returns=1 if hedged else len(pending), timeout=wait_for)
            for ref in ready:
                g = pending.pop(ref)
                try:
                    if g not in answers:
                        answers[g] = unpack(ray.get(ref))
                except RayError as exc:
                    log.warning("cluster: group %d replica failed (%s); asking another", g, type(exc).__name__)
                    send(g)
            for ref in [ref for ref, g in pending.items() if g in answers]:  # the slower of two replicas
                del pending[ref]
                ray.cancel(ref)
            if time.monotonic() >= hedge_at:
                for g in {g for g in per_group if g not in answers and tried[g] == 1}:
                    self._slow_until[(g, order[g][0])] = time.monotonic() + SLOW_FOR_S
                    send(g)
        for ref in pending:
            ray.cancel(ref)
        return answers

    def _order(self, g: int, turn: int, now: float) -> list[int]:
        """The group's replicas in the order to ask them: taking turns, those slow lately last."""
        n = len(self.replicas[g])
        turns = [(turn + i) % n for i in range(n)]
        return sorted(turns, key=lambda r: self._slow_until.get((g, r), 0.0) > now)

    # --- following writes, status ----------------------------------------------------------------

    def catch_up(self, seq: int) -> None:
        """Every replica applies the change log up to `seq` before the writer answers (read-your-writes); a
        replica that is restarting builds from the database anyway."""
        refs = [h.catch_up.remote(seq) for hs in self.replicas.values() for h in hs]
        ray.wait(refs, num_returns=len(refs), timeout=self.settings.shard_deadline_seconds * 2)

    def status(self) -> dict[str, Any]:
        groups = []
        for g, handles in self.replicas.items():
            refs = [h.info.remote() for h in handles]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2)
            replicas = []
            for r, ref in enumerate(refs):
                info: dict[str, Any] = {"state": "unreachable"}
                if ref in ready:
                    try:
                        info = ray.get(ref)
                    except RayError as exc:
                        info = {"state": f"failed: {type(exc).__name__}"}
                replicas.append({"name": self.actor_name(self.assignment.epoch, g, r), **info})
            owned = sorted(self.assignment.categories(g).owned)
            packed = sum(self.assignment.vectors.get(c, 0) for c in owned)
            groups.append({"group": g, "categories": owned, "vectors_packed": packed, "replicas": replicas})
        return {"address": self.settings.ray_address, "epoch": self.assignment.epoch, "groups": groups}

    def close(self) -> None:
        """The actors are detached: they outlive this server and serve the next one."""


def _merge(answers: list[ShardAnswer], n: int, k: int) -> SearchHits:
    """The k best of every group's k best, by exact score."""
    if not answers:
        return SearchHits(np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64), np.zeros(n, np.int64))
    scores = np.concatenate([a[0] for a in answers], axis=1)
    ids = np.concatenate([a[1] for a in answers], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scanned = np.sum([a[2] for a in answers], axis=0)
    return SearchHits(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1), scanned)
