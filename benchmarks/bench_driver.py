"""Driver memory over a whole job, and the job's images/s (issue 8).

Writes N small real images (insightface's aligned Tom_Hanks_54745.png, one face, for one input in
``--face-every``; 96x96 crops of scikit-image's coffee, no face, for the rest), runs the real job on a
local Ray in a fresh driver process with ``anonymizer.method=blur``, and reports the driver's peak RSS
(the Ray workers are other processes), split at the end into its private memory and the pages of Ray's
shared-memory object store it touched while reading result blocks, and images/s. The driver's memory must not grow with the dataset:
compare 1K and 20K.

    python benchmarks/bench_driver.py --images 1000
    python benchmarks/bench_driver.py --images 20000

Prints one JSON line; results go in BENCHMARKS.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def lay_out(src: Path, n: int, face_every: int) -> None:
    import importlib.util

    import numpy as np
    from PIL import Image
    from skimage import data

    face = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / \
        "data/images/Tom_Hanks_54745.png"
    coffee = data.coffee()
    for i in range(n):
        d = src / f"{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        if i % face_every == 0:
            shutil.copy(face, d / f"{i:06d}.png")
        else:
            y, x = (i * 37) % (coffee.shape[0] - 96), (i * 53) % (coffee.shape[1] - 96)
            Image.fromarray(np.ascontiguousarray(coffee[y:y + 96, x:x + 96])).save(d / f"{i:06d}.png")


def measure(src: str, out: str) -> None:
    import resource

    from rp_distributed.config import load_config
    from rp_distributed.job.run import run_job

    cfg = load_config(None, ["anonymizer.method=blur", "detection.upsample=1", "ray.num_cpus=2",
                             "detection.resources.num_cpus=0.5", "detection.resources.batch_size=16",
                             "anonymizer.resources.num_cpus=0.25", "anonymizer.resources.batch_size=16",
                             "merge.resources.num_cpus=0.5", "merge.resources.batch_size=16"])
    t0 = time.perf_counter()
    result = run_job(cfg, src, out, progress=False)
    wall = time.perf_counter() - t0
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    print(json.dumps({"wall_s": round(wall, 1), "images_per_s": round(result.summary["images"] / wall, 1),
                      "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      # At the end: the driver's private memory, and pages of Ray's shared-memory object store
                      # it has touched reading result blocks (shared with the raylet, bounded by the store).
                      "driver_private_mib": int(status["RssAnon"].split()[0]) // 1024,
                      "driver_object_store_pages_mib": int(status["RssShmem"].split()[0]) // 1024,
                      "images": result.summary["images"], "faces": result.summary["faces"],
                      "by_status": result.summary["by_status"]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--face-every", type=int, default=20)
    p.add_argument("--measure", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        lay_out(src, args.images, args.face_every)
        proc = subprocess.run([sys.executable, __file__, "--measure", str(src), str(out)], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(machine=f"{platform.machine()} {os.cpu_count()} cores", face_every=args.face_every)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
