"""``rp-anonymize verify`` over a big local export: wall time and peak RSS.

Writes ``--outputs`` small PNG outputs (one 32x32 image, written once per key, 1,000 keys a folder) and a manifest
saying each was written (status ``no_face``, its ``output_sha256``, parts of ``--part-rows`` rows, zstd) with the
run's ``config-<run_id>.json``, then runs ``verify --dry-run`` in a fresh process that reports its wall time and
peak RSS. Every object is listed, read, hashed and walked for metadata, so this measures the whole gate.

    python benchmarks/bench_verify.py --outputs 100000                     # a temp dir
    python benchmarks/bench_verify.py --outputs 1000000 --root /work/tmp/verify-bench

Prints one JSON line; results go in BENCHMARKS.md with the machine named.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

RUN = "20260301T080000-a1b2c3"

CHILD = """
import json, resource, sys, time
from rp_distributed.verify import verify
t0 = time.perf_counter()
outcome = verify(sys.argv[1], dry_run=True)
print(json.dumps({"verdict": outcome.verdict.value, "reason": outcome.reason[:200], "counts": outcome.facts.counts,
                  "wall_s": round(time.perf_counter() - t0, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def make_export(root: Path, n: int, part_rows: int) -> None:
    from rp_distributed.manifest import SCHEMA

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    (root / "_manifest").mkdir(parents=True, exist_ok=True)
    rels = [f"d{i // 1000:05d}/img{i:08d}.png" for i in range(n)]
    for folder in sorted({r.split("/")[0] for r in rels}):
        (root / folder).mkdir(exist_ok=True)
    for rel in rels:
        (root / rel).write_bytes(data)
    prefix = str(root)
    for part, start in enumerate(range(0, n, part_rows)):
        chunk = rels[start:start + part_rows]
        cols = {"run_id": [RUN] * len(chunk), "input_uri": [f"s3://raw/{r}" for r in chunk], "rel_path": chunk,
                "output_uri": [f"{prefix}/{r}" for r in chunk], "status": ["no_face"] * len(chunk),
                "settings_fingerprint": ["5be1e1d2c0a4f711"] * len(chunk), "num_faces": [0] * len(chunk),
                "output_sha256": [sha] * len(chunk)}
        table = pa.table({name: pa.array(cols.get(name, [None] * len(chunk)), SCHEMA.field(name).type)
                          for name in SCHEMA.names})
        pq.write_table(table, root / "_manifest" / f"part-{RUN}-{part:05d}.parquet", compression="zstd")
    (root / "_manifest" / f"config-{RUN}.json").write_text(json.dumps({"run_id": RUN, "output_uri": prefix,
                                                                       "config": {}}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outputs", type=int, default=100_000)
    ap.add_argument("--part-rows", type=int, default=100_000)
    ap.add_argument("--root", help="export folder (default: a temp dir, removed after)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp) / "export"
        if not (root / "_manifest").exists():
            make_export(root, args.outputs, args.part_rows)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, env=env,
                             check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"bench": "verify", "outputs": args.outputs, "machine": platform.machine(),
                          "cpus": os.cpu_count(), **result}))


if __name__ == "__main__":
    main()
