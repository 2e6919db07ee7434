"""Safe extraction of an uploaded catalogue archive (.zip, .tar, .tar.gz) laid out as `<category>/<images>`.

Nothing outside the target folder is ever written, whatever the archive says: entries with absolute paths
or `..` parts, links, devices and other special files are skipped and counted. One entry that cannot be
written (a name too long for the file system, a NUL or undecodable bytes in its name, a damaged member) is
one counted failure; the rest of the archive is kept. Sizes are counted while bytes are written, not
believed from the headers, so a zip bomb stops at the cap; too many entries or too many bytes reject the
whole archive, and what was written is removed. The folder is then read by the
same walk as a `<category>/<images>` folder on disk (`datasets.load_folder`).
"""

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from backend.core.errors import InvalidInput
from backend.core.failpoints import failpoint

_CHUNK = 1 << 16
_NOTES = 20


class ArchiveRejected(InvalidInput):
    """The archive cannot be used at all; nothing of it is kept."""


@dataclass
class Extracted:
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)  # why entries were skipped (the first few)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (entry, why) of entries that could not be written

    def skip(self, name: str, why: str) -> None:
        self.skipped += 1
        if len(self.notes) < _NOTES:
            self.notes.append(f"{name!r}: {why}")

    def fail(self, name: str, why: str) -> None:
        self.failures.append((ascii(name)[1:-1][:300], why))


@dataclass(frozen=True)
class Limits:
    max_entries: int = 100_000
    max_total_bytes: int = 2 * 2**30
    max_file_bytes: int = 10 * 2**20


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """The entry's path parts when it stays inside the target folder, else None."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return None
    parts = tuple(p for p in PurePosixPath(posix).parts if p not in ("", "."))
    if not parts or any(p == ".." for p in parts):
        return None
    return parts


class _Writer:
    def __init__(self, target: Path, limits: Limits) -> None:
        self.target, self.limits, self.report = target, limits, Extracted()
        self.entries = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ArchiveRejected(f"the archive has more than {self.limits.max_entries:,} entries")

    def file(self, name: str, source: IO[bytes]) -> None:
        parts = _safe_parts(name)
        if parts is None:
            self.report.skip(name, "path leaves the archive's folder")
            return
        if len(parts) < 2:
            self.report.skip(name, "not inside a category folder")
            return
        if "\0" in name or _undecodable(name):
            self.report.fail(name, "the name holds a NUL or bytes that are not UTF-8")
            return
        path = self.target.joinpath(*parts)
        try:
            if not path.resolve().is_relative_to(self.target.resolve()):
                self.report.skip(name, "path leaves the archive's folder")
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            written = self._copy(source, path)
        except ArchiveRejected:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:  # this entry only
            with suppress(OSError, ValueError):  # a partial file, when one was started
                path.unlink(missing_ok=True)
            self.report.fail(name, f"cannot be extracted: {getattr(exc, 'strerror', None) or exc}")
            return
        if written > self.limits.max_file_bytes:
            path.unlink()
            self.report.skip(name, f"larger than {self.limits.max_file_bytes:,} bytes")
            return
        self.report.files += 1
        failpoint("extracted-entry")

    def _copy(self, source: IO[bytes], path: Path) -> int:
        written = 0
        with open(path, "wb") as out:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                self.report.bytes += len(chunk)
                if self.report.bytes > self.limits.max_total_bytes:
                    raise ArchiveRejected(f"the archive expands to more than {self.limits.max_total_bytes:,} bytes")
                if written > self.limits.max_file_bytes:
                    break
                out.write(chunk)
        return written


def _undecodable(name: str) -> bool:
    """Names tarfile decoded with surrogate escapes (bytes that are not UTF-8) cannot be stored as text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def extract_archive(archive: Path, target: Path, limits: Limits = Limits()) -> Extracted:
    """Extract `archive` into the empty folder `target`; ArchiveRejected (and `target` removed) when the
    archive is not one or breaks a limit."""
    target.mkdir(parents=True, exist_ok=False)
    writer = _Writer(target, limits)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, writer)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, writer)
        else:
            raise ArchiveRejected("not a .zip, .tar or .tar.gz archive")
    except ArchiveRejected:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveRejected(f"the archive cannot be read: {exc}") from None
    return writer.report


def _extract_zip(archive: Path, writer: _Writer) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            writer.entry()
            file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the writer set no Unix mode
            if info.is_dir():
                continue
            if file_type and file_type != stat.S_IFREG:
                writer.report.skip(info.filename, "a link or special file")
                continue
            with zf.open(info) as source:
                writer.file(info.filename, source)


def _extract_tar(archive: Path, writer: _Writer) -> None:
    with tarfile.open(archive, "r:*") as tf:
        for member in _members(tf):
            writer.entry()
            if member.isdir():
                continue
            if not member.isfile():
                writer.report.skip(member.name, "a link or special file")
                continue
            with _opened(tf, member) as source:
                writer.file(member.name, source)


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tf.next()) is not None:  # one at a time: the entry cap applies before the whole index is read
        yield member


@contextmanager
def _opened(tf: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[IO[bytes]]:
    source = tf.extractfile(member)
    if source is None:
        raise ArchiveRejected(f"entry {member.name!r} cannot be read")
    with source:
        yield source
