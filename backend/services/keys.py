"""API keys for the API's access checks and the CLI's `api-key` commands (the SQL is `backend.auth`'s)."""

import os
from pathlib import Path

from sqlalchemy import Engine

from backend import auth
from backend.core.config import Settings
from backend.storage.engine import session_scope


class Keys:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings  # AUTH_MODE and METRICS_REQUIRE_KEY say which accesses need a key
        self._engine = engine

    def authenticate(self, key: str) -> auth.KeyInfo | None:
        """The key's facts, or None for an unknown or revoked key."""
        with session_scope(self._engine) as session:
            return auth.authenticate(session, key)

    def create(self, name: str, scopes: list[str]) -> tuple[auth.KeyInfo, str]:
        with session_scope(self._engine) as session:
            return auth.create_key(session, name, scopes)

    def listing(self, include_revoked: bool) -> list[auth.KeyInfo]:
        with session_scope(self._engine) as session:
            return auth.list_keys(session, include_revoked=include_revoked)

    def revoke(self, which: str) -> auth.KeyInfo:
        with session_scope(self._engine) as session:
            return auth.revoke(session, which)

    def ensure_admin(self, path: Path) -> bool:
        """An admin key saved to `path` (mode 600) unless it holds a valid one; whether one was created."""
        existing = path.read_text().strip() if path.is_file() else ""
        with session_scope(self._engine) as session:
            if existing and auth.key_is_valid(session, existing, "admin"):
                return False
            _, key = auth.create_key(session, "admin", ["admin"])
            # Written before the transaction commits: a key that could not be saved is never created.
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(key + "\n")
            os.chmod(path.with_suffix(".tmp"), 0o600)
            os.replace(path.with_suffix(".tmp"), path)
        return True
