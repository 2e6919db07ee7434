"""The index cache file: the index's own bytes, then a header (JSON), its length (u64 LE) and a magic.

Written under a unique temporary name and renamed into place, so concurrent savers are safe. Read back only
after the header's claims (catalogue, model, schema revision, layout) match what is expected and the payload
matches its size and SHA-256; anything else is `CacheRejected`, with a message saying why.
"""

import hashlib
import logging
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO, Literal

from pydantic import BaseModel, Field, ValidationError

from backend.index.category_index import CategoryIndex
from backend.index.layout import IndexDescription, IndexLayout
from backend.search.build import index_class

log = logging.getLogger(__name__)

FORMAT: Literal[4] = 4  # 4: the layout is one nested object (IndexLayout); files of format 3 are rebuilt
MAGIC = b"\x00IMSRC-INDEX-CACHE-4\n"
_TRAILER = struct.Struct("<Q")
_TAIL = len(MAGIC) + _TRAILER.size
_CHUNK = 1 << 20
NO_FILE = "no cache file"


class CacheHeader(BaseModel):
    """What a cache file claims about itself; checked field by field against the database before use."""

    format: Literal[4]
    catalogue_id: str
    system_identifier: str | None
    schema_revision: str
    seq: int = Field(ge=0)
    vectors: int = Field(ge=0)
    index: IndexDescription  # model, dimension, layout, categories, what training gave them
    payload_bytes: int = Field(ge=0)
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    def claims(self) -> dict[str, object]:
        """The values `check_claims` compares with what the reader expects."""
        return {
            "catalogue_id": self.catalogue_id,
            "system_identifier": self.system_identifier,
            "schema_revision": self.schema_revision,
            "model": self.index.model,
            "dim": self.index.dim,
            "layout": self.index.layout,
        }


class CacheRejected(Exception):
    """A cache (file or in memory) that must not be believed; the message says why."""


def write(path: Path, index: CategoryIndex, **claims: object) -> None:
    """`index` and a header of `claims` (catalogue_id, system_identifier, schema_revision, seq) under
    `path`. The caller keeps the index still meanwhile. OSError from the directory is logged, not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        log.warning("index cache not saved (%s): the next start rebuilds from the database", exc)
        return
    try:
        with os.fdopen(fd, "wb") as out:
            digest, size = hashlib.sha256(), 0

            def sink(chunk: bytes) -> None:
                nonlocal size
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)

            index.write(sink)
            header = CacheHeader.model_validate(
                dict(
                    claims,
                    format=FORMAT,
                    vectors=index.ntotal,
                    index=index.describe(),
                    payload_bytes=size,
                    payload_sha256=digest.hexdigest(),
                )
            )
            raw = header.model_dump_json().encode()
            out.write(raw + _TRAILER.pack(len(raw)) + MAGIC)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(f: BinaryIO, size: int) -> CacheHeader:
    """The header at the end of the file; CacheRejected when there is none of this version."""
    if size < _TAIL:
        raise CacheRejected("truncated file")
    f.seek(size - _TAIL)
    (length,) = _TRAILER.unpack(f.read(_TRAILER.size))
    if f.read(len(MAGIC)) != MAGIC or length > size - _TAIL:
        raise CacheRejected("not an index cache of this version")
    f.seek(size - _TAIL - length)
    try:
        header = CacheHeader.model_validate_json(f.read(length))
    except ValidationError as exc:
        raise CacheRejected(f"header of the wrong shape ({exc.error_count()} problems)") from exc
    if header.payload_bytes != size - _TAIL - length:
        raise CacheRejected("payload size does not match the header")
    return header


def check_claims(header: CacheHeader, expected: Mapping[str, object]) -> None:
    """CacheRejected naming the first claim (a layout field by name) that differs from `expected`."""
    claims = header.claims()
    for key, want in expected.items():
        got = claims[key]
        if isinstance(got, IndexLayout) and isinstance(want, IndexLayout):  # compare the layout field by field
            _check_fields(asdict(got), asdict(want))
        elif got != want:
            raise CacheRejected(f"built for {key} {got!r}, this database has {want!r}")


def _check_fields(got: dict[str, object], want: dict[str, object]) -> None:
    for key, value in want.items():
        if got[key] != value:
            raise CacheRejected(f"built for {key} {got[key]!r}, this database has {value!r}")


def read_index(f: BinaryIO, header: CacheHeader, store_dir: Path) -> CategoryIndex:
    """The payload's index, once its SHA-256 matches the header's; CacheRejected otherwise."""
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
        index = index_class(header.index.layout.kind).read(source, header.index, store_dir)
    except ValueError as exc:
        raise CacheRejected(str(exc)) from exc
    if index.ntotal != header.vectors:
        raise CacheRejected("vector count does not match the header")
    return index
