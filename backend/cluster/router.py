"""Stage 2 on a Ray cluster, as the API server sees it: the group assignment (kept in PostgreSQL per epoch;
a newer active epoch, made by a rebalance, is followed within seconds), the shard actors (found by name,
created where missing, epochs.py), and each query sent only to the groups holding its
top categories — one replica each, the other one too when the first is slow or fails — merged by exact score.
A group with no answer by SHARD_DEADLINE_SECONDS is left out and the result says so (partial), never a 500."""

import itertools
import logging
import threading
import time
import uuid
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError
from sqlalchemy import Engine

from backend.cluster.epochs import Epoch, ShardFleet, connect, default_groups
from backend.cluster.shard import ShardAnswer, pack, unpack
from backend.core.config import SHARD_EPOCH_CHECK_S, Settings
from backend.core.errors import AppError
from backend.index.category_index import CategoryIndex, SearchHits
from backend.index.layout import IndexLayout
from backend.search.stage2 import Stage2Hits
from backend.storage import shards
from backend.storage.engine import session_scope

log = logging.getLogger(__name__)

SLOW_FOR_S = 10.0  # a replica that missed a hedge (dead, restarting, overloaded) is asked last this long
PAD = -(2**62)  # no category in this slot (category id -1 is "no category")
SWITCH_START_S = 120.0  # finding a new epoch's replicas (built already); under shards.ROUTER_SEEN_S


class RayStage2:
    engine = "ray"

    def __init__(self, settings: Settings, engine: Engine, model: str, dim: int, layout: IndexLayout) -> None:
        assert settings.ray_address
        self.settings, self.db = settings, engine
        connect(settings.ray_address)
        self.fleet = ShardFleet.of(settings, engine, model, dim, layout)
        self._turn = itertools.count()
        # (epoch, group, replica) that missed a hedge: asked last for a while. The epoch in the key: searches
        # of the old epoch still under way after a switch do not mark the new epoch's replicas.
        self._slow_until: dict[tuple[int, int, int], float] = {}
        self._lock = threading.Lock()
        self._written = 0  # this server's newest write: a new epoch catches up to it before it is used
        self._incoming: Epoch | None = None  # an epoch being switched to: writes catch it up too
        self.router_id = uuid.uuid4().hex  # reported with the epoch searched on (shard_routers)
        self.epoch = self.fleet.start(self._ensure_assignment())  # replaced whole when a newer epoch is active
        self._left: tuple[int, float] = (self.epoch.number, 0.0)  # the epoch searched on before, until when
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow_epochs, name="follow-epochs", daemon=True)
        self._follower.start()

    # --- the groups and their actors ---------------------------------------------------------------

    @property
    def assignment(self) -> shards.Assignment:
        return self.epoch.assignment

    @property
    def replicas(self) -> dict[int, list[Any]]:
        return self.epoch.replicas

    def _ensure_assignment(self) -> shards.Assignment:
        """The newest active epoch; the first server to start packs the first one, active at once (after any
        epoch stored but never activated: a rebalance interrupted before any server ran)."""
        for _ in range(3):
            with session_scope(self.db) as session:
                current = shards.newest(session)
                if current.epoch:
                    return current
                groups = default_groups(self.settings)
                packed, vectors = self.fleet.packing(session, groups)
                expected = shards.newest_epoch(session)
                made = shards.store(session, packed, vectors, expected, groups, self.settings.shard_replicas)
            if made.state == shards.ACTIVE:  # ours, or another server's stored meanwhile
                log.info("cluster: epoch %d, %d categories in %d groups", made.epoch, len(made.group_of), made.groups)
                return made
        raise AppError("no active cluster epoch: new epochs kept being stored while this server started")

    def actor_name(self, epoch: int, group: int, replica: int) -> str:
        return self.fleet.name(epoch, group, replica)

    def _follow_epochs(self) -> None:
        failing = False
        while not self._stop.wait(SHARD_EPOCH_CHECK_S):
            try:
                self.follow_epochs()
            except Exception as exc:  # the database or the cluster away for a while: searches go on from this epoch
                if not failing:  # one line when it starts failing, one when it recovers
                    log.warning("cluster: following the epochs failed (%s: %s); retrying", type(exc).__name__, exc)
                failing = True
                continue
            if failing:
                log.warning("cluster: following the epochs resumed")
            failing = False

    def follow_epochs(self) -> None:
        """Report the epoch searched on; switch to a newer active epoch (a rebalance made it); once it has
        been active for the grace period and no router seen lately is on an older one, retire the older ones
        (every router may, one at a time; the rebalancer does too)."""
        old, until = self._left  # searches under way on the epoch left last end within a deadline
        on = old if time.monotonic() < until else self.epoch.number
        with session_scope(self.db) as session:
            shards.router_seen(session, self.router_id, on)
            seen = shards.epochs(session)
        if seen.active > self.epoch.number:
            self._switch(seen.active)
        if seen.retirable and seen.active == self.epoch.number and seen.active_for_s >= self.settings.shard_grace_seconds:
            self.fleet.retire(seen.retirable, seen.active)

    def _switch(self, number: int) -> None:
        """The new epoch's replicas (built and caught up by the rebalancer), brought up to this server's own
        writes, then swapped in as one object: searches under way finish on the old epoch. Writes from the
        moment it is incoming catch it up themselves (`catch_up`), so one catch-up here covers the rest."""
        with session_scope(self.db) as session:
            assignment = shards.newest(session, number)
        new = self.fleet.start(assignment, timeout_s=SWITCH_START_S)
        with self._lock:
            self._incoming, written = new, self._written
        try:
            self.fleet.catch_up(new, written, self.settings.shard_deadline_seconds * 2)
            with self._lock:
                old = self.epoch.number
                self.epoch, self._incoming, self._slow_until = new, None, {}
        finally:
            self._incoming = None
        self._left = (old, time.monotonic() + self.settings.shard_deadline_seconds)
        log.info("cluster: now on epoch %d (%d groups)", new.number, assignment.groups)

    # --- searching ------------------------------------------------------------------------------

    def search(
        self, index: CategoryIndex, queries: np.ndarray, k: int, searched: np.ndarray | None, nprobe: int | None, shortlist: int
    ) -> Stage2Hits:
        ep = self.epoch  # one epoch for the whole search: a switch meanwhile does not mix two epochs' groups
        per_group = self._split(ep, index, searched, len(queries))
        answers = self._ask(ep, per_group, queries, k, nprobe, shortlist)
        left_out: list[list[int]] = [[] for _ in queries]
        for g, cats in per_group.items():
            if g not in answers:
                for q in range(len(queries)):
                    row = ep.assignment.categories(g).owned if cats is None else cats[q][cats[q] != PAD].tolist()
                    left_out[q] += sorted(int(c) for c in row)
        return Stage2Hits(_merge(list(answers.values()), len(queries), k), left_out)

    def _split(self, ep: Epoch, index: CategoryIndex, searched: np.ndarray | None, n: int) -> dict[int, np.ndarray | None]:
        """Per group that holds any of the queries' categories, those categories (ids, PAD elsewhere)."""
        if searched is None:
            return {g: None for g in range(ep.assignment.groups)}
        ids = np.asarray(index.category_ids, dtype=np.int64)
        cats = np.where(searched >= 0, ids[np.clip(searched, 0, None)] if len(ids) else PAD, PAD)
        group = np.vectorize(ep.assignment.group_for, otypes=[np.int64])(cats) if cats.size else cats
        return {int(g): np.where((group == g) & (cats != PAD), cats, PAD) for g in np.unique(group[cats != PAD])}

    def _ask(
        self, ep: Epoch, per_group: dict[int, np.ndarray | None], queries: np.ndarray, k: int, nprobe: int | None, shortlist: int
    ) -> dict[int, ShardAnswer]:
        """Each group's answer from one replica; the next replica is asked too when the first fails or has
        not answered within a quarter of the deadline. Groups with no answer by the deadline are missing."""
        start = time.monotonic()
        deadline, hedge_at = start + self.settings.shard_deadline_seconds, start + self.settings.shard_deadline_seconds / 4
        tried = {g: 0 for g in per_group}
        first = next(self._turn)
        requests = {g: pack((queries, k, cats, nprobe, shortlist)) for g, cats in per_group.items()}
        pending: dict[Any, int] = {}
        order = {g: self._order(ep.number, len(ep.replicas[g]), g, first, start) for g in per_group}

        def send(g: int) -> None:
            if tried[g] < len(order[g]):
                r = order[g][tried[g]]
                tried[g] += 1
                pending[ep.replicas[g][r].search.remote(requests[g])] = g

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
                    self._slow_until[(ep.number, g, order[g][0])] = time.monotonic() + SLOW_FOR_S
                    send(g)
        for ref in pending:
            ray.cancel(ref)
        return answers

    def _order(self, epoch: int, n: int, g: int, turn: int, now: float) -> list[int]:
        """The group's `n` replicas in the order to ask them: taking turns, those slow lately last."""
        turns = [(turn + i) % n for i in range(n)]
        return sorted(turns, key=lambda r: self._slow_until.get((epoch, g, r), 0.0) > now)

    # --- following writes, status ----------------------------------------------------------------

    def catch_up(self, seq: int) -> None:
        """Every replica applies the change log up to `seq` before the writer answers (read-your-writes); a
        replica that is restarting builds from the database anyway."""
        with self._lock:  # an epoch being switched to is caught up to `seq` as well
            self._written = max(self._written, seq)
            epochs = [self.epoch] if self._incoming is None else [self.epoch, self._incoming]
        refs = [h.catch_up.remote(seq) for ep in epochs for hs in ep.replicas.values() for h in hs]
        ray.wait(refs, num_returns=len(refs), timeout=self.settings.shard_deadline_seconds * 2)

    def status(self) -> dict[str, Any]:
        ep = self.epoch
        with session_scope(self.db) as session:
            pending = shards.epochs(session).pending
        groups = []
        for g, handles in ep.replicas.items():
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
                replicas.append({"name": self.actor_name(ep.number, g, r), **info})
            owned = sorted(ep.assignment.categories(g).owned)
            packed = sum(ep.assignment.vectors.get(c, 0) for c in owned)
            groups.append({"group": g, "categories": owned, "vectors_packed": packed, "replicas": replicas})
        return {"address": self.settings.ray_address, "epoch": ep.number, "pending_epoch": pending, "groups": groups}

    def close(self) -> None:
        """The actors are detached: they outlive this server and serve the next one. This router no longer
        holds back the retirement of the epoch it was on."""
        self._stop.set()
        self._follower.join(timeout=SHARD_EPOCH_CHECK_S + 2 * self.settings.shard_deadline_seconds + 5)
        try:
            with session_scope(self.db) as session:
                shards.router_gone(session, self.router_id)
        except Exception as exc:  # the database away: the row ages out after shards.ROUTER_SEEN_S
            log.warning("cluster: could not remove this router's row (%s)", exc)


def _merge(answers: list[ShardAnswer], n: int, k: int) -> SearchHits:
    """The k best of every group's k best, by exact score."""
    if not answers:
        return SearchHits(np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64), np.zeros(n, np.int64))
    scores = np.concatenate([a[0] for a in answers], axis=1)
    ids = np.concatenate([a[1] for a in answers], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scanned = np.sum([a[2] for a in answers], axis=0)
    return SearchHits(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1), scanned)
