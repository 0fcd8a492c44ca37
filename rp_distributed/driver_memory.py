"""The driver's native heap over a long run: glibc malloc's arenas limited and its freed memory handed back.

Ray's core worker, gRPC and Arrow's internal (non-pool) allocations go through the C library's malloc in the driver,
from many threads. glibc gives threads arenas of their own (up to 8 per core) and keeps what is freed in each: memory
freed by one thread is not reused by another. Two arenas, and ``malloc_trim`` every minute, keep the heap smaller
(BENCHMARKS.md, "Driver memory"). Elsewhere than glibc (macOS, musl) nothing is done; a user's own setting
(``MALLOC_ARENA_MAX``, ``GLIBC_TUNABLES``) is kept.
"""

from __future__ import annotations

import ctypes
import os
import time

M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)
ARENAS = 2
TRIM_EVERY_S = 60.0


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


_LIBC = _glibc()


def limit_arenas(arenas: int = ARENAS) -> None:
    """At most ``arenas`` malloc arenas. Call it first thing in the process: glibc fixes its arena cap once more
    than 8 arenas exist, so after thread pools have started (Ray, the manifest's readers) it changes nothing."""
    if _LIBC is not None and "MALLOC_ARENA_MAX" not in os.environ and "GLIBC_TUNABLES" not in os.environ:
        _LIBC.mallopt(M_ARENA_MAX, arenas)


class Trim:
    """``malloc_trim(0)`` at most every ``every_s`` seconds: a few milliseconds each, called on every row of the
    driver's loop (the clock is checked, ~100 ns)."""

    def __init__(self, every_s: float = TRIM_EVERY_S):
        self.every_s, self._last = every_s, time.monotonic()
        self.trims = 0

    def __call__(self) -> None:
        if _LIBC is not None and time.monotonic() - self._last >= self.every_s:
            _LIBC.malloc_trim(0)
            self._last = time.monotonic()
            self.trims += 1
