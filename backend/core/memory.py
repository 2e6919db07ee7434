"""Giving freed heap memory back to the operating system."""

import ctypes
import ctypes.util

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
