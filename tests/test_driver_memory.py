"""The driver's native heap: ``rp-anonymize`` limits glibc malloc's arenas before Ray's threads start, so that
memory freed by one thread is reused by the next instead of piling up in arenas of their own (BENCHMARKS.md,
"Driver memory")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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
    start = threading.Barrier(12)

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
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    path = tempfile.mktemp()
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    print(open(path).read().count("<heap nr="))
    os.unlink(path)
""")


def arenas(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", ARENAS_AFTER_THREADS, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_driver_limits_malloc_arenas_before_threads_start():
    assert arenas("plain") > 4  # glibc's default: an arena per thread, up to 8 a core
    assert arenas("cli") <= 2
