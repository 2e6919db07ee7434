"""API key rows (`api_keys`): looked up by id, prefix or name, added, revoked, stamped when used. Only a
SHA-256 of a key is ever stored. Functions take a Session and never commit."""

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.storage.schema import ApiKey


def prefix_taken(session: Session, prefix: str) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is not None


def add_key(session: Session, name: str, prefix: str, key_sha256: str, scopes: list[str]) -> ApiKey:
    """The new row, with the values the database filled in (id, created_at)."""
    row = ApiKey(name=name, prefix=prefix, key_sha256=key_sha256, scopes=scopes)
    session.add(row)
    session.flush()
    session.refresh(row)
    return row


def all_keys(session: Session, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def live_keys(session: Session, which: str) -> list[ApiKey]:
    """Live keys whose id (all digits, under 10 of them), else prefix or name, is `which`."""
    live = select(ApiKey).where(ApiKey.revoked_at.is_(None))
    if which.isdigit() and len(which) < 10:
        return list(session.scalars(live.where(ApiKey.id == int(which))))
    return list(session.scalars(live.where((ApiKey.prefix == which) | (ApiKey.name == which))))


def live_key_by_prefix(session: Session, prefix: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)))


def revoke_key(session: Session, row: ApiKey, when: datetime) -> None:
    row.revoked_at = when
    session.flush()


def mark_used(session: Session, row: ApiKey, when: datetime) -> None:
    session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=when))
    row.last_used_at = when
