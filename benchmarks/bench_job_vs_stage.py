"""Images/s of the whole job against the anonymizer stage alone, on the same inputs (issue 8).

The anonymizer is the expensive stage; the job around it (listing, detection, merge, re-ID checks,
writes, the manifest) should hide behind it. Both sides run reverse personalization on the tiny model
with one torch thread, as if the anonymizer owned one device and the CPU stages the other core:

- stage alone: ``Anonymizer`` in this process on the faces ``DetectFaces`` found (detection untimed);
- whole job: ``run_job`` on a local Ray with 2 CPUs: the anonymizer pool gets 1 CPU, detection and
  merge share the other.

    python benchmarks/bench_job_vs_stage.py --copies 4 --steps 4 --size 64

Prints one JSON line; results go in BENCHMARKS.md with the machine named. On a GPU cluster the same
comparison is `--device cuda` with the real model (not run here: no GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def config(model: Path, steps: int, size: int, device: str):
    from rp_distributed.config import load_config

    return load_config(None, [
        "anonymizer.method=reverse_personalization", f"diffusion.model={model}/sdxl",
        f"diffusion.ip_adapter={model}/ip-adapter", f"diffusion.arcface={model}/arcface/w600k_r50.onnx",
        f"diffusion.device={device}", "diffusion.dtype=float32", f"diffusion.num_inversion_steps={steps}",
        f"alignment.face_size={size}", "privacy.escalate=false", "anonymizer.face_batch_size=6",
        "ray.num_cpus=2", "anonymizer.resources.num_cpus=1", "anonymizer.resources.batch_size=1",
        "detection.resources.num_cpus=0.5", "detection.resources.batch_size=1",
        "merge.resources.num_cpus=0.5", "merge.resources.batch_size=1", "output.format=png"])


def stage_alone(cfg, src: Path) -> dict:
    import torch

    from rp_distributed.anonymizer import Anonymizer
    from rp_distributed.records import ImageRow
    from rp_distributed.stages.detect import DetectFaces

    torch.set_num_threads(1)
    detect = DetectFaces.from_config(cfg)
    rows = [detect.process(ImageRow.of({"input_uri": str(p), "rel_path": p.name, "output_uri": "-"})) for p in sorted(src.iterdir())]
    anonymizer = Anonymizer.from_config(cfg)
    t0 = time.perf_counter()
    for row in rows:  # one image per call, as the stage gets them with batch_size 1
        anonymizer(row.payload.faces)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 1), "images_per_s": round(len(rows) / wall, 3),
            "faces": sum(len(r.payload.faces) for r in rows)}


def whole_job(cfg_json: str, src: str, out: str) -> None:
    from rp_distributed.config import JobConfig
    from rp_distributed.job.run import run_job

    cfg = JobConfig.model_validate(json.loads(cfg_json))
    t0 = time.perf_counter()
    result = run_job(cfg, src, out, progress=False)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": round(wall, 1), "images_per_s": round(result.summary["images"] / wall, 3),
                      "faces": result.summary["faces"]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/tiny")
    p.add_argument("--copies", type=int, default=4, help="copies of t1.jpg (six faces each)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--whole-job", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.whole_job:
        whole_job(*args.whole_job)
        return
    model = Path(args.model).resolve()
    cfg = config(model, args.steps, args.size, args.device)
    t1 = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / "data/images/t1.jpg"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for i in range(args.copies):
            shutil.copy(t1, src / f"t1-{i}.jpg")
        alone = stage_alone(cfg, src)
        proc = subprocess.run([sys.executable, __file__, "--whole-job", cfg.model_dump_json(), str(src),
                               str(Path(tmp) / "out")], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        job = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores", "images": args.copies,
                      "steps": args.steps, "size": args.size, "stage_alone": alone, "whole_job": job,
                      "job_over_stage": round(job["images_per_s"] / alone["images_per_s"], 3)}))


if __name__ == "__main__":
    main()
