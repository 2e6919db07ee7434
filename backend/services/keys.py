"""API keys, in one place: creation, listing, revocation and verification, for the API's access checks and
the CLI's `api-key` commands (the rows are `backend.storage.api_keys`'s).

A key is `imsrc_<prefix>_<secret>`: the prefix (8 hex characters) finds the row and is shown in listings; the
secret is 32 random bytes. Only a SHA-256 of the whole key is stored (a fast hash is enough: the key is
random, not a password that could be guessed), and it is compared in constant time.

Scopes: `search` (query and read images), `write` (upload, delete, categories, catalogue jobs), `admin`
(rebuilds, key management) and `metrics` (read /metrics when METRICS_REQUIRE_KEY is set). `admin` grants
every other scope and `write` grants `search`, so one admin key does everything.
"""

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, get_args

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from backend.core.config import Settings
from backend.core.errors import NotFound, Unprocessable
from backend.core.text import clean_name, echo
from backend.storage import api_keys
from backend.storage.engine import session_scope
from backend.storage.schema import ApiKey

Scope = Literal["search", "write", "admin", "metrics"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
IMPLIED: dict[str, set[str]] = {"admin": {"admin", "write", "search", "metrics"}, "write": {"write", "search"}}

KEY_PATTERN = re.compile(r"^imsrc_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
SECRET_BYTES = 32
# last_used_at is written at most this often per key: a search per millisecond must not be a write each.
LAST_USED_EVERY = timedelta(seconds=60)
_NO_KEY_SHA = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> "KeyInfo":
        return cls(row.id, row.name, row.prefix, list(row.scopes), row.created_at, row.last_used_at, row.revoked_at)

    def grants(self, scope: str) -> bool:
        return any(scope in IMPLIED.get(s, {s}) for s in self.scopes)


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(values: list[str]) -> list[str]:
    """Known scopes, deduplicated, in the order of SCOPES; Unprocessable for anything else."""
    unknown = sorted({v for v in values if v not in SCOPES})
    if unknown or not values:
        raise Unprocessable(f"scope: {echo(', '.join(unknown)) or 'none given'}; choose from {', '.join(SCOPES)}")
    return [s for s in SCOPES if s in values]


def create_key(session: Session, name: str, scopes: list[str]) -> tuple[KeyInfo, str]:
    """A new key; the plain key is returned once and never stored."""
    try:
        name = clean_name(name, "key name")
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None
    scopes = parse_scopes(scopes)
    while True:  # 8 hex characters: a collision is rare, but the prefix must be unique
        prefix = secrets.token_hex(4)
        if not api_keys.prefix_taken(session, prefix):
            break
    key = f"imsrc_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return KeyInfo.of(api_keys.add_key(session, name, prefix, _sha256(key), scopes)), key


def list_keys(session: Session, include_revoked: bool = False) -> list[KeyInfo]:
    return [KeyInfo.of(row) for row in api_keys.all_keys(session, include_revoked)]


def revoke(session: Session, which: str) -> KeyInfo:
    """Revoke a key named by its id, its prefix or its name (when exactly one live key has that name)."""
    rows = api_keys.live_keys(session, which)
    if not rows:
        raise NotFound(f"no live API key with id, prefix or name {echo(which)!r}")
    if len(rows) > 1:
        raise Unprocessable(f"{len(rows)} live keys are named {echo(which)!r}: revoke by id or prefix")
    api_keys.revoke_key(session, rows[0], datetime.now(UTC))
    return KeyInfo.of(rows[0])


def authenticate(session: Session, key: str) -> KeyInfo | None:
    """The live key's info, or None for a malformed, unknown, wrong or revoked key."""
    match = KEY_PATTERN.match(key.strip())
    row = None
    if match:
        row = api_keys.live_key_by_prefix(session, match.group(1))
    # Compared in constant time, and compared even when no row matched, so timing says nothing about the key.
    same = hmac.compare_digest(row.key_sha256 if row is not None else _NO_KEY_SHA, _sha256(key.strip()))
    if row is None or not same:
        return None
    now = datetime.now(UTC)
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY:
        api_keys.mark_used(session, row, now)
    return KeyInfo.of(row)


def key_is_valid(session: Session, key: str, scope: str = "admin") -> bool:
    info = authenticate(session, key)
    return info is not None and info.grants(scope)


class Keys:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings  # AUTH_MODE and METRICS_REQUIRE_KEY say which accesses need a key
        self._engine = engine

    def authenticate(self, key: str) -> KeyInfo | None:
        """The key's facts, or None for an unknown or revoked key."""
        with session_scope(self._engine) as session:
            return authenticate(session, key)

    def create(self, name: str, scopes: list[str]) -> tuple[KeyInfo, str]:
        with session_scope(self._engine) as session:
            return create_key(session, name, scopes)

    def listing(self, include_revoked: bool) -> list[KeyInfo]:
        with session_scope(self._engine) as session:
            return list_keys(session, include_revoked=include_revoked)

    def revoke(self, which: str) -> KeyInfo:
        with session_scope(self._engine) as session:
            return revoke(session, which)

    def ensure_admin(self, path: Path) -> bool:
        """An admin key saved to `path` (mode 600) unless it holds a valid one; whether one was created."""
        existing = path.read_text().strip() if path.is_file() else ""
        with session_scope(self._engine) as session:
            if existing and key_is_valid(session, existing, "admin"):
                return False
            _, key = create_key(session, "admin", ["admin"])
            # Written before the transaction commits: a key that could not be saved is never created.
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(key + "\n")
            os.chmod(path.with_suffix(".tmp"), 0o600)
            os.replace(path.with_suffix(".tmp"), path)
        return True
