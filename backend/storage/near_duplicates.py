"""Near-duplicate links and their groups (migration 0007): written as links arrive, split as images leave, read
a page at a time. Functions take a Session and never commit.

Every change to links, members or groups is made under one transaction-level advisory lock (`lock_links`),
so two writers linking the same groups at once cannot both relabel them: the second sees the first's groups.
Lock order: an image's row lock, then the change log's lock (`change_log.lock_changes`), then this one; the
server's link tick takes only this one. Union relabels the smaller group (cost: its size); a delete
re-derives the components of its own group only (cost: the group's size and links).
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, literal, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from backend.core.vectors import StoredVectors
from backend.storage.schema import Category, Embedding, Image, NearDuplicateState
from backend.storage.schema import NearDuplicateGroup as Group
from backend.storage.schema import NearDuplicateLink as Link
from backend.storage.schema import NearDuplicateMember as Member
from backend.storage.vector_reader import stored_vectors, vector_query

LINKS_LOCK = 7305104222  # beside change_log.CHANGE_LOCK (7305104221)
THRESHOLD_EPS = 1e-6  # the threshold is stored as a float4

Pair = tuple[int, int, float]  # (image, other image, cosine)


@dataclass(frozen=True)
class LinkState:
    threshold: float
    links_seq: int  # every embedding numbered up to here has had its links searched
    groups: int


@dataclass(frozen=True)
class GroupRow:
    group_id: int
    min_score: float
    max_score: float
    members: list[tuple[int, str | None]]  # (image id, category name), ascending ids


def lock_links(session: Session) -> None:
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LINKS_LOCK})


def state(session: Session, model: str) -> LinkState | None:
    row = session.get(NearDuplicateState, model)
    return None if row is None else LinkState(float(row.threshold), int(row.links_seq), int(row.groups))


def ensure_state(session: Session, model: str, threshold: float) -> LinkState:
    """The model's state row, made if missing; links computed at another threshold are dropped (every
    embedding is then linked again, from the start of the change log)."""
    lock_links(session)
    session.execute(insert(NearDuplicateState).values(model=model, threshold=threshold).on_conflict_do_nothing())
    row = session.scalars(select(NearDuplicateState).where(NearDuplicateState.model == model).with_for_update()).one()
    if abs(row.threshold - threshold) > THRESHOLD_EPS:
        for table in (Link, Member, Group):
            session.execute(delete(table).where(table.model == model))
        row.threshold, row.links_seq, row.groups = threshold, 0, 0
    session.flush()
    return LinkState(float(row.threshold), int(row.links_seq), int(row.groups))


def advance(session: Session, model: str, seen: int, to: int) -> bool:
    """Move the watermark from `seen` to `to`; False if another process moved it meanwhile (its chunk wins)."""
    moved = session.execute(
        update(NearDuplicateState)
        .where(NearDuplicateState.model == model, NearDuplicateState.links_seq == seen)
        .values(links_seq=to)
    )
    return bool(moved.rowcount)  # type: ignore[attr-defined]


def pending(session: Session, model: str, after: int, through: int, limit: int) -> tuple[StoredVectors, list[int]]:
    """Embeddings numbered in (after, through], oldest first, at most `limit`, with their change numbers."""
    query = vector_query(model).add_columns(Embedding.seq).where(Embedding.seq > after, Embedding.seq <= through)
    rows = session.execute(query.order_by(Embedding.seq).limit(limit)).all()
    return stored_vectors([r[:3] for r in rows]), [int(r[3]) for r in rows]  # type: ignore[misc]


def summary(session: Session, model: str, cap: int) -> tuple[LinkState | None, int]:
    """The model's state and how many embeddings are behind it (up to `cap`), in one statement."""
    seq = func.coalesce(select(NearDuplicateState.links_seq).where(NearDuplicateState.model == model).scalar_subquery(), 0)
    newer = select(Embedding.image_id).where(Embedding.model == model, Embedding.seq > seq).limit(cap).subquery()
    counted = select(func.count()).select_from(newer).scalar_subquery()
    row = session.execute(
        select(NearDuplicateState.threshold, NearDuplicateState.links_seq, NearDuplicateState.groups, counted)
        .select_from(select(literal(1)).subquery())
        .outerjoin(NearDuplicateState, NearDuplicateState.model == model)
    ).one()
    known = None if row[0] is None else LinkState(float(row[0]), int(row[1]), int(row[2]))
    return known, int(row[3])


def behind(session: Session, model: str, links_seq: int, cap: int) -> int:
    """Embeddings whose links are not searched yet, counted up to `cap` (an index range scan, bounded)."""
    newer = select(Embedding.image_id).where(Embedding.model == model, Embedding.seq > links_seq).limit(cap).subquery()
    return int(session.scalar(select(func.count()).select_from(newer)) or 0)


# --- links arrive: union -----------------------------------------------------------------------------


def add_links(session: Session, model: str, threshold: float, links: Iterable[Pair]) -> int:
    """Store links found at `threshold` (either order, repeats and links to images deleted meanwhile dropped)
    and merge the groups they join. Takes the links' lock; returns how many links were new."""
    best: dict[tuple[int, int], float] = {}
    for a, b, score in links:
        if a != b:
            key = (min(a, b), max(a, b))
            best[key] = max(best.get(key, score), score)
    if not best:
        return 0
    lock_links(session)
    session.execute(insert(NearDuplicateState).values(model=model, threshold=threshold).on_conflict_do_nothing())
    ends = {i for pair in best for i in pair}
    alive = set(session.scalars(select(Image.id).where(Image.id.in_(ends))))
    rows = [{"model": model, "image_a": a, "image_b": b, "score": s} for (a, b), s in sorted(best.items()) if {a, b} <= alive]
    if not rows:
        return 0
    new = session.execute(
        insert(Link).values(rows).on_conflict_do_nothing().returning(Link.image_a, Link.image_b, Link.score)
    ).all()
    if new:
        _merge(session, model, [(int(a), int(b), float(s)) for a, b, s in new])
    return len(new)


def _merge(session: Session, model: str, links: Sequence[Pair]) -> None:
    """Join the groups the new links connect: per component the largest group keeps its id (or a new one is
    made), the smaller ones' members are relabelled to it."""
    ends = {i for a, b, _ in links for i in (a, b)}
    member: dict[int, int] = dict(
        session.execute(select(Member.image_id, Member.group_id).where(Member.model == model, Member.image_id.in_(ends))).all()
    )
    groups = {
        g.group_id: g
        for g in session.scalars(select(Group).where(Group.model == model, Group.group_id.in_(set(member.values()))))
    }
    forest = _Forest()
    node = {i: ("g", member[i]) if i in member else ("i", i) for i in ends}  # a grouped image is its group
    for a, b, _ in links:
        forest.union(node[a], node[b])
    components: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for n in set(node.values()):
        components.setdefault(forest.root(n), []).append(n)
    scores: dict[tuple[str, int], list[float]] = {}
    for a, _, s in links:
        scores.setdefault(forest.root(node[a]), []).append(s)
    change = 0
    for root, nodes in components.items():
        change += _join(
            session, model, [groups[g] for kind, g in nodes if kind == "g"], [i for kind, i in nodes if kind == "i"], scores[root]
        )
    _count_groups(session, model, change)


def _join(session: Session, model: str, joined: list[Group], images: list[int], scores: list[float]) -> int:
    """One component: existing groups `joined` and ungrouped `images`. Returns the change in the group count."""
    joined.sort(key=lambda g: (-g.size, g.group_id))
    if joined:
        keep, others = joined[0], joined[1:]
    else:
        keep = Group(model=model, group_id=_new_group_id(session), size=0, min_score=min(scores), max_score=max(scores))
        session.add(keep)
        others = []
    gone = [g.group_id for g in others]
    if gone:  # the smaller groups' members: the only rows relabelled
        session.execute(update(Member).where(Member.model == model, Member.group_id.in_(gone)).values(group_id=keep.group_id))
        session.execute(delete(Group).where(Group.model == model, Group.group_id.in_(gone)))
    if images:
        session.execute(insert(Member).values([{"model": model, "image_id": i, "group_id": keep.group_id} for i in images]))
    keep.size = keep.size + sum(g.size for g in others) + len(images)
    keep.min_score = min([keep.min_score, *scores, *(g.min_score for g in others)])
    keep.max_score = max([keep.max_score, *scores, *(g.max_score for g in others)])
    session.flush()
    return (0 if joined else 1) - len(gone)


# --- an image leaves: split ----------------------------------------------------------------------------


def forget_image(session: Session, image_id: int) -> None:
    """Remove an image's links (every model's) and re-derive the components of the groups it was in."""
    lock_links(session)
    was_in = session.execute(select(Member.model, Member.group_id).where(Member.image_id == image_id)).all()
    if not was_in:
        return
    session.execute(delete(Link).where(or_(Link.image_a == image_id, Link.image_b == image_id)))
    session.execute(delete(Member).where(Member.image_id == image_id))
    for model, group_id in was_in:
        _count_groups(session, model, _split(session, model, int(group_id)))


def _split(session: Session, model: str, group_id: int) -> int:
    """Re-derive one group's components from its remaining links: the largest keeps the id, the others get new
    ones, an image left without links leaves. Returns the change in the group count."""
    members = list(session.scalars(select(Member.image_id).where(Member.model == model, Member.group_id == group_id)))
    links = session.execute(  # a member's links all lie inside its group
        select(Link.image_a, Link.image_b, Link.score).where(Link.model == model, Link.image_a.in_(members))
    ).all()
    forest = _Forest()
    for a, b, _ in links:
        forest.union(("i", int(a)), ("i", int(b)))
    parts: dict[tuple[str, int], list[int]] = {}
    for i in members:
        parts.setdefault(forest.root(("i", i)), []).append(i)
    scores: dict[tuple[str, int], list[float]] = {}
    for a, _, s in links:
        scores.setdefault(forest.root(("i", int(a))), []).append(float(s))
    kept = sorted((p for p in parts.values() if len(p) > 1), key=lambda p: (-len(p), min(p)))
    alone = [p[0] for p in parts.values() if len(p) == 1]
    if alone:
        session.execute(delete(Member).where(Member.model == model, Member.image_id.in_(alone)))
    session.execute(delete(Group).where(Group.model == model, Group.group_id == group_id))
    for n, part in enumerate(kept):
        new_id = group_id if n == 0 else _new_group_id(session)
        if n:
            session.execute(update(Member).where(Member.model == model, Member.image_id.in_(part)).values(group_id=new_id))
        found = scores[forest.root(("i", part[0]))]
        session.execute(
            insert(Group).values(model=model, group_id=new_id, size=len(part), min_score=min(found), max_score=max(found))
        )
    return len(kept) - 1


def _new_group_id(session: Session) -> int:
    return int(session.scalar(text("SELECT nextval('near_duplicate_group_seq')")) or 0)


def _count_groups(session: Session, model: str, change: int) -> None:
    if change:
        session.execute(
            update(NearDuplicateState).where(NearDuplicateState.model == model).values(groups=NearDuplicateState.groups + change)
        )


class _Forest:
    """Union-find over hashable nodes (path halving; the smaller root joins the larger by node order)."""

    def __init__(self) -> None:
        self.parent: dict[tuple[str, int], tuple[str, int]] = {}

    def root(self, x: tuple[str, int]) -> tuple[str, int]:
        parent = self.parent
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    def union(self, a: tuple[str, int], b: tuple[str, int]) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# --- reading a page --------------------------------------------------------------------------------------


def group_page(session: Session, model: str, offset: int, limit: int) -> list[GroupRow]:
    """Groups largest first (then strongest link, then id), read through their index, with their members and
    the members' category names: one statement, the page's rows only."""
    page = (
        select(Group.group_id, Group.size, Group.min_score, Group.max_score)
        .where(Group.model == model)
        .order_by(Group.size.desc(), Group.max_score.desc(), Group.group_id)
        .offset(offset)
        .limit(limit)
        .cte("page")
    )
    rows = session.execute(
        select(page.c.group_id, page.c.min_score, page.c.max_score, Member.image_id, Category.name)
        .join(Member, (Member.model == model) & (Member.group_id == page.c.group_id))
        .join(Image, Image.id == Member.image_id)
        .outerjoin(Category, Category.id == Image.category_id)
        .order_by(page.c.size.desc(), page.c.max_score.desc(), page.c.group_id, Member.image_id)
    )
    out: list[GroupRow] = []
    for group_id, lo, hi, image_id, category in rows:
        if not out or out[-1].group_id != group_id:
            out.append(GroupRow(int(group_id), float(lo), float(hi), []))
        out[-1].members.append((int(image_id), category))
    return out
