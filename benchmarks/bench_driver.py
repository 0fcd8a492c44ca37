"""Driver memory over a whole job: flat in run length? (issues 8 and 21).

Runs the real job (``run_job``, local Ray on 127.0.0.1 with 2 CPUs) in a fresh driver process over N small real
images, with a method whose own cost is about nothing so that a long run fits a session: the images and the
config are ``bench_overhead``'s (64-160 px JPEG and PNG, one in ``--face-every`` a real face; ``mask``, re-ID
gate on, one CenterFace pass, no output audit). The report is written at the end, as a user runs it.

While the job runs, this process samples the driver's ``/proc/<pid>/status`` every ``--every`` seconds and counts
the files written under the output prefix: private memory (RssAnon) is what must not grow with the dataset;
RssShmem is pages of Ray's shared-memory object store the driver touched reading result blocks (shared with the
raylet and bounded by the store's size); RssFile is shared libraries. Compare 1K with 100K:

    python benchmarks/bench_driver.py --images 1000
    python benchmarks/bench_driver.py --images 100000

Prints one JSON line (the samples, and the end of run); results go in BENCHMARKS.md with the commit and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_overhead import REPO, config, images


def run_driver(src: str, out: str) -> dict:
    """The driver side: its own local Ray, the job, and the driver's memory at the end (report written)."""
    import resource

    import rp_distributed.arrow_pool  # noqa: F401  first, as rp-anonymize's driver: Arrow's memory through jemalloc
    from rp_distributed.driver_memory import limit_arenas

    if os.environ.get("BENCH_ARENA_LIMIT", "1") == "1":  # as rp-anonymize's driver (0: glibc's default, as before)
        limit_arenas()
    import ray

    from rp_distributed.job.run import run_job

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    if os.environ.get("BENCH_CENSUS"):
        every = float(os.environ.get("BENCH_CENSUS_EVERY", 60))
        threading.Thread(target=census, args=(os.environ["BENCH_CENSUS"], every), daemon=True).start()
    t0 = time.time()
    try:
        result = run_job(config(), src, out, progress=False)
    finally:
        wall = time.time() - t0
        ray.shutdown()
    end = memory(os.getpid())
    return {"end_accounts": end_accounts(), "wall_s": round(wall, 1),
            "images_per_s": round(result.summary["images"] / wall, 1),
            "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "end_after_report": end, "images": result.summary["images"], "faces": result.summary["faces"],
            "by_status": result.summary["by_status"]}


def end_accounts() -> dict:
    """What the driver's private memory at the end is made of: each allocator's account, then RssAnon after each
    hands back what it can (glibc's trim, jemalloc's dirty pages purged at once), in that order."""
    import pyarrow as pa

    from rp_distributed.driver_memory import Trim

    steps = {"pymalloc": _or_none(pymalloc_held), "malloc": _or_none(malloc_held),
             "arrow_allocated_mib": round(pa.total_allocated_bytes() / 2**20, 1),
             "rss_anon": memory(os.getpid())["RssAnon"]}
    Trim(every_s=0.0)()  # the driver's own trim, now (off glibc it does nothing)
    steps["rss_anon_after_malloc_trim"] = memory(os.getpid())["RssAnon"]
    try:
        pa.jemalloc_set_decay_ms(0)
        pa.allocate_buffer(1 << 20)  # a jemalloc event, so the new decay time purges what it holds
        steps["rss_anon_after_jemalloc_purge"] = memory(os.getpid())["RssAnon"]
    except NotImplementedError:
        pass
    return steps


def _or_none(account):
    """``account()``, or None where it cannot be read (not glibc >= 2.33, or not pymalloc): the other figures
    still count."""
    try:
        return account()
    except (OSError, AttributeError):
        return None


def census(path: str, every: float = 60.0) -> None:
    """What the driver's Python heap holds, every ``every`` s (``BENCH_CENSUS=<file>``): pymalloc's blocks, glibc
    malloc's account and the most numerous object types, to tell Python objects that pile up from native memory
    (``BENCH_CENSUS_EVERY``: seconds between samples, 60)."""
    import collections
    import gc

    t0 = time.time()
    while True:
        time.sleep(every)
        kinds = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        sample = {"t_s": round(time.time() - t0), "rss": memory(os.getpid()),
                  "allocated_blocks": sys.getallocatedblocks(), "top": kinds.most_common(25)}
        sample.update(malloc=_or_none(malloc_held), pymalloc=_or_none(pymalloc_held))
        with open(path, "a") as f:
            f.write(json.dumps(sample) + "\n")


def pymalloc_held() -> dict:
    """pymalloc's account, MiB: its 1 MiB arenas held, the bytes of live blocks in them, and of free blocks
    (arenas held with few live blocks are fragmentation: an arena goes back to the system only when empty)."""
    import re
    import tempfile

    # sys._debugmallocstats writes to the C-level stderr: fd 2 points at a file for that moment (what other threads
    # write to stderr meanwhile goes there too: a benchmark's driver logs little).
    with tempfile.TemporaryFile("w+") as f:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read()

    def value(name: str) -> int:
        found = re.search(rf"# {name}\s*=\s*([\d,]+)", text)
        if found is None:
            raise AttributeError(f"no {name!r} in sys._debugmallocstats (pymalloc off?)")
        return int(found.group(1).replace(",", ""))

    return {"arenas": value("arenas allocated current"), "live": round(value("bytes in allocated blocks") / 2**20, 1),
            "free_blocks": round(value("bytes in available blocks") / 2**20, 1)}


def malloc_held() -> dict:
    """glibc malloc's own account, over all its arenas, MiB: ``in_use`` by the program (native code included:
    Ray's core worker, gRPC, Arrow's allocations outside its pool), ``free_held`` (freed, kept by malloc) and
    ``heap_mib`` (its arenas' size). Free memory that grows while in-use memory does not is the allocator's."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    m = libc.mallinfo2()
    return {"in_use": round((m.uordblks + m.hblkhd) / 2**20, 1), "free_held": round(m.fordblks / 2**20, 1),
            "mmapped": round(m.hblkhd / 2**20, 1), "heap_mib": round(m.arena / 2**20, 1)}


def memory(pid: int) -> dict:
    """The driver's resident memory by kind, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) // 1024 for k in ("RssAnon", "RssShmem", "RssFile")}


def files_under(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def sample_run(src: Path, out: Path, every: float) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--driver", str(src), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), RAY_BACKEND_LOG_LEVEL="fatal"))
    samples, t0 = [], time.time()
    while proc.poll() is None:
        time.sleep(every)
        try:
            mem = memory(proc.pid)
        except (FileNotFoundError, KeyError, ProcessLookupError):
            break
        samples.append({"t_s": round(time.time() - t0), "files_written": files_under(out), **mem})
    stdout, stderr = proc.communicate()
    if proc.returncode:
        sys.exit(stderr[-3000:])
    return {"samples_mib": samples, **json.loads(stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--face-every", type=int, default=20)
    p.add_argument("--every", type=float, default=30.0, help="seconds between samples of the driver's memory")
    p.add_argument("--cache", type=Path, default=Path("/tmp/rp-overhead-images"))
    p.add_argument("--driver", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.driver:
        print(json.dumps(run_driver(*args.driver)))
        return
    import tempfile

    src = images(args.cache, args.images, args.face_every)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        result = sample_run(src, Path(tmp) / "out", args.every)
    result.update(machine=f"{platform.machine()} {os.cpu_count()} cores", commit=commit, face_every=args.face_every,
                  load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
