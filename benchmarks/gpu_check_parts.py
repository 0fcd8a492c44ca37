"""The measurements of ``gpu_check.py``, one function per part. Each takes the run's ``Settings`` (and what
earlier parts produced) and returns a dict of figures. CUDA-only calls are the synchronisation, the peak-memory
counters and onnxruntime's CUDA provider; everything else is the code the CPU smoke runs too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    cuda: bool
    arch: str  # tiny | sdxl (diffusion.architectures)
    dtype: str  # float16 | float32
    variant: str | None  # weights file variant written and loaded (fp16 as published)
    face_size: int
    steps: int
    unet_batches: list[int]
    images: int  # copies of t1.jpg (six faces each) for the stage-vs-job comparison
    compile_backend: str
    arcface_faces: int
    overrides: list[str]  # config overrides on top of configs/sdxl.yaml for this machine


def sync(s: Settings) -> None:
    if s.cuda:
        import torch

        torch.cuda.synchronize()


def best_of_3(s: Settings, call) -> float:
    """The fastest of three timed ``call()``s, each synchronized with the device."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        call()
        sync(s)
        times.append(time.perf_counter() - t0)
    return min(times)


def cuda_peak_gib(s: Settings, reset: bool = False) -> float | None:
    """Peak CUDA allocation since the last reset (None on the CPU)."""
    if not s.cuda:
        return None
    import torch

    peak = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def cuda_resident_gib(s: Settings) -> float | None:
    """CUDA memory held by live tensors now (the loaded models; None on the CPU)."""
    if not s.cuda:
        return None
    import torch

    return round(torch.cuda.memory_allocated() / 2**30, 2)


def free_device(s: Settings) -> None:
    import gc

    gc.collect()
    if s.cuda:
        import torch

        torch.cuda.empty_cache()


def t1_path() -> Path:
    import importlib.util

    return Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / "data/images/t1.jpg"


def build_model(s: Settings, out: Path) -> dict:
    """The random-weight model set of ``s.arch`` written to ``out`` (weights initialised on the device)."""
    import torch

    from rp_distributed.diffusion.tiny import make_random_model

    dtype = getattr(torch, s.dtype)
    paths = make_random_model(out, s.arch, dtype=dtype, device="cuda" if s.cuda else "cpu", variant=s.variant)
    free_device(s)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"architecture": s.arch, "dtype": s.dtype, "variant": s.variant, "gib_on_disk": round(size / 2**30, 2),
            "unet": str(paths["model"] / "unet")}


def startup(s: Settings, cfg, timeout_s: float) -> dict:
    """One anonymizer actor's start-up in a fresh process (benchmarks/bench_startup.py)."""
    from bench_startup import sample

    out = sample(cfg, repeats=1, timeout_s=timeout_s)
    out.pop("samples")
    return out


def unet_rate(s: Settings, rp, batches: list[int], deadline: float) -> dict:
    """Guided UNet calls (both branches of b samples: 2b image-evaluations) at each batch b, eager, as the hot
    loop makes them; stops at the first batch that does not fit in memory or in the time left."""
    import torch

    size = (s.face_size, s.face_size)
    rows, last = [], None
    for b in batches:
        if last is not None and time.monotonic() + 5 * last["s_per_call"] * b / last["faces"] > deadline:
            rows.append({"faces": b, "skipped": "over this part's time budget"})
            break
        try:
            cuda_peak_gib(s, reset=True)
            rp.probe_call(b, size)  # warm-up (kernel selection, allocator)
            sync(s)
            best = best_of_3(s, lambda: rp.probe_call(b, size))
        except torch.cuda.OutOfMemoryError:
            rows.append({"faces": b, "oom": True})
            free_device(s)
            break
        last = {"faces": b, "images_per_call": 2 * b, "s_per_call": round(best, 4),
                "unet_evals_per_s": round(2 * b / best, 1), "peak_gib": cuda_peak_gib(s)}
        rows.append(last)
    measured = [r for r in rows if "unet_evals_per_s" in r]
    best = max(measured, key=lambda r: r["unet_evals_per_s"]) if measured else None
    return {"rows": rows, "best_unet_evals_per_s": best and best["unet_evals_per_s"],
            "best_faces_per_call": best and best["faces"]}


def real_faces(cfg, images: int) -> list:
    """The aligned faces of ``images`` copies of t1.jpg (six people), as the detection stage emits them
    (crops at alignment.face_size, ArcFace embeddings, per-face seeds)."""
    from rp_distributed.records import ImageRow
    from rp_distributed.stages.detect import DetectFaces

    detect, faces = DetectFaces.from_config(cfg), []
    for i in range(images):
        row = detect.process(ImageRow(input_uri=str(t1_path()), rel_path=f"t1-{i}.jpg", output_uri="-"))
        faces += row.payload.faces
    return faces


def hot_loop(s: Settings, rp, face) -> dict:
    """One face through inversion and generation at the run's settings (ReversePersonalizer.invert/generate)."""
    cuda_peak_gib(s, reset=True)
    sync(s)
    t0 = time.perf_counter()
    inv = rp.invert([face.crop], [int(face.seed)])
    out = rp.generate(inv, face.id_embedding[None].astype(np.float32), [None])
    sync(s)
    wall = time.perf_counter() - t0
    assert out[0].shape == face.crop.shape
    return {"s_per_face": round(wall, 3), "unet_evals": rp.unet_evals_per_face(),
            "unet_evals_per_s": round(rp.unet_evals_per_face() / wall, 1), "peak_gib": cuda_peak_gib(s),
            "unet_batch_size": rp.batch_size, "crop_px": face.crop.shape[0], "steps": s.steps}


def stage_alone(s: Settings, anonymizer, faces: list) -> dict:
    """The anonymizer stage on ``faces`` in this process: one call with every face, as an actor gets them."""
    free_device(s)
    cuda_peak_gib(s, reset=True)
    sync(s)
    t0 = time.perf_counter()
    anonymizer(faces)
    sync(s)
    wall = time.perf_counter() - t0
    failed = [f.face_error for f in faces if f.face_error]
    return {"faces": len(faces), "wall_s": round(wall, 2), "s_per_face": round(wall / len(faces), 3),
            "face_batch_size": anonymizer.method.face_batch_size, "peak_gib": cuda_peak_gib(s), "face_errors": failed[:3]}


def whole_job(cfg, images: int, work: Path, timeout_s: float) -> dict:
    """``run_job`` on a local Ray over the same images, in a fresh process (as ``ray job submit`` runs it)."""
    src, out = work / "job-in", work / "job-out"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    src.mkdir(parents=True)
    for i in range(images):
        shutil.copy(t1_path(), src / f"t1-{i}.jpg")
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_check.py")), "--job-child",
                               cfg.model_dump_json(), str(src), str(out)], capture_output=True, text=True,
                              timeout=timeout_s, env=dict(os.environ, PYTHONPATH=str(REPO)))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the job did not finish in the {timeout_s:.0f} s left of the budget") from None
    if proc.returncode:
        raise RuntimeError(f"the job failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def job_child(cfg_json: str, src: str, out: str) -> dict:
    """In the job's process: run it; wall time, the anonymizer's own time summed from the manifest."""
    import pyarrow.parquet as pq

    from rp_distributed.config import JobConfig
    from rp_distributed.job.run import run_job

    cfg = JobConfig.model_validate(json.loads(cfg_json))
    t0 = time.perf_counter()
    result = run_job(cfg, src, out, progress=False, report=False)
    wall = time.perf_counter() - t0
    rows = [r for p in result.manifest_parts for r in pq.read_table(p, columns=["face_index", "t_anonymize_s",
                                                                                  "status"]).to_pylist()]
    faces = [r for r in rows if r["face_index"] is not None]
    return {"wall_s": round(wall, 2), "images": result.summary["images"], "faces": len(faces),
            "anonymize_s": round(sum(r["t_anonymize_s"] or 0.0 for r in faces), 2),
            "statuses": sorted({str(r["status"]) for r in rows})}


def arcface(s: Settings, model_file: Path, faces: list) -> dict:
    """ArcFace embeddings of ``s.arcface_faces`` aligned crops through onnxruntime, on CUDA (the GPU run) and
    on the CPU provider, each after a warm-up run."""
    import onnxruntime

    from rp_distributed.faces.arcface import IdentityEmbedder

    crops = [faces[i % len(faces)].crop for i in range(s.arcface_faces)]
    kps = [faces[i % len(faces)].kps5 for i in range(s.arcface_faces)]
    out = {"faces": len(crops), "available_providers": onnxruntime.get_available_providers()}
    runs = [("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])] if s.cuda else []
    for name, providers in runs + [("cpu", ["CPUExecutionProvider"])]:
        embedder = IdentityEmbedder(model_file, providers=providers)
        used = embedder.model.session.get_providers()[0]
        if name == "cuda" and used != "CUDAExecutionProvider":
            out["cuda_skipped"] = f"onnxruntime ran on {used}: install onnxruntime-gpu (README, GPU nodes)"
            continue
        embedder.embed_many(crops[:2], kps[:2])
        t0 = time.perf_counter()
        emb = embedder.embed_many(crops, kps)
        wall = time.perf_counter() - t0
        assert emb.shape == (len(crops), 512) and np.isfinite(emb).all()
        out[f"{name}_faces_per_s"] = round(len(crops) / wall, 1)
        out[f"{name}_provider"] = used
    return out


def compiled_rate(s: Settings, rp, batch: int) -> dict:
    """torch.compile the UNet (ReversePersonalizer's own path: static shapes, calls padded to the batch) at
    ``batch`` samples per call; compile time and the compiled rate."""
    size = (s.face_size, s.face_size)
    rp.guided.batch_size = batch
    t0 = time.perf_counter()
    rp.guided.compile(s.compile_backend, lambda: rp.probe_call(batch, size))
    sync(s)
    compile_s = time.perf_counter() - t0
    best = best_of_3(s, lambda: rp.probe_call(batch, size))
    return {"backend": s.compile_backend, "faces": batch, "compile_s": round(compile_s, 1),
            "s_per_call": round(best, 4), "unet_evals_per_s": round(2 * batch / best, 1)}
