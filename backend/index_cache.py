"""The two-stage index as a cache of the database: load, verify, rebuild, save, follow changes, lock.

The database is the truth. An index is described by the catalogue it came from and a *watermark*: the
newest change number (migration 0002) it reflects. Change numbers are handed out in commit order, so
an index at watermark W becomes current by applying exactly the embeddings stamped after W and the
deletions logged after W (`change_log.changes_since`), in time proportional to the change.

- Never lose an acknowledged write: a writer commits, then calls `after_write`, which applies every change
  up to at least its own before it answers. A full rebuild reads one snapshot (REPEATABLE READ) at
  watermark W, then, holding the same lock as `after_write`, applies what committed after W before it
  replaces the live index. Whatever the interleaving, nothing committed is left out.
- Verify before believing: the cache file carries the catalogue id and PostgreSQL system identifier, the
  model, the schema revision, the watermark and a SHA-256 of its own bytes; anything that does not match,
  cannot be read or has the wrong shape is rebuilt from the database, with one log line saying why.
  Files are written under a unique temporary name and renamed into place, so concurrent savers are safe.
- Follow other processes: `refresh` (the server's periodic tick) applies other writers' changes the same
  way; a full rebuild happens only when the difference cannot be derived (another catalogue, a pruned
  deletion log). `status` says which ran, how often, and why.
"""

import hashlib
import logging
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO, Literal

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import Engine

from backend.core.locks import ReadWriteLock
from backend.core.search_params import IndexKind
from backend.index import SAMPLE_MULTIPLIER, IndexSpec, TwoStageIndex, index_class, sample_cut
from backend.index_fastscan import resolve
from backend.storage import catalogue, change_log, migrate, vector_reader
from backend.storage.engine import session_scope
from backend.telemetry import INDEX_REFRESHES, INDEX_VECTORS
from backend.vectors import StoredVectors

log = logging.getLogger(__name__)

FORMAT: Literal[3] = 3
MAGIC = b"\x00IMSRC-INDEX-CACHE-3\n"  # the file ends with: header JSON, its length (u64 LE), MAGIC
_TRAILER = struct.Struct("<Q")
_CHUNK = 1 << 20
NO_FILE = "no cache file"


class CacheHeader(BaseModel):
    """What a cache file claims about itself; checked field by field against the database before use."""

    format: Literal[3]
    catalogue_id: str
    system_identifier: str | None
    schema_revision: str
    model: str
    dim: int = Field(gt=0)
    watermark: int = Field(ge=0)
    vectors: int = Field(ge=0)
    category_ids: list[int]
    index_type: IndexKind
    codec: str
    list_size: int = Field(gt=0)
    rerank: str
    lists_per_category: list[int]
    trained_sizes: list[int]
    codec_trained_on: int = Field(ge=0)
    payload_bytes: int = Field(ge=0)
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class CacheRejected(Exception):
    """A cache (file or in memory) that must not be believed; the message says why."""


@dataclass(frozen=True)
class Built:
    index: TwoStageIndex
    identity: change_log.CatalogueIdentity
    watermark: int


@dataclass
class RefreshReport:
    kind: Literal["none", "incremental", "full"]
    added: int = 0
    removed: int = 0
    seconds: float = 0.0
    reason: str = ""
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


# Catalogues up to this size are read in one pass and built in memory; larger ones in two streamed passes
# (a training sample, then every vector in chunks), never holding all float32 vectors at once.
IN_MEMORY_BUILD_BYTES = 1 << 30
CHUNK_ROWS = 50_000


def build_from_database(
    engine: Engine, model: str, dim: int, spec: IndexSpec | None = None, in_memory_bytes: int = IN_MEMORY_BUILD_BYTES
) -> Built:
    """A new index from one consistent snapshot of the stored vectors and prototype sums (never re-embeds)."""
    spec = spec or IndexSpec()
    with session_scope(engine, snapshot=True, bulk=True) as session:
        identity = change_log.identity(session)
        watermark = change_log.head(session, model)
        category_ids = sorted(catalogue.category_ids(session).values())
        prototypes = catalogue.load_prototypes(session, model)
        sizes = catalogue.category_vector_counts(session, model)
        spec = resolve(spec, sum(sizes.values()))  # auto: flat or fastscan by catalogue size
        if sum(sizes.values()) * dim * 4 <= in_memory_bytes:
            index = TwoStageIndex.build(model, dim, category_ids, vector_reader.load_vectors(session, model), prototypes, spec)
        else:
            sample_rule = (SAMPLE_MULTIPLIER, sample_cut(spec.train_fraction(sizes)))
            sample = vector_reader.load_vectors(session, model, sample_rule) if sample_rule[1] else StoredVectors.empty(dim)
            index = TwoStageIndex.train(model, dim, category_ids, spec, sizes, sample)
            del sample
            index.set_prototypes(prototypes)
            for chunk in vector_reader.stream_vectors(session, model, CHUNK_ROWS):
                index.add(chunk.ids, chunk.category_ids, chunk.vectors)
    return Built(index, identity, watermark)


def prune_change_log(engine: Engine, keep_days: float) -> int:
    """Forget deletions older than `keep_days`: a cache that old rebuilds in full instead of following."""
    with session_scope(engine) as session:
        return change_log.prune_deletions(session, datetime.now(UTC) - timedelta(days=keep_days))


class IndexCache:
    def __init__(self, engine: Engine, model: str, dim: int, directory: Path, spec: IndexSpec | None = None) -> None:
        self.engine, self.model, self.dim, self.directory = engine, model, dim, directory
        self.spec = replace(spec or IndexSpec(), store_dir=directory)
        self.lock = ReadWriteLock()  # searches read; applying changes and swapping write
        self._apply = threading.Lock()  # one thread at a time moves the watermark
        self._build = threading.RLock()  # one load or full rebuild at a time
        self._index: TwoStageIndex | None = None
        self._identity: change_log.CatalogueIdentity | None = None
        self._watermark = 0
        self.origin = "not loaded"
        self.last_refresh: RefreshReport | None = None
        self.refreshes = {"incremental": 0, "full": 0}

    @property
    def path(self) -> Path:
        return self.directory / f"{self.model.replace('/', '_')}.index"

    @property
    def watermark(self) -> int:
        return self._watermark

    @property
    def loaded(self) -> TwoStageIndex | None:
        """The live index if there is one, without loading anything."""
        return self._index

    # --- getting an index ---------------------------------------------------------------------

    def get(self) -> TwoStageIndex:
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
    def reading(self) -> Iterator[TwoStageIndex]:
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

    def rebuild(self, reason: str = "requested") -> TwoStageIndex:
        """A full rebuild from the database, swapped in without losing any change committed meanwhile."""
        with self._build:
            start = time.perf_counter()
            built = build_from_database(self.engine, self.model, self.dim, self.spec)
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
        """Apply the changes after `built.watermark` and make the result the live index. Caller holds _apply."""
        with session_scope(self.engine, snapshot=True, bulk=True) as session:
            identity = change_log.identity(session)
            if identity.catalogue_id != built.identity.catalogue_id:
                raise CacheRejected("the database now holds another catalogue")
            if built.watermark > identity.changes_issued:  # e.g. the database was restored from an older backup
                raise CacheRejected(f"built at change {built.watermark}, past the database's newest ({identity.changes_issued})")
            if built.watermark < identity.deletions_pruned_through:
                raise CacheRejected(f"deletions after change {built.watermark} were pruned from the log")
            changes = change_log.changes_since(session, self.model, built.watermark)
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
            self._index, self._identity, self._watermark = index, identity, changes.head
        INDEX_VECTORS.labels(self.model).set(index.ntotal)
        return len(changes.added), removed

    def _advance(self) -> tuple[int, int]:
        """Apply to the live index what other transactions committed since its watermark."""
        with self._apply:  # read the live state under the lock: a rebuild may have just replaced it
            assert self._index is not None and self._identity is not None
            return self._install(Built(self._index, self._identity, self._watermark))

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
        if self._index is None or self._identity is None:
            return False
        with session_scope(self.engine, snapshot=True) as session:
            same = change_log.identity(session).catalogue_id == self._identity.catalogue_id
            return same and change_log.head(session, self.model) == self._watermark

    # --- the cache file -----------------------------------------------------------------------

    def save(self) -> None:
        """Write the live index with its header, under a unique temporary name renamed into place."""
        if self._index is None or self._identity is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as exc:
            log.warning("index cache not saved (%s): the next start rebuilds from the database", exc)
            return
        try:
            with os.fdopen(fd, "wb") as out, self.lock.read():
                index = self._index
                digest, size = hashlib.sha256(), 0

                def sink(chunk: bytes) -> None:
                    nonlocal size
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)

                index.write(sink)
                header = CacheHeader(
                    format=FORMAT,
                    catalogue_id=self._identity.catalogue_id,
                    system_identifier=self._identity.system_identifier,
                    schema_revision=migrate.head_revision(),
                    watermark=self._watermark,
                    vectors=index.ntotal,
                    payload_bytes=size,
                    payload_sha256=digest.hexdigest(),
                    **index.describe(),
                )
                raw = header.model_dump_json().encode()
                out.write(raw + _TRAILER.pack(len(raw)) + MAGIC)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read_file(self) -> Built:
        """The cache file's index, or CacheRejected saying why it must not be believed."""
        path = self.path
        try:
            with open(path, "rb") as f:
                return self._verify(f, os.fstat(f.fileno()).st_size)
        except FileNotFoundError:
            raise CacheRejected(NO_FILE) from None
        except OSError as exc:
            raise CacheRejected(f"unreadable: {exc.strerror or exc}") from exc

    def _verify(self, f: BinaryIO, size: int) -> Built:
        tail = len(MAGIC) + _TRAILER.size
        if size < tail:
            raise CacheRejected("truncated file")
        f.seek(size - tail)
        (length,) = _TRAILER.unpack(f.read(_TRAILER.size))
        if f.read(len(MAGIC)) != MAGIC or length > size - tail:
            raise CacheRejected("not an index cache of this version")
        f.seek(size - tail - length)
        try:
            header = CacheHeader.model_validate_json(f.read(length))
        except ValidationError as exc:
            raise CacheRejected(f"header of the wrong shape ({exc.error_count()} problems)") from exc
        with session_scope(self.engine) as session:
            identity = change_log.identity(session)
        spec = resolve(self.spec, header.vectors)
        expected = {
            "catalogue_id": identity.catalogue_id,
            "system_identifier": identity.system_identifier,
            "schema_revision": migrate.head_revision(),
            "model": self.model,
            "dim": self.dim,
            "index_type": spec.kind,
            "codec": spec.codec,
            "list_size": spec.list_size,
            "rerank": spec.rerank,
        }
        for key, want in expected.items():
            if getattr(header, key) != want:
                raise CacheRejected(f"built for {key} {getattr(header, key)!r}, this database has {want!r}")
        if header.payload_bytes != size - tail - length:
            raise CacheRejected("payload size does not match the header")
        f.seek(0)
        digest = hashlib.sha256()
        left = header.payload_bytes
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise CacheRejected("truncated file")
            digest.update(chunk)
            left -= len(chunk)
        if digest.hexdigest() != header.payload_sha256:
            raise CacheRejected("checksum mismatch: the file was changed or damaged")
        f.seek(0)
        remaining = header.payload_bytes

        def source(n: int) -> bytes:
            nonlocal remaining
            chunk = f.read(min(n, remaining))
            remaining -= len(chunk)
            return chunk

        try:
            layout = header.model_dump(
                include={
                    "category_ids",
                    "index_type",
                    "codec",
                    "list_size",
                    "rerank",
                    "lists_per_category",
                    "trained_sizes",
                    "codec_trained_on",
                }
            )
            index = index_class(header.index_type).read(source, self.model, self.dim, **layout, store_dir=self.directory)
        except ValueError as exc:
            raise CacheRejected(str(exc)) from exc
        if index.ntotal != header.vectors:
            raise CacheRejected("vector count does not match the header")
        return Built(index, identity, header.watermark)

    # --- what status shows --------------------------------------------------------------------

    def memory_bytes(self) -> int:
        index = self._index
        return 0 if index is None else index.memory_bytes()
