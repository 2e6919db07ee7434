"""The heap of a long-running process: how many malloc arenas it keeps, giving freed memory back, and keeping
Python's cyclic garbage collector off the objects that live as long as the process."""

import ctypes
import ctypes.util
import gc
import os

_LIBC = ctypes.util.find_library("c")


def release_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc's `malloc_trim`; nothing elsewhere). After a large,
    short-lived computation (stage 1 training reads every given label's vector), glibc keeps the freed
    pages in its arenas, so the server's RSS would stay at the computation's peak although nothing holds it."""
    if _LIBC is None:
        return
    try:
        trim = ctypes.CDLL(_LIBC).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    trim(0)


M_ARENA_MAX = -8  # glibc's mallopt parameter number
SERVER_ARENAS = 2


def limit_malloc_arenas(arenas: int = SERVER_ARENAS) -> None:
    """Let glibc keep at most `arenas` malloc arenas (unless MALLOC_ARENA_MAX says otherwise). By default it
    makes up to 8 per core, one per thread that meets contention, and keeps each one's freed pages: a server
    whose 40 request threads, job thread and ONNX Runtime's threads all allocate grew 1.62x its idle RSS
    under 16 readers, uploads and a catalogue job, 1.32x with two arenas (measured at 100k vectors)."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(_LIBC).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(M_ARENA_MAX, arenas)


def freeze_startup_objects() -> None:
    """Collect once, then move every object alive after start-up (the imported libraries, the model, the
    index's Python side: about 340,000 of them) to the collector's permanent generation, so that no later
    full collection walks them again. Without it, the first full collection after start-up took 120-400 ms
    in whichever request allocated at that moment (one /status of the first ten, measured at 2k and 1M
    vectors), and every later one as long again."""
    gc.collect()
    gc.freeze()


def unfreeze_startup_objects() -> None:
    """Undo `freeze_startup_objects` as the server stops: frozen objects are never collected, so an app
    started and stopped in one process (tests start many) would otherwise leave its garbage for good."""
    gc.unfreeze()
