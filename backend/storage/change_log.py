"""The change log: change numbers, the catalogue's identity, and what an index cache built at change number
N must apply to be current. Functions take a Session and never commit."""

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import ColumnElement, String, cast, delete, func, select, text, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from backend.core.errors import NotFound
from backend.core.vectors import StoredVectors
from backend.storage.schema import CatalogueMeta, DeletedEmbedding, Embedding, Image, Prototype
from backend.storage.shards import CategorySet
from backend.storage.vector_reader import stored_vectors, vector_query

# The change numbers are handed out under this transaction-level advisory lock (see migration 0002). A
# writer that also locks prototype rows takes it first, so every writer locks in the same order.
CHANGE_LOCK = 7305104221


def lock_changes(session: Session) -> None:
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGE_LOCK})


@dataclass(frozen=True)
class CatalogueIdentity:
    catalogue_id: str  # made at init-db; a copy of the database (backup restore) keeps it
    system_identifier: str | None  # the PostgreSQL cluster's, where this role may read it
    deletions_pruned_through: int  # deletions numbered up to here are gone from the log
    issued_seq: int = 0  # the change sequence's position: no index of this database can be past it


@dataclass(frozen=True)
class Changes:
    seq: int  # the newest change number for the model; the state after applying these
    added: StoredVectors  # inserted or re-stamped embeddings, in change order
    removed: np.ndarray  # int64 image ids whose embedding left (or changed) since
    prototypes_changed: bool


def identity(session: Session) -> CatalogueIdentity:
    meta = session.get(CatalogueMeta, 1)
    if meta is None:
        raise NotFound("the catalogue has no identity row: run init-db")
    sysid = _system_identifier(session)
    issued = session.scalar(text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM catalogue_change_seq"))
    return CatalogueIdentity(str(meta.catalogue_id), sysid, int(meta.deletions_pruned_through), int(issued or 0))


def _system_identifier(session: Session) -> str | None:
    """The PostgreSQL cluster's identifier, or None where this role may not read it or the server cannot read
    its own pg_control file (seen after a restart under another user): a savepoint keeps that failure from
    aborting the caller's transaction, and the catalogue id still identifies the catalogue."""
    try:
        with session.begin_nested():
            return session.scalar(
                text(
                    "SELECT CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE') "
                    "THEN (SELECT system_identifier::text FROM pg_control_system()) END"
                )
            )
    except DBAPIError as exc:
        if isinstance(exc, OperationalError | InterfaceError):  # the database itself is away: the caller's error
            raise
        return None


def latest_seq(session: Session, model: str) -> int:
    """The newest change number that concerns `model`'s index: three index look-ups. Pruned deletions
    count as reflected, since a snapshot reflects every change committed before it."""
    return int(session.scalar(select(latest_seq_column(model))) or 0)


def latest_seq_column(model: str) -> ColumnElement[int]:
    """`latest_seq` as a column, to be read in the same statement as other things."""
    newest = [
        select(func.max(table.seq)).where(table.model == model).scalar_subquery()
        for table in (Embedding, DeletedEmbedding, Prototype)
    ]
    newest.append(select(CatalogueMeta.deletions_pruned_through).scalar_subquery())
    return func.coalesce(func.greatest(*newest), 0)


def catalogue_id_column() -> ColumnElement[str]:
    return select(cast(CatalogueMeta.catalogue_id, String)).where(CatalogueMeta.id == 1).scalar_subquery()


@dataclass(frozen=True)
class Head:
    """Which catalogue, and its newest change for one model: enough to tell an index that is current."""

    catalogue_id: str | None
    seq: int


def head(session: Session, model: str) -> Head:
    """The catalogue's id and `latest_seq`, in one statement (one round trip, consistent on its own): what an
    idle refresh tick reads before deciding there is nothing to do."""
    row = session.execute(select(catalogue_id_column(), latest_seq_column(model))).one()
    return Head(None if row[0] is None else str(row[0]), int(row[1] or 0))


def changes_since(session: Session, model: str, after: int, categories: CategorySet | None = None) -> Changes:
    """Everything `model`'s index must apply to move from change number `after` to the newest. Read in one
    snapshot (a REPEATABLE READ session), so `seq` is exactly the state these changes lead to. `categories`:
    only the vectors one cluster group holds (every removal is listed: removing an absent id does nothing)."""
    now = latest_seq(session, model)
    if now <= after:
        return Changes(after, StoredVectors.empty(), np.empty(0, np.int64), prototypes_changed=False)
    query = vector_query(model).where(Embedding.seq > after)
    if categories is not None:
        query = query.where(categories.where(func.coalesce(Image.category_id, -1)))
    added = session.execute(query.order_by(Embedding.seq)).all()
    removed = session.scalars(
        select(DeletedEmbedding.image_id).where(DeletedEmbedding.model == model, DeletedEmbedding.seq > after)
    ).all()
    protos = session.scalar(select(func.count()).where(Prototype.model == model, Prototype.seq > after)) or 0
    return Changes(now, stored_vectors(added), np.asarray(removed, dtype=np.int64), prototypes_changed=protos > 0)


def prune_deletions(session: Session, before: datetime) -> int:
    """Forget deletions logged before `before`; a cache older than that then rebuilds in full."""
    lock_changes(session)
    through = session.scalar(select(func.max(DeletedEmbedding.seq)).where(DeletedEmbedding.deleted_at < before))
    if through is None:
        return 0
    gone = session.execute(delete(DeletedEmbedding).where(DeletedEmbedding.seq <= through)).rowcount  # type: ignore[attr-defined]
    session.execute(
        update(CatalogueMeta).values(deletions_pruned_through=func.greatest(CatalogueMeta.deletions_pruned_through, through))
    )
    return int(gone)


def new_catalogue_id(session: Session) -> None:
    """A new identity (after a restore): every index cache built for the old contents is rebuilt."""
    session.execute(text("UPDATE catalogue_meta SET catalogue_id = gen_random_uuid()"))
