"""The driver's native heap over a long run: glibc malloc's arenas limited and its freed memory handed back.

Ray's core worker, gRPC and Arrow's small buffers allocate through the C library's malloc in the driver, from many
threads. glibc gives threads arenas of their own (up to 8 per core) and keeps what is freed in them: over a long run
the driver's private memory crept up while what it held did not (BENCHMARKS.md, "Driver memory"). Two arenas, and
``malloc_trim`` every minute, hand that memory back. Elsewhere than glibc (macOS, musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import time

M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)
ARENAS = 2
TRIM_EVERY_S = 60.0


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _glibc()


def limit_arenas(arenas: int = ARENAS) -> None:
    """At most ``arenas`` malloc arenas from now on: call before the threads start (ray.init)."""
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, arenas)


class Trim:
    """``malloc_trim(0)`` at most every ``every_s`` seconds: a few milliseconds each, on the driver's row loop."""

    def __init__(self, every_s: float = TRIM_EVERY_S):
        self.every_s, self._last = every_s, time.monotonic()

    def __call__(self) -> None:
        if _LIBC is not None and time.monotonic() - self._last >= self.every_s:
            _LIBC.malloc_trim(0)
            self._last = time.monotonic()
