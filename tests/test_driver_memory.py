"""The driver's native heap: ``rp-anonymize`` limits glibc malloc's arenas before any thread starts, so that memory
freed by one thread is reused by the next instead of piling up in arenas of their own (BENCHMARKS.md, "Driver
memory")."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from rp_distributed import driver_memory

# A process that starts 12 threads, each allocating through the C library's malloc (as Ray's core worker and gRPC
# threads do), and prints how many malloc arenas the process then has (glibc's own count, from malloc_info).
ARENAS_AFTER_THREADS = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading
    if sys.argv[1] == "cli":
        from rp_distributed import cli
        cli.main(["config", "show"])  # any command: the limit is set on the way in
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    start = threading.Barrier(12, timeout=30)

    def allocate():
        start.wait()  # all alive at once: no thread's arena is free for another to take over
        held = [libc.malloc(4096) for _ in range(200)]
        start.wait()
        for p in held:
            libc.free(p)

    threads = [threading.Thread(target=allocate) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    fd, path = tempfile.mkstemp()
    os.close(fd)
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    print(open(path).read().count("<heap nr="))
    os.unlink(path)
""")


def arenas(mode: str, **env: str) -> int:
    plain = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", ARENAS_AFTER_THREADS, mode], capture_output=True, text=True,
                         timeout=120, env={**plain, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(driver_memory._LIBC is None, reason="glibc's malloc")
def test_the_driver_limits_malloc_arenas_before_threads_start():
    assert arenas("plain") > 4  # glibc's default: an arena per thread, up to 8 a core
    assert arenas("cli") <= 2
    assert arenas("cli", MALLOC_ARENA_MAX="4") == 4  # the user's own setting is kept


# A worker thread fills 128 MiB with 1 KiB blocks and frees all but one in 32: free memory glibc keeps (no arena can
# shrink from its top while a block lies above). Prints the process's private memory before and after one Trim.
FREED_THEN_TRIMMED = textwrap.dedent("""
    import ctypes, threading
    from rp_distributed.driver_memory import Trim

    def anon():
        return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) >> 10

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    kept = []

    def allocate():
        blocks = [libc.malloc(1024) for _ in range(128 * 1024)]
        for i, p in enumerate(blocks):
            ctypes.memset(p, 1, 1024)
            if i % 32:
                libc.free(p)
            else:
                kept.append(p)

    t = threading.Thread(target=allocate)
    t.start()
    t.join()
    before = anon()
    trim = Trim(every_s=0.0)
    trim()
    print(before, anon(), trim.trims)
""")


@pytest.mark.skipif(driver_memory._LIBC is None, reason="glibc's malloc")
def test_trim_hands_freed_memory_back():
    out = subprocess.run([sys.executable, "-c", FREED_THEN_TRIMMED], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after, trims = map(int, out.stdout.split())
    assert trims == 1 and before - after > 64  # of the ~124 MiB freed between kept blocks, most goes back
    trim = driver_memory.Trim()  # the driver's: once a minute, not on every row
    trim()
    assert trim.trims == 0
