"""The cluster's category groups in the database: which group holds each category, per epoch (table
shard_assignments, migration 0009), and each epoch's state (table shard_epochs, migration 0010): `building`
while a rebalance makes its replicas, `active` once they are caught up (routers use the newest active epoch;
an older active one drains), `retired` when its actors are gone. Epochs only grow. A category created after
an epoch was packed belongs to group |id| mod groups, by the same rule in SQL (`CategorySet.sql`) and in
Python (`CategorySet.contains`). Each router reports the epoch it searches on (table shard_routers); older
epochs are retired only below the lowest one reported lately. Functions take a Session and never commit (the retirement claim
takes the Engine: it holds a lock, not a transaction)."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Engine, and_, delete, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from backend.storage.schema import ShardAssignment, ShardEpoch, ShardRouter

# New epochs are written under this transaction-level advisory lock, so two servers starting at once agree.
ASSIGNMENT_LOCK = 7305104230
RETIRE_LOCK = 7305104231  # one retirer at a time (routers and rebalancers all try)
BUILDING, ACTIVE, RETIRED = "building", "active", "retired"
# A router not seen this long is taken for gone (crashed): its epoch no longer holds back retirement. Longer
# than a router's epoch switch may block its reports (the start and catch-up of the new epoch's replicas).
ROUTER_SEEN_S = 300.0


@dataclass(frozen=True)
class CategorySet:
    """The categories one group holds at one epoch: those assigned to it, and new ones by the modulo rule."""

    owned: frozenset[int]
    known: frozenset[int]  # every category the epoch assigned, to any group
    groups: int
    group: int

    def contains(self, category_id: int) -> bool:
        if category_id in self.known:
            return category_id in self.owned
        return abs(category_id) % self.groups == self.group

    def where(self, column: ColumnElement[int]) -> ColumnElement[bool]:
        """The same condition as `contains`, for a query."""
        new = and_(column.not_in(sorted(self.known)), func.mod(func.abs(column), self.groups) == self.group)
        return or_(column.in_(sorted(self.owned)), new)

    def sql(self, column: str) -> tuple[str, list[object]]:
        """A psycopg (%s) condition on `column` (a category id, -1 for none) and its parameters."""
        clause = f"({column} = ANY(%s) OR (NOT {column} = ANY(%s) AND abs({column}) %% %s = %s))"
        return clause, [sorted(self.owned), sorted(self.known), self.groups, self.group]


@dataclass(frozen=True)
class Assignment:
    epoch: int  # 0: none stored yet
    groups: int
    group_of: dict[int, int]  # category id -> group
    vectors: dict[int, int]  # category id -> vectors when packed
    replicas: int | None = None  # actors per group; None: not stored (the server's SHARD_REPLICAS)
    state: str = ACTIVE

    def categories(self, group: int) -> CategorySet:
        owned = frozenset(c for c, g in self.group_of.items() if g == group)
        return CategorySet(owned, frozenset(self.group_of), self.groups, group)

    def group_for(self, category_id: int) -> int:
        got = self.group_of.get(category_id)
        return abs(category_id) % self.groups if got is None else got


@dataclass(frozen=True)
class Epochs:
    """What a router checks every few seconds, in one query over the epochs not retired."""

    active: int  # the newest active epoch (0: none)
    active_for_s: float  # since it became active
    pending: int | None  # a newer epoch being built
    draining: tuple[int, ...]  # older epochs not retired yet (superseded, or abandoned while building)
    retirable: tuple[int, ...] = ()  # those of `draining` below every epoch a router seen lately reports


def epochs(session: Session) -> Epochs:
    age = func.extract("epoch", func.now() - ShardEpoch.activated_at)
    rows = session.execute(select(ShardEpoch.epoch, ShardEpoch.state, age).where(ShardEpoch.state != RETIRED)).all()
    active = max((e for e, state, _ in rows if state == ACTIVE), default=0)
    active_for = next((float(a) for e, _, a in rows if e == active), 0.0)
    pending = max((e for e, state, _ in rows if state == BUILDING and e > active), default=None)
    draining = tuple(sorted(e for e, _, _ in rows if e < active))
    lately = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, ROUTER_SEEN_S)
    lowest = session.scalar(select(func.min(ShardRouter.epoch)).where(ShardRouter.seen_at > lately))
    in_use = active if lowest is None else min(active, lowest)
    return Epochs(active, active_for, pending, draining, tuple(e for e in draining if e < in_use))


def router_seen(session: Session, router_id: str, epoch: int) -> None:
    """Router `router_id` searches on `epoch` now."""
    row = pg_insert(ShardRouter).values(router_id=router_id, epoch=epoch, seen_at=func.now())
    session.execute(row.on_conflict_do_update(index_elements=[ShardRouter.router_id], set_=dict(epoch=epoch, seen_at=func.now())))


def router_gone(session: Session, router_id: str) -> None:
    """Router `router_id` stopped: its epoch holds nothing back any more."""
    session.execute(delete(ShardRouter).where(ShardRouter.router_id == router_id))


def newest(session: Session, epoch: int | None = None) -> Assignment:
    """The assignment of `epoch` (default the newest active one); epoch 0 with no groups when none is stored."""
    if epoch is None:
        epoch = session.scalar(select(func.max(ShardEpoch.epoch)).where(ShardEpoch.state == ACTIVE)) or 0
    meta = session.get(ShardEpoch, epoch)
    if meta is None:
        return Assignment(0, 0, {}, {})
    rows = session.execute(
        select(ShardAssignment.category_id, ShardAssignment.group_no, ShardAssignment.vectors).where(
            ShardAssignment.epoch == epoch
        )
    ).all()
    group_of, vectors = {c: g for c, g, _ in rows}, {c: n for c, _, n in rows}
    return Assignment(int(epoch), meta.groups, group_of, vectors, meta.replicas, meta.state)


def newest_epoch(session: Session) -> int:
    """The newest epoch in any state (0: none), what a new epoch's `expected_epoch` is."""
    return session.scalar(select(func.max(ShardEpoch.epoch))) or 0


def store(
    session: Session,
    group_of: dict[int, int],
    vectors: dict[int, int],
    expected_epoch: int,
    groups: int | None = None,
    replicas: int | None = None,
    state: str = ACTIVE,
) -> Assignment:
    """A new epoch holding `group_of` in `groups` groups (default: as many as it uses), unless another writer
    stored an epoch after `expected_epoch`: then the newest one, in whatever state it is."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ASSIGNMENT_LOCK})
    current = newest_epoch(session)
    if current != expected_epoch:
        return newest(session, current)
    epoch = current + 1
    groups = groups or 1 + max(group_of.values(), default=0)
    activated = func.now() if state == ACTIVE else None
    session.add(ShardEpoch(epoch=epoch, groups=groups, replicas=replicas, state=state, activated_at=activated))
    session.flush()
    rows = [{"epoch": epoch, "category_id": c, "group_no": g, "vectors": vectors.get(c, 0)} for c, g in group_of.items()]
    if rows:
        session.execute(insert(ShardAssignment), rows)
    return newest(session, epoch)


def activate(session: Session, epoch: int) -> bool:
    """Make a building epoch active, unless a newer epoch was stored meanwhile (that one wins). True when
    `epoch` is active afterwards."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ASSIGNMENT_LOCK})
    if newest_epoch(session) != epoch:
        return False
    session.execute(
        update(ShardEpoch)
        .where(ShardEpoch.epoch == epoch, ShardEpoch.state == BUILDING)
        .values(state=ACTIVE, activated_at=func.now())
    )
    return session.scalar(select(ShardEpoch.state).where(ShardEpoch.epoch == epoch)) == ACTIVE


def retired(session: Session, epochs: list[int]) -> None:
    """Mark `epochs` retired (their actors are gone); never the newest active epoch or a newer one."""
    active = select(func.max(ShardEpoch.epoch)).where(ShardEpoch.state == ACTIVE).scalar_subquery()
    session.execute(
        update(ShardEpoch)
        .where(ShardEpoch.epoch.in_(epochs), ShardEpoch.epoch < active, ShardEpoch.state != RETIRED)
        .values(state=RETIRED, retired_at=func.now())
    )


@contextmanager
def retirement_claimed(engine: Engine) -> Iterator[bool]:
    """Whether this process may retire epochs now (no other one is at it), held for the block: a session-level
    advisory lock on a connection in autocommit, so that no transaction stays open through the actors' waits."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        claimed = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": RETIRE_LOCK}))
        try:
            yield claimed
        finally:
            if claimed:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": RETIRE_LOCK})
