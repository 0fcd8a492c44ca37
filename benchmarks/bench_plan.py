"""Plan + resume at scale: wall time and driver peak RSS of ``plan.make_plan`` (issue 8).

Lays out N listed inputs (empty ``.jpg`` files: the plan lists, it never reads), an output prefix where
an earlier run wrote every output, and that run's manifest of 3 rows per input (three faces each, parts
of 100K rows, every column of the real schema filled). One input in ten was written under other
anonymization settings, so the plan redoes it; the rest are skipped. The plan runs in a fresh process,
which reports its own wall time and peak RSS.

    python benchmarks/bench_plan.py --inputs 1000000        # ~3 min to lay out, on local disk
    python benchmarks/bench_plan.py --inputs 100000 --keep /tmp/plan-bench

Prints one JSON line; results go in BENCHMARKS.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FACES = 3
PART_ROWS = 100_000


def lay_out(root: Path, n: int, fingerprint: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rp_distributed import manifest

    src, out = root / "in", root / "out"
    for i in range(n):
        d = f"{i // 1000:04d}"
        if i % 1000 == 0:
            (src / d).mkdir(parents=True)
            (out / d).mkdir(parents=True)
        open(src / d / f"{i:07d}.jpg", "wb").close()
        open(out / d / f"{i:07d}.jpg", "wb").close()
    mdir = out / "_manifest"
    mdir.mkdir()
    rows_total = n * FACES
    for part, start in enumerate(range(0, rows_total, PART_ROWS)):
        idx = list(range(start, min(start + PART_ROWS, rows_total)))
        inputs = [i // FACES for i in idx]
        rels = [f"{i // 1000:04d}/{i:07d}.jpg" for i in inputs]
        cols = {}
        for field in manifest.SCHEMA:
            if field.name == "input_uri":
                cols[field.name] = pa.array([str(src / r) for r in rels])
            elif field.name == "rel_path":
                cols[field.name] = pa.array(rels)
            elif field.name == "output_uri":
                cols[field.name] = pa.array([str(out / r) for r in rels])
            elif field.name == "status":
                cols[field.name] = pa.array(["ok"] * len(idx))
            elif field.name == "settings_fingerprint":
                cols[field.name] = pa.array([fingerprint if i % 10 else "0" * 16 for i in inputs])
            elif field.name == "face_index":
                cols[field.name] = pa.array([i % FACES for i in idx], pa.int32())
            elif pa.types.is_string(field.type):
                cols[field.name] = pa.array([f"{field.name} of face {i}" for i in idx])
            elif pa.types.is_boolean(field.type):
                cols[field.name] = pa.array([False] * len(idx))
            else:
                cols[field.name] = pa.array([float(i % 997) for i in idx]).cast(field.type)
        pq.write_table(pa.table(cols, schema=manifest.SCHEMA), mdir / f"part-20260101T000000-aaaaaa-{part:05d}.parquet",
                       compression="zstd")


def measure(root: str) -> None:
    """In a fresh process: make the plan, print wall time, peak RSS and the plan's counts."""
    import resource

    from rp_distributed.config import anonymization_fingerprint, load_config
    from rp_distributed.job.plan import make_plan

    cfg = load_config(None, ["output.format=same"])
    t0 = time.perf_counter()
    plan = make_plan(cfg, f"{root}/in", f"{root}/out", anonymization_fingerprint(cfg))
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": round(wall, 1), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "todo": getattr(plan, "num_todo", None) or len(plan.todo), "skipped": plan.skipped, "redone_changed": plan.redone_changed}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", type=int, default=1_000_000)
    p.add_argument("--keep", default=None, help="lay out here (reused when it exists) instead of a temp dir")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure)
        return

    from rp_distributed.config import anonymization_fingerprint, load_config

    fp = anonymization_fingerprint(load_config(None, ["output.format=same"]))
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    root = Path(args.keep or tmp.name)
    t0 = time.perf_counter()
    if not (root / "out" / "_manifest").exists():
        lay_out(root, args.inputs, fp)
    layout_s = time.perf_counter() - t0
    proc = subprocess.run([sys.executable, __file__, "--measure", str(root)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(inputs=args.inputs, manifest_rows=args.inputs * FACES, layout_s=round(layout_s, 1),
                  machine=f"{platform.machine()} {os.cpu_count()} cores")
    print(json.dumps(result))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
