"""Rebalancing (`cluster rebalance`): the categories packed again by their vector counts over a new number of
groups and the shard nodes there are now, stored as a new epoch that is `building`; its replicas started and
built, then caught up to the change log's newest change; the epoch made active. Routers switch to it within
a second or two while the old epoch still answers; once the new epoch has been active SHARD_GRACE_SECONDS
and every server seen lately reports it, the old epoch's actors are killed and their cache directories removed.

Two rebalancers at once: the one that stores its epoch first wins; the other stops with an error (or, when it
asked for the same packing, waits for that epoch with it). An epoch stored later than one being built makes
that one lose at activation; the abandoned epoch's actors are retired with the next older ones."""

import time
from collections.abc import Callable
from dataclasses import dataclass

from backend.cluster.epochs import ShardFleet, default_groups
from backend.core.errors import AppError
from backend.storage import change_log, shards
from backend.storage.engine import session_scope


@dataclass(frozen=True)
class Rebalanced:
    old: int  # the epoch active before (0: none)
    new: int
    groups: int
    replicas: int
    build_s: float  # from storing the epoch to its being active
    killed: int  # the old epochs' actors killed after the grace period (0 when not waited for)


def rebalance(fleet: ShardFleet, groups: int | None, timeout_s: float, retire: bool, say: Callable[[str], None]) -> Rebalanced:
    """Build a new epoch over `groups` groups (default SHARD_GROUPS, else 2 per shard node), make it active;
    with `retire`, wait for the grace period and retire the old epochs."""
    groups = groups or default_groups(fleet.settings)
    start = time.monotonic()
    with session_scope(fleet.db) as session:
        old = shards.newest(session).epoch
        packed, vectors = fleet.packing(session, groups)
        expected = shards.newest_epoch(session)
        made = shards.store(session, packed, vectors, expected, groups, fleet.settings.shard_replicas, shards.BUILDING)
    if made.state != shards.BUILDING or made.group_of != packed or made.groups != groups:
        raise AppError(f"another rebalance stored epoch {made.epoch} meanwhile; it wins: nothing done")
    replicas = fleet.replicas_of(made)
    say(f"epoch {made.epoch}: {len(packed)} categories in {groups} groups x {replicas} replicas (was epoch {old}); building")
    epoch = fleet.start(made, timeout_s)
    with session_scope(fleet.db) as session:
        seq = change_log.latest_seq(session, fleet.model)
    fleet.catch_up(epoch, seq, timeout_s)
    with session_scope(fleet.db) as session:
        if not shards.activate(session, made.epoch):
            raise AppError(f"epoch {made.epoch} was superseded by a newer one while it was built")
    build_s = time.monotonic() - start
    say(f"epoch {made.epoch} active after {build_s:.1f}s (replicas caught up to change {seq}); routers follow")
    killed = retire_when_due(fleet, made.epoch, say) if retire else 0
    return Rebalanced(old, made.epoch, groups, replicas, build_s, killed)


def retire_when_due(fleet: ShardFleet, active: int, say: Callable[[str], None]) -> int:
    """Wait until `active` has been active for the grace period, then retire the older epochs (a router may
    do it first: then wait for it); the actors killed here."""
    killed, told = 0, False
    while True:
        with session_scope(fleet.db) as session:
            seen = shards.epochs(session)
        if seen.active != active:
            say(f"epoch {seen.active} is active now: the old epochs are left to its rebalancer and the servers")
            return killed
        if not seen.draining:
            by = f"{killed} actors killed" if killed else "by a server"
            say(f"old epochs retired ({by}); their cache directories removed")
            return killed
        left = fleet.settings.shard_grace_seconds - seen.active_for_s
        if left > 0:
            say(f"old epochs {list(seen.draining)} are retired in {left:.0f}s (SHARD_GRACE_SECONDS)")
            time.sleep(min(left, 10.0))
            continue
        if not seen.retirable:  # a server still searches on an old epoch (its switch under way or stalled)
            if not told:
                say(f"old epochs {list(seen.draining)}: waiting for every server to switch to epoch {active}")
            told = True
            time.sleep(2.0)
            continue
        done = fleet.retire(seen.retirable, active)
        killed += done
        if not done:  # another process holds the retirement, or there was nothing left to kill
            time.sleep(1.0)
