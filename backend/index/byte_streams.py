"""numpy's array reader and writer on top of the index cache's byte source and sink (backend/search/index_file.py)."""

import io
from collections.abc import Callable


class ByteSink(io.RawIOBase):
    """numpy's array writer on top of the cache's byte sink."""

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        self.sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def]
        self.sink(bytes(data))
        return len(data)


class ByteSource(io.RawIOBase):
    """numpy's array reader on top of the cache's byte source (which may return short reads)."""

    def __init__(self, source: Callable[[int], bytes]) -> None:
        self.source = source

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        parts, left = [], n
        while left > 0:
            chunk = self.source(left)
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)
