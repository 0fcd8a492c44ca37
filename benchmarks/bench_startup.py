"""Start-up of one anonymizer actor: what every GPU actor of a job pays before its first face.

Each sample is a fresh Python process that does what a Ray worker does for the anonymizer stage: import the
libraries (``import_s``), then build ``stages.anonymize.AnonymizeFaces.from_config(cfg)`` (SDXL + FaceID adapter, the UNet batch probe, ArcFace, the
re-ID recognizer; ``load_s``). It reports both wall times, the process's resident memory after the imports,
its peak (VmHWM) and what it holds after loading, CUDA's peak allocation when on a GPU, and the warnings
diffusers logged while loading (a missing ``accelerate`` shows up here as "low_cpu_mem_usage").

    python benchmarks/bench_startup.py --repeats 3                      # tiny model, CPU, float32 and float16
    python benchmarks/bench_startup.py --model /models/full --device cuda --dtype float16

``--model``: a folder as ``make_tiny`` / ``make_random_model`` write it (sdxl/, ip-adapter/, arcface/);
default: a fresh tiny model in a temporary folder. One JSON line per dtype; results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def model_overrides(model: Path, device: str, dtype: str) -> list[str]:
    """Config overrides pointing the diffusion stage at a model folder written by ``make_tiny`` or
    ``make_random_model``."""
    variant = json.loads((model / "random_model.json").read_text()).get("variant") \
        if (model / "random_model.json").is_file() else None
    return [f"diffusion.model={model}/sdxl", f"diffusion.ip_adapter={model}/ip-adapter",
            f"diffusion.arcface={model}/arcface/w600k_r50.onnx", f"diffusion.device={device}",
            f"diffusion.dtype={dtype}", f"diffusion.variant={variant or 'null'}",
            f"diffusion.cache_dir={model}/cache"]


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage()[:200])


def import_libraries() -> None:
    """What the actor imports before it reads a weight (most of it lazily, inside its constructor): torch,
    diffusers' SDXL pipeline, transformers' CLIP, insightface's model zoo, dlib through the re-ID scorer."""
    import diffusers  # noqa: F401
    import insightface.model_zoo  # noqa: F401
    import torch  # noqa: F401
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionXLPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    import rp_distributed.diffusion.reverse  # noqa: F401
    import rp_distributed.faces.arcface  # noqa: F401
    import rp_distributed.stages.anonymize  # noqa: F401
    import rp_distributed.scoring  # noqa: F401


def child(cfg_json: str) -> dict:
    """One actor start-up in this (fresh) process: the imports, then the stage's constructor."""
    t0 = time.perf_counter()
    import_libraries()
    import torch

    from rp_distributed.config import JobConfig
    from rp_distributed.stages.anonymize import AnonymizeFaces

    import_s = time.perf_counter() - t0
    cfg = JobConfig.model_validate(json.loads(cfg_json))
    captured = _Captured()
    logging.getLogger("diffusers").addHandler(captured)
    cuda = cfg.diffusion.device == "cuda"
    rss_imports = _status_mib("VmRSS")
    t0 = time.perf_counter()
    stage = AnonymizeFaces.from_config(cfg)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    rp = stage.anonymizer.method.rp
    return {"import_s": round(import_s, 2), "load_s": round(load_s, 2),
            "rss_after_imports_mib": round(rss_imports), "peak_rss_mib": round(_status_mib("VmHWM")),
            "rss_after_load_mib": round(_status_mib("VmRSS")),
            "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "unet_batch_size": rp.batch_size, "diffusers_warnings": captured.messages}


def sample(cfg, repeats: int, timeout_s: float | None = None) -> dict:
    """``repeats`` fresh processes (each killed after ``timeout_s``); the median of each figure, and every
    sample."""
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, __file__, "--child", cfg.model_dump_json()], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=timeout_s)
        if proc.returncode:
            raise RuntimeError(f"start-up sample failed: {proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    keys = ("import_s", "load_s", "rss_after_imports_mib", "peak_rss_mib", "rss_after_load_mib")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["peak_over_imports_mib"] = statistics.median(r["peak_rss_mib"] - r["rss_after_imports_mib"] for r in runs)
    out.update(cuda_peak_gib=runs[-1]["cuda_peak_gib"], unet_batch_size=runs[-1]["unet_batch_size"],
               diffusers_warnings=sorted({m for r in runs for m in r["diffusers_warnings"]}), samples=runs)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model folder (default: a fresh tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    from rp_distributed.config import load_config
    from rp_distributed.diffusion import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else Path(tmp)
        if not args.model:
            make_tiny(model)
        for dtype in args.dtype:
            cfg = load_config(None, ["anonymizer.method=reverse_personalization"]
                              + model_overrides(model, args.device, dtype))
            print(json.dumps({"device": args.device, "dtype": dtype, **sample(cfg, args.repeats)}), flush=True)


if __name__ == "__main__":
    main()
