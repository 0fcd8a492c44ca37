"""One command for the day a GPU is lent: every unmeasured GPU figure of the project in under 8 minutes on one
H100/H200, with no model hub (random weights of the real shapes, built from the configs in the repository).

    make gpu-check          # python benchmarks/gpu_check.py --out gpu-check.json
    make gpu-check-smoke    # python benchmarks/gpu_check.py --cpu-smoke: the same code, tiny model, CPU (~2 min)

Parts, in order, each with a time estimate; a part whose estimate exceeds the time left is skipped and the JSON
and the table say so (``--budget-s``, default 450 s):
1. build: full-size SDXL base 1.0 + IP-Adapter-FaceID shapes + an IResNet-50 ArcFace, random weights, float16,
   written as the published fp16 files (diffusion.architectures, diffusion.tiny.make_random_model);
2. startup: one anonymizer actor's start-up in a fresh process: wall, peak RSS, CUDA peak, the batch
   ``unet_batch_size: auto`` chooses (benchmarks/bench_startup.py);
3. load: the same actor in this process (configs/sdxl.yaml, model paths pointed at the random set);
4. faces: t1.jpg's six people through the detection stage (dlib HOG: buffalo_l is not on the node) at 1024 px;
5. unet_eager: guided UNet calls at 1, 8, 16, 32 faces (2 image-evaluations each): evaluations/s, peak memory;
6. hot_loop: one face through ReversePersonalizer.invert + generate at the reference settings;
7. arcface: the ArcFace ONNX through onnxruntime on CUDA (and on the CPU provider for comparison);
8. stage: the anonymizer stage (rp_distributed.anonymizer.Anonymizer) on every face in this process;
9. unet_compiled: torch.compile (inductor) at the auto batch, when it fits before the job;
10. whole_job: run_job on a local Ray over the same images in a fresh process; the ratio to the stage.
Escalation is off in parts 8 and 10: with random weights re-identification outcomes mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import gpu_check_parts as parts
from bench_startup import model_overrides
from gpu_check_parts import REPO, Settings

TARGET_S_PER_FACE = 4.2  # one H100/H200, 1024 px, reference settings (MLPerf v5.0 SDXL rate on H200: 94.9 evals/s)
TARGET_EVALS_PER_S = 400 / TARGET_S_PER_FACE
TARGET_JOB_RATIO = 1.10  # the whole job within 10% of the anonymizer stage alone

COMMON = ["detection.backend=dlib", "detection.model=hog", "detection.model_dir=null", "privacy.escalate=false", "output.format=png"]
CPU_SMOKE = ["diffusion.num_inversion_steps=4", "alignment.face_size=64", "ray.num_cpus=2",
             "diffusion.arcface_providers=[CPUExecutionProvider]", "anonymizer.resources.num_gpus=0",
             "anonymizer.resources.num_cpus=1", "anonymizer.resources.concurrency=1",
             "detection.resources.num_cpus=0.5", "detection.resources.concurrency=1",
             "merge.resources.num_cpus=0.5", "merge.resources.concurrency=1"]


def settings(cpu_smoke: bool) -> Settings:
    if cpu_smoke:
        return Settings(cuda=False, arch="tiny", dtype="float32", variant=None, face_size=64, steps=4,
                        unet_batches=[1, 2, 4], images=1, compile_backend="aot_eager", arcface_faces=8,
                        overrides=COMMON + CPU_SMOKE)
    return Settings(cuda=True, arch="sdxl", dtype="float16", variant="fp16", face_size=1024, steps=100,
                    unet_batches=[1, 8, 16, 32], images=2, compile_backend="inductor", arcface_faces=32,
                    overrides=COMMON)


def job_config(s: Settings, model: Path):
    """configs/sdxl.yaml (the GPU setting: reference parameters, float16, batch auto) on the random model set."""
    from rp_distributed.config import load_config

    device = "cuda" if s.cuda else "cpu"
    return load_config(REPO / "configs" / "sdxl.yaml", model_overrides(model, device, s.dtype) + s.overrides)


class Run:
    """The parts' results and the time budget."""

    def __init__(self, budget_s: float):
        self.budget_s, self.t0 = budget_s, time.monotonic()
        self.parts: dict[str, dict] = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def part(self, name: str, estimate_s: float, fn, reserve_s: float = 0.0) -> dict | None:
        """Run ``fn`` unless ``estimate_s`` (+ ``reserve_s`` kept for later parts) exceeds the time left."""
        if estimate_s + reserve_s > self.left():
            self.parts[name] = {"status": "skipped", "reason": f"estimated {estimate_s:.0f} s (+{reserve_s:.0f} s "
                                f"kept for later parts) > {max(self.left(), 0):.0f} s left of the budget"}
            print(f"[gpu-check] {name}: skipped ({self.parts[name]['reason']})", flush=True)
            return None
        print(f"[gpu-check] {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
            self.parts[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:1500],
                                "traceback": traceback.format_exc()[-3000:], "wall_s": round(time.monotonic() - t0, 1)}
            print(f"[gpu-check] {name}: FAILED {self.parts[name]['error'][:300]}", flush=True)
            return None
        self.parts[name] = {"status": "ok", "wall_s": round(time.monotonic() - t0, 1), **out}
        return self.parts[name]

    def get(self, name: str, key: str):
        return self.parts.get(name, {}).get(key)


def machine(s: Settings) -> dict:
    import diffusers
    import onnxruntime
    import torch

    info = {"host": platform.node(), "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "onnxruntime": onnxruntime.__version__}
    if s.cuda:
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    try:
        info["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def measure(run: Run, s: Settings, work: Path) -> None:
    """Parts 1-10 (module docstring)."""
    from rp_distributed.anonymizer import Anonymizer

    model, held = work / "model", {}
    if not s.cuda:  # as the job's CPU actor (num_cpus 1) runs: two torch threads stall on shared cores
        import torch

        torch.set_num_threads(1)
    if not run.part("build", 150 if s.cuda else 30, lambda: parts.build_model(s, model)):
        return
    cfg = job_config(s, model)
    run.part("startup", 120 if s.cuda else 40, lambda: parts.startup(s, cfg, timeout_s=max(run.left(), 1)))
    load_est = 1.5 * (run.get("startup", "load_s") or 60) + 10

    def load():
        t0 = time.perf_counter()
        held["anonymizer"] = Anonymizer.from_config(cfg)
        rp = held["anonymizer"].method.rp
        return {"load_s": round(time.perf_counter() - t0, 2), "unet_batch_size": rp.batch_size,
                "face_batch_size": held["anonymizer"].method.face_batch_size, "resident_gib": parts.cuda_resident_gib(s)}

    if not run.part("load", load_est, load):
        return
    rp = held["anonymizer"].method.rp
    faces = run.part("faces", 30, lambda: {"faces": len(held.setdefault("faces", parts.real_faces(cfg, s.images)))})
    if not faces:
        return
    faces = held["faces"]
    run.part("unet_eager", 20, lambda: parts.unet_rate(s, rp, s.unet_batches, time.monotonic() + min(90, run.left())))
    rate = run.get("unet_eager", "best_unet_evals_per_s") or 20.0
    one_call = next((r["s_per_call"] for r in run.get("unet_eager", "rows") or [] if r.get("faces") == 1), 0.1)
    run.part("hot_loop", 100 * one_call + 2 * s.steps / rate + 10, lambda: parts.hot_loop(s, rp, faces[0]))
    run.part("arcface", 20, lambda: parts.arcface(s, model / "arcface" / "w600k_r50.onnx", faces))
    stage_est = len(faces) * 4 * s.steps / rate * 1.5 + 10
    run.part("stage", stage_est, lambda: parts.stage_alone(s, held["anonymizer"], faces))
    start = (run.get("startup", "import_s") or 15) + (run.get("startup", "load_s") or 30)
    job_est = 1.3 * (run.get("stage", "wall_s") or stage_est) + start + 45
    run.part("unet_compiled", 240 if s.cuda else 60, lambda: parts.compiled_rate(s, rp, rp.batch_size),
             reserve_s=job_est)
    held.clear()
    del rp
    parts.free_device(s)
    job = run.part("whole_job", job_est, lambda: parts.whole_job(cfg, s.images, work, timeout_s=max(run.left(), 1)))
    if job and run.get("stage", "wall_s"):
        job["job_over_stage"] = round(job["wall_s"] / run.get("stage", "wall_s"), 3)
        job["anonymize_over_stage"] = round(job["anonymize_s"] / run.get("stage", "wall_s"), 3)
        job["outside_anonymizer_s"] = round(job["wall_s"] - job["anonymize_s"], 1)  # Ray, start-up, CPU stages


def _fmt(v, unit: str = "") -> str:
    return "—" if v is None else (f"{v:g}{unit}" if isinstance(v, (int, float)) else str(v))


def target_rows(run: Run, s: Settings) -> list[dict]:
    """Each figure, its target (None: reported, no target) and whether it meets it."""
    g, p = run.get, run.parts
    size = f"{s.face_size} px, {s.steps} steps"
    rows = [
        ("s per face, anonymizer stage", "stage", "s_per_face", f"{_fmt(g('stage', 'faces'))} faces, {size}, batch auto",
         "<=", TARGET_S_PER_FACE),
        ("UNet image-evaluations/s, best eager batch", "unet_eager", "best_unet_evals_per_s",
         f"at {_fmt(g('unet_eager', 'best_faces_per_call'))} faces per call", ">=", round(TARGET_EVALS_PER_S, 1)),
        ("UNet image-evaluations/s, compiled", "unet_compiled", "unet_evals_per_s",
         f"{s.compile_backend}, {_fmt(g('unet_compiled', 'faces'))} faces per call", None, None),
        ("whole job / anonymizer stage, wall", "whole_job", "job_over_stage", "same faces, local Ray", "<=",
         TARGET_JOB_RATIO),
        ("anonymizer's own time in the job / stage", "whole_job", "anonymize_over_stage",
         f"job wall minus it: {_fmt(g('whole_job', 'outside_anonymizer_s'))} s", None, None),
        ("one face alone, s", "hot_loop", "s_per_face", size, None, None),
        ("peak GPU memory, one face, GiB", "hot_loop", "peak_gib", "", None, None),
        ("unet_batch_size auto's choice", "load", "unet_batch_size", "samples per UNet call", None, None),
        ("actor start-up, load s", "startup", "load_s", f"+ {_fmt(g('startup', 'import_s'))} s imports", None, None),
        ("actor start-up, peak RSS MiB", "startup", "peak_rss_mib", "", None, None),
        ("ArcFace faces/s, CUDA", "arcface", "cuda_faces_per_s", f"CPU: {_fmt(g('arcface', 'cpu_faces_per_s'))}",
         None, None),
    ]
    out = []
    for figure, part, key, note, op, target in rows:
        value, status = g(part, key), p.get(part, {}).get("status", "not run")
        if value is None:
            verdict = status if status != "ok" else "not measured"
        elif op is None:
            verdict = "reported"
        elif not s.cuda:
            verdict = "n/a (cpu smoke)"
        else:
            verdict = "meets" if (value <= target if op == "<=" else value >= target) else "misses"
        out.append({"figure": figure, "measured": value, "note": note, "target": None if op is None else
                    f"{op} {target:g}", "verdict": verdict})
    return out


def print_table(rows: list[dict], run: Run) -> None:
    print(f"\n{'figure':44} {'measured':>10}  {'target':>8}  {'verdict':16} note")
    for r in rows:
        print(f"{r['figure']:44} {_fmt(r['measured']):>10}  {r['target'] or '—':>8}  {r['verdict']:16} {r['note']}")
    for name, part in run.parts.items():
        if part["status"] != "ok":
            print(f"  {name}: {part['status']}: {part.get('reason') or part.get('error', '')[:300]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the same code path on the tiny model on the CPU")
    p.add_argument("--out", default="gpu-check.json", help="the JSON written at the end")
    p.add_argument("--budget-s", type=float, default=None, help="time budget (default: 450 on CUDA, 600 smoke)")
    p.add_argument("--work", default=None, help="folder for the model set and the job (default: a temporary one)")
    p.add_argument("--job-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job_child:
        print(json.dumps(parts.job_child(*args.job_child)))
        return
    s = settings(args.cpu_smoke)
    if s.cuda:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu-check: no CUDA device (torch.cuda.is_available() is False); --cpu-smoke runs on the CPU")
    run = Run(args.budget_s or (450 if s.cuda else 600))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        measure(run, s, Path(tmp))
    rows = target_rows(run, s)
    result = {"mode": "cuda" if s.cuda else "cpu-smoke", "machine": machine(s), "budget_s": run.budget_s,
              "wall_s": round(time.monotonic() - run.t0, 1), "settings": vars(s), "parts": run.parts, "table": rows}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print_table(rows, run)
    print(f"\n{result['mode']}: {result['wall_s']} s of a {run.budget_s:g} s budget; wrote {args.out}")


if __name__ == "__main__":
    main()
