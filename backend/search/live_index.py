"""`LiveIndex`: the server's verified copy of the database as a two-stage index (not a cache that may be
stale: every acknowledged write is in it): load, verify, rebuild, save, follow changes, lock.

The database is the truth. An index is described by the catalogue it came from and a *seq*: the
newest change number (migration 0002) it reflects. Change numbers are handed out in commit order, so
an index at seq W becomes current by applying exactly the embeddings stamped after W and the
deletions logged after W (`change_log.changes_since`), in time proportional to the change.

- Never lose an acknowledged write: a writer commits, then calls `after_write`, which applies every change
  up to at least its own before it answers. A full rebuild reads one snapshot (REPEATABLE READ) at
  seq W, then, holding the same lock as `after_write`, applies what committed after W before it
  replaces the live index. Whatever the interleaving, nothing committed is left out.
- Verify before believing: the index file (`index_file`) carries the catalogue id and PostgreSQL system
  identifier, the model and index layout, the schema revision, the seq and a SHA-256 of its own
  bytes; anything that does not match, cannot be read or has the wrong shape is rebuilt from the
  database, with one log line saying why. Files are written under a unique temporary name and renamed
  into place, so concurrent savers are safe.
- Follow other processes: `refresh` (the server's periodic tick) applies other writers' changes the same
  way; a full rebuild happens only when the difference cannot be derived (another catalogue, a pruned
  deletion log). `status` says which ran, how often, and why.
"""

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from sqlalchemy import Engine

from backend.core.locks import ReadWriteLock
from backend.index.category_index import CategoryIndex
from backend.index.layout import IndexLayout, status_fields
from backend.search import index_file as cache_file
from backend.search.build import Built, build_from_database
from backend.search.index_file import NO_FILE, CacheRejected
from backend.storage import catalogue, change_log, migrate
from backend.storage.engine import session_scope
from backend.storage.shards import CategorySet
from backend.telemetry import INDEX_REFRESHES, INDEX_VECTORS

log = logging.getLogger(__name__)


@dataclass
class RefreshReport:
    kind: Literal["none", "incremental", "full"]
    added: int = 0
    removed: int = 0
    seconds: float = 0.0
    reason: str = ""
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def prune_change_log(engine: Engine, keep_days: float) -> int:
    """Forget deletions older than `keep_days`: a cache that old rebuilds in full instead of following."""
    with session_scope(engine) as session:
        return change_log.prune_deletions(session, datetime.now(UTC) - timedelta(days=keep_days))


class LiveIndex:
    def __init__(
        self,
        engine: Engine,
        model: str,
        dim: int,
        directory: Path,
        layout: IndexLayout | None = None,
        categories: CategorySet | None = None,
    ) -> None:
        """The index of `model` under `directory` (its cache file and fastscan's re-rank file), laid out as
        `layout` asks (auto resolved at each full build); `categories`: only those one cluster group holds."""
        self.engine, self.model, self.dim, self.directory = engine, model, dim, directory
        self.categories = categories
        self.layout = layout or IndexLayout()
        self.lock = ReadWriteLock()  # searches read; applying changes and swapping write
        self._apply = threading.Lock()  # one thread at a time moves the seq
        self._build = threading.RLock()  # one load or full rebuild at a time
        self._index: CategoryIndex | None = None
        self._identity: change_log.CatalogueIdentity | None = None
        self._seq = 0
        self.origin = "not loaded"
        self.last_refresh: RefreshReport | None = None
        self.refreshes = {"incremental": 0, "full": 0}

    @property
    def path(self) -> Path:
        return self.directory / f"{self.model.replace('/', '_')}.index"

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def loaded(self) -> CategoryIndex | None:
        """The live index if there is one, without loading anything."""
        return self._index

    # --- getting an index ---------------------------------------------------------------------

    def get(self) -> CategoryIndex:
        """The live index: loaded from a verified cache file and brought up to date, else rebuilt."""
        index = self._index
        if index is not None:
            return index  # the common case, without a lock
        with self._build:
            if self._index is None:
                self._load_or_build()
            assert self._index is not None
            return self._index

    @contextmanager
    def reading(self) -> Iterator[CategoryIndex]:
        """The live index, held still (no change is applied) for the duration of a search."""
        self.get()
        with self.lock.read():
            assert self._index is not None
            yield self._index

    def _load_or_build(self) -> None:
        start = time.perf_counter()
        try:
            built = self._read_file()
            with self._apply:
                added, removed = self._install(built)
        except CacheRejected as exc:  # unreadable, not ours, or too old to bring up to date
            level = logging.INFO if str(exc) == NO_FILE else logging.WARNING  # a first start is no news
            log.log(level, "index cache %s not used (%s): rebuilding from the database", self.path, exc)
            self.rebuild(f"cache not used: {exc}")
            return
        self.origin = f"loaded from cache in {time.perf_counter() - start:.2f}s"
        if added or removed:
            self.origin += f", then {added} added / {removed} removed from the change log"
        log.info("index for %s: %d vectors, %s", self.model, built.index.ntotal, self.origin)

    def rebuild(self, reason: str = "requested") -> CategoryIndex:
        """A full rebuild from the database, swapped in without losing any change committed meanwhile."""
        with self._build:
            start = time.perf_counter()
            built = build_from_database(
                self.engine, self.model, self.dim, self.layout, store_dir=self.directory, categories=self.categories
            )
            with self._apply:
                self._install(built)
            seconds = time.perf_counter() - start
            self.origin = f"rebuilt from database in {seconds:.2f}s ({reason})"
            self.refreshes["full"] += 1
            INDEX_REFRESHES.labels("full").inc()
            self.last_refresh = RefreshReport("full", built.index.ntotal, 0, seconds, reason)
            log.info("index for %s: %d vectors, %s", self.model, built.index.ntotal, self.origin)
            self.save()
            assert self._index is not None
            return self._index

    # --- following the change log -------------------------------------------------------------

    def _install(self, built: Built) -> tuple[int, int]:
        """Apply the changes after `built.seq` and make the result the live index. Caller holds _apply."""
        with session_scope(self.engine, snapshot=True, bulk=True) as session:
            identity = change_log.identity(session)
            if identity.catalogue_id != built.identity.catalogue_id:
                raise CacheRejected("the database now holds another catalogue")
            if built.seq > identity.issued_seq:  # e.g. the database was restored from an older backup
                raise CacheRejected(f"built at change {built.seq}, past the database's newest ({identity.issued_seq})")
            if built.seq < identity.deletions_pruned_through:
                raise CacheRejected(f"deletions after change {built.seq} were pruned from the log")
            changes = change_log.changes_since(session, self.model, built.seq, self.categories)
            reload = changes.prototypes_changed or len(changes.added) > 0 or not built.index.prototypes_set
            prototypes = catalogue.load_prototypes(session, self.model) if reload else None
        index = built.index
        new_categories = sorted({int(c) for c in changes.added.category_ids} - set(index.category_ids))
        if new_categories:
            index = index.with_categories(new_categories)  # reads only: searches may go on meanwhile
        with self.lock.write():
            removed = index.remove(changes.removed) if len(changes.removed) else 0
            index.add(changes.added.ids, changes.added.category_ids, changes.added.vectors)
            if prototypes is not None:
                index.set_prototypes(prototypes)
            self._index, self._identity, self._seq = index, identity, changes.seq
        INDEX_VECTORS.labels(self.model).set(index.ntotal)
        return len(changes.added), removed

    def _advance(self) -> tuple[int, int]:
        """Apply to the live index what other transactions committed since its seq."""
        with self._apply:  # read the live state under the lock: a rebuild may have just replaced it
            assert self._index is not None and self._identity is not None
            return self._install(Built(self._index, self._identity, self._seq))

    def after_write(self) -> None:
        """Called by a writer after its commit: when this returns, its change is searchable."""
        if self._index is None:
            self.get()  # built from the database, which already holds the change
            return
        try:
            self._advance()
        except CacheRejected as exc:
            self.rebuild(str(exc))

    def refresh(self) -> RefreshReport:
        """Bring the live index up to date with the database: incrementally when the change log allows."""
        start = time.perf_counter()
        if self._index is None:
            self.get()
            return RefreshReport("full" if self.origin.startswith("rebuilt") else "none", reason=self.origin)
        if self.is_current():  # the idle tick: one statement, no snapshot, no lock
            return RefreshReport("none")
        try:
            added, removed = self._advance()
        except CacheRejected as exc:
            self.rebuild(str(exc))
            assert self.last_refresh is not None
            return self.last_refresh
        if not added and not removed:
            return RefreshReport("none")
        report = RefreshReport("incremental", added, removed, time.perf_counter() - start)
        self.last_refresh = report
        self.refreshes["incremental"] += 1
        INDEX_REFRESHES.labels("incremental").inc()
        log.info("index for %s: %d added, %d removed from the change log in %.3fs", self.model, added, removed, report.seconds)
        return report

    def is_current(self) -> bool:
        """Whether the live index reflects every committed change (one statement; False before a load)."""
        if self._index is None:
            return False
        with session_scope(self.engine, single_read=True) as session:
            return self.current_at(change_log.head(session, self.model))

    def current_at(self, head: change_log.Head) -> bool:
        """Whether the live index reflects `head`, read by the caller. Takes no lock: never waits on a refresh."""
        identity, seq = self._identity, self._seq
        return self._index is not None and identity is not None and (head.catalogue_id, head.seq) == (identity.catalogue_id, seq)

    # --- the cache file -----------------------------------------------------------------------

    def save(self) -> None:
        """Write the live index with its header, under a unique temporary name renamed into place."""
        if self._index is None or self._identity is None:
            return
        with self.lock.read():
            cache_file.write(
                self.path,
                self._index,
                catalogue_id=self._identity.catalogue_id,
                system_identifier=self._identity.system_identifier,
                schema_revision=migrate.head_revision(),
                seq=self._seq,
            )

    def _read_file(self) -> Built:
        """The cache file's index, or CacheRejected saying why it must not be believed."""
        try:
            with open(self.path, "rb") as f:
                header = cache_file.read_header(f, os.fstat(f.fileno()).st_size)
                with session_scope(self.engine) as session:
                    identity = change_log.identity(session)
                expected = {
                    "catalogue_id": identity.catalogue_id,
                    "system_identifier": identity.system_identifier,
                    "schema_revision": migrate.head_revision(),
                    "model": self.model,
                    "dim": self.dim,
                    "layout": self.layout.resolved(header.vectors),
                }
                cache_file.check_claims(header, expected)
                return Built(cache_file.read_index(f, header, self.directory), identity, header.seq)
        except FileNotFoundError:
            raise CacheRejected(NO_FILE) from None
        except OSError as exc:
            raise CacheRejected(f"unreadable: {exc.strerror or exc}") from exc

    # --- what status shows --------------------------------------------------------------------

    def memory_bytes(self) -> int:
        index = self._index
        return 0 if index is None else index.memory_bytes()

    def layout_status(self) -> dict[str, str]:
        """The live index's type, codec and re-ranking, and why it has that type (see `layout.status_fields`)."""
        index = self._index
        return status_fields(self.layout, index.layout if index else None, index.ntotal if index else 0)
