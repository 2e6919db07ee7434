"""The cluster's category groups in the database (table shard_assignments, migration 0009): which group holds
each category, per epoch. A category created after the newest epoch belongs to group |id| mod groups, by the
same rule in SQL (`CategorySet.sql`) and in Python (`CategorySet.contains`). Functions take a Session and never
commit."""

from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, delete, func, insert, or_, select, text
from sqlalchemy.orm import Session

from backend.storage.schema import ShardAssignment

# New epochs are written under this transaction-level advisory lock, so two servers starting at once agree.
ASSIGNMENT_LOCK = 7305104230


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

    def categories(self, group: int) -> CategorySet:
        owned = frozenset(c for c, g in self.group_of.items() if g == group)
        return CategorySet(owned, frozenset(self.group_of), self.groups, group)

    def group_for(self, category_id: int) -> int:
        got = self.group_of.get(category_id)
        return abs(category_id) % self.groups if got is None else got


def newest(session: Session, epoch: int | None = None) -> Assignment:
    """The assignment of `epoch` (default the newest); epoch 0 with no groups when none is stored."""
    if epoch is None:
        epoch = session.scalar(select(func.max(ShardAssignment.epoch))) or 0
    rows = session.execute(
        select(ShardAssignment.category_id, ShardAssignment.group_no, ShardAssignment.vectors).where(
            ShardAssignment.epoch == epoch
        )
    ).all()
    groups = 1 + max((g for _, g, _ in rows), default=-1)
    return Assignment(int(epoch), groups, {c: g for c, g, _ in rows}, {c: n for c, _, n in rows})


def store(session: Session, group_of: dict[int, int], vectors: dict[int, int], expected_epoch: int) -> Assignment:
    """A new epoch holding `group_of`, unless another writer stored one after `expected_epoch`: then that one."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ASSIGNMENT_LOCK})
    current = newest(session)
    if current.epoch != expected_epoch:
        return current
    epoch = current.epoch + 1
    rows = [{"epoch": epoch, "category_id": c, "group_no": g, "vectors": vectors.get(c, 0)} for c, g in group_of.items()]
    if rows:
        session.execute(insert(ShardAssignment), rows)
    return newest(session, epoch)


def forget_before(session: Session, epoch: int) -> int:
    """Drop the epochs older than `epoch` (their actors are gone)."""
    return int(session.execute(delete(ShardAssignment).where(ShardAssignment.epoch < epoch)).rowcount)  # type: ignore[attr-defined]
