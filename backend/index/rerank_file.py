"""fastscan's exact copy of the vectors: float16 rows in a memory-mapped file under DATA_DIR/index.

RAM holds the 4-bit codes only; a search reads its shortlist's rows from the page cache. The file is
written once per build (rows streamed to a private temporary file, renamed into place when the index is
saved) and never changed after: several processes may map it at once. Rows added later live in RAM and
travel in the index cache file. A fixed header (magic, build token, dimension, rows) ties the file to the
index it belongs to: a missing, truncated, resized or foreign file is refused (ValueError), never trusted.

A shortlist is scored by FAISS's float16 scalar quantizer (SIMD) over its gathered rows: numpy converts
float16 one element at a time, 6x slower here for 50 rows of 1280 dimensions (and FAISS's own
`ScalarQuantizer.decode` to float32 then a matmul, 10x). (bfloat16 rows, which numpy
decodes with a shift, were as fast but lost 0.005 of recall@10 on CIFAR-10: their 8-bit mantissa swaps
close neighbours.)

The file is mapped for random access (`MADV_RANDOM`): otherwise each page missing from the cache reads the
device's whole read-ahead window around it (8 MB on this machine: 0.9 s a query at 10M vectors). A file
larger than half of the memory we may use (the machine's, or the container's limit) is mostly on disk, so
it is not read through the mapping: a shortlist's rows in it are announced to the kernel
first (`POSIX_FADV_WILLNEED`, so the device serves the reads together) and then read with `preadv`, 3-4x
faster than page faults taken one by one (measured: 1,000 rows of a 25 GB file in 8 ms against 32 ms).
"""

import mmap
import os
import struct
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss import swig_ptr

MAGIC = b"\x00IMSRC-RERANK-1\n"
_HEADER = struct.Struct("<16s16sQQ")  # magic, build token, dimension, rows
HEADER_BYTES = 4096  # rows start on a page boundary
ROW_DTYPE = np.dtype("<f2")
COLD_SHARE = 0.5  # a file larger than this share of the memory we may use is read as mostly on disk
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")  # a container's memory limit (cgroup v2), if it has one


def usable_memory() -> int:
    """Physical memory, or the container's limit when it is lower (the page cache counts against it)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    try:
        limit = CGROUP_LIMIT.read_text().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical


USABLE_BYTES = usable_memory()
_PREFETCH = hasattr(os, "posix_fadvise") and hasattr(os, "preadv")  # not on Windows: page faults there


class Growing:
    """An append-only array that doubles its capacity, so adding one row does not copy all of them."""

    def __init__(self, dtype: np.dtype | type, width: int = 0) -> None:
        self.shape = (width,) if width else ()
        self.data = np.empty((16, *self.shape), dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> int:
        start, need = self.n, self.n + len(values)
        if need > len(self.data):
            grown = np.empty((max(need, 2 * len(self.data)), *self.shape), dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[start:need] = values
        self.n = need
        return start

    @property
    def view(self) -> np.ndarray:
        return self.data[: self.n]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class _Scratch(threading.local):
    """Each thread's float16 scorer, its codes sized once: a shortlist is gathered straight into them, not
    into a temporary copied again into a scorer built per query (together 20-30 µs of a 0.2 ms search)."""

    def __init__(self) -> None:
        self.scorer: faiss.IndexScalarQuantizer | None = None
        self.room = np.zeros((0, 0), dtype=ROW_DTYPE)

    def get(self, dim: int, n: int) -> tuple[faiss.IndexScalarQuantizer, np.ndarray]:
        """The scorer and a float16 (>= n, dim) view of its codes."""
        if self.scorer is None or len(self.room) < n:
            scorer = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            size = max(n, 2 * len(self.room)) * dim * ROW_DTYPE.itemsize
            scorer.codes.resize(size)  # never resized again: `room` views this buffer
            room = faiss.rev_swig_ptr(scorer.codes.data(), size).view(ROW_DTYPE).reshape(-1, dim)
            self.scorer, self.room = scorer, room
        return self.scorer, self.room


def _unlink(path: str) -> None:
    Path(path).unlink(missing_ok=True)


class RerankFile:
    """Rows 0..file_rows-1 in the (memory-mapped) file, the rest in RAM."""

    def __init__(self, dim: int, directory: Path | None, token: bytes | None = None) -> None:
        self.dim, self.directory = dim, directory
        self.token = token or uuid.uuid4().bytes
        self.path: Path | None = None  # the published file, once there is one
        self.file_rows = 0
        self.tail = Growing(ROW_DTYPE, dim)  # rows after the file's
        self._map: np.ndarray | None = None
        self._fd: int | None = None  # the file, read directly while `cold`; closed with this object
        self._spool: str | None = None  # a private file rows are streamed into until it is published
        self._scratch = _Scratch()
        self._view: tuple[np.ndarray, faiss.IndexScalarQuantizer] | None = None  # see view_index
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            fd, self._spool = tempfile.mkstemp(dir=directory, prefix=".rerank-", suffix=".tmp")
            os.close(fd)
            weakref.finalize(self, _unlink, self._spool)  # an index dropped before it was saved
            with open(self._spool, "wb") as f:
                f.truncate(HEADER_BYTES)

    @property
    def rows(self) -> int:
        return self.file_rows + self.tail.n

    def append(self, x: np.ndarray) -> int:
        """Store rows (float32 in, float16 kept); returns the first one's number."""
        rows = np.ascontiguousarray(x, dtype=ROW_DTYPE)
        if self._spool is None or self.path is not None or self.tail.n:
            return self.file_rows + self.tail.extend(rows)
        with open(self._spool, "ab") as f:
            f.write(rows.tobytes())
        start, self.file_rows = self.file_rows, self.file_rows + len(rows)
        return start

    def get(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The rows, float16 (n, dim), gathered from the file and RAM (into `out`'s first n rows if given)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=ROW_DTYPE) if out is None else out[: len(rows)]
        if not self.tail.n:  # the common case: every row in the file
            self._from_file(rows, out)
        elif not self.file_rows:
            out[:] = self.tail.view[rows]
        else:
            in_file = rows < self.file_rows
            out[in_file] = self._from_file(rows[in_file])
            out[~in_file] = self.tail.view[rows[~in_file] - self.file_rows]
        return out

    def _from_file(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=ROW_DTYPE) if out is None else out
        if self.cold:
            self._read_cold(rows, out)
        else:
            out[:] = self._mapped()[rows]
        return out

    def best(self, rows: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k of `rows` with the highest inner product with `query`: (scores, rows), best first."""
        k = min(k, len(rows))
        if not k:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        rows = np.sort(np.asarray(rows, dtype=np.int64))  # ascending: the gather walks the file forwards
        scorer, room = self._scratch.get(self.dim, len(rows))
        self.get(rows, out=room)
        scorer.ntotal = len(rows)
        scores, where = np.empty((1, k), np.float32), np.empty((1, k), np.int64)
        q = np.ascontiguousarray(query, dtype=np.float32)
        scorer.search_c(1, swig_ptr(q), k, swig_ptr(scores), swig_ptr(where))  # type: ignore[attr-defined]
        return scores[0], rows[where[0]]

    def view_index(self) -> tuple[np.ndarray, faiss.IndexScalarQuantizer] | None:
        """(the mapping, the file's rows as a float16 FAISS index that reads it in place), for `IndexRefine`
        to score a shortlist by row number in C++ (no gather, no copy); None while some rows live in RAM.
        Whoever keeps the index keeps the mapping with it: it is unmapped when the array goes."""
        if self.tail.n or not self.file_rows or self.cold:
            return None
        mapped = self._mapped()
        view = self._view
        if view is None or view[0] is not mapped:
            index = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            # Its codes made a view, as FAISS's own mmap loading does: `create_view` wants a C++ shared_ptr
            # owner SWIG cannot pass, so the fields are set. `mapped` stays alive beside it in `_view`.
            codes: Any = index.codes  # a MaybeOwnedVector in faiss 1.15 (the stubs say std::vector)
            ptr, size = faiss.cast_integer_to_uint8_ptr(mapped.ctypes.data), mapped.nbytes  # type: ignore[attr-defined]
            codes.is_owned, codes.view_data, codes.view_size, codes.c_ptr, codes.c_size = False, ptr, size, ptr, size
            index.ntotal = len(mapped)
            view = self._view = (mapped, index)
        return view

    def _mapped(self) -> np.ndarray:
        if self._map is None or len(self._map) < self.file_rows:  # the spool grew since it was mapped
            fd = self._file()
            mapping = mmap.mmap(fd, _file_size(self.file_rows, self.dim), access=mmap.ACCESS_READ)
            if hasattr(mapping, "madvise"):
                mapping.madvise(mmap.MADV_RANDOM)
            # A plain array over the mapping (it keeps the mapping alive): numpy's memmap subclass makes every
            # gather build another memmap object, several times slower for a shortlist.
            self._map = np.frombuffer(mapping, ROW_DTYPE, self.file_rows * self.dim, HEADER_BYTES).reshape(-1, self.dim)
        return self._map

    def _file(self) -> int:
        """A descriptor of the file (the spool keeps its inode when it is published under its name)."""
        if self._fd is None:
            name = self.path or self._spool
            assert name is not None
            self._fd = os.open(name, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            weakref.finalize(self, os.close, self._fd)
        return self._fd

    @property
    def row_bytes(self) -> int:
        return self.dim * ROW_DTYPE.itemsize

    @property
    def cold(self) -> bool:
        """Whether the file's rows are read as mostly on disk (see the module's docstring)."""
        return _PREFETCH and self.file_rows * self.row_bytes > COLD_SHARE * USABLE_BYTES

    def _read_cold(self, rows: np.ndarray, out: np.ndarray) -> None:
        """`rows` (all in the file) into `out`: every read announced first, then read in file order."""
        fd, size = self._file(), self.row_bytes
        offsets = (HEADER_BYTES + rows * size).tolist()
        for offset in offsets:
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
        for i, offset in enumerate(offsets):
            if os.preadv(fd, [out[i]], offset) != size:
                raise ValueError(f"re-rank file ended before row {rows[i]}: truncated after it was opened")

    def file_bytes(self) -> int:
        return _file_size(self.file_rows, self.dim) if self.directory is not None else 0

    def publish(self, path: Path) -> None:
        """Seal the spooled rows under `path` (renamed into place, after its header); later rows stay in RAM.
        An index built without a directory writes its RAM rows out here."""
        if self.path is not None:
            return
        if self._spool is None:
            self.directory = path.parent
            fd, self._spool = tempfile.mkstemp(dir=path.parent, prefix=".rerank-", suffix=".tmp")
            weakref.finalize(self, _unlink, self._spool)
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * HEADER_BYTES + self.tail.view.tobytes())
            self.file_rows, self.tail = self.tail.n, Growing(ROW_DTYPE, self.dim)
        with open(self._spool, "r+b") as f:
            f.write(_HEADER.pack(MAGIC, self.token, self.dim, self.file_rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._spool, path)
        self.path = path

    @classmethod
    def open(cls, path: Path, dim: int, token: bytes, file_rows: int) -> "RerankFile":
        """The published file of the build `token`, mapped; ValueError if it is not exactly that."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise ValueError(f"re-rank file {path.name} is missing") from None
        except OSError as exc:
            raise ValueError(f"re-rank file {path.name} is unreadable: {exc.strerror or exc}") from exc
        try:  # checked and then used through this one descriptor: a file replaced in between is never read
            _check(fd, path.name, dim, token, file_rows)
        except BaseException:
            os.close(fd)
            raise
        store = cls(dim, None, token)
        store.directory, store.path, store.file_rows, store._fd = path.parent, path, file_rows, fd
        weakref.finalize(store, os.close, fd)
        return store


def _check(fd: int, name: str, dim: int, token: bytes, file_rows: int) -> None:
    """ValueError unless the open file is the published re-rank file of build `token`, whole."""
    try:
        header = os.pread(fd, _HEADER.size, 0) if hasattr(os, "pread") else _read_start(fd)
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise ValueError(f"re-rank file {name} is unreadable: {exc.strerror or exc}") from exc
    magic, found, found_dim, rows = _HEADER.unpack(header.ljust(_HEADER.size, b"\0"))
    if magic != MAGIC:
        raise ValueError(f"re-rank file {name} is not a re-rank file")
    if found != token or found_dim != dim or rows != file_rows:
        raise ValueError(f"re-rank file {name} belongs to another build")
    if size != _file_size(rows, dim):
        raise ValueError(f"re-rank file {name} has {size} bytes, its header says {rows} rows: truncated or damaged")


def _file_size(rows: int, dim: int) -> int:
    return HEADER_BYTES + rows * dim * ROW_DTYPE.itemsize


def _read_start(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, _HEADER.size)
