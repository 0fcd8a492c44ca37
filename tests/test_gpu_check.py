"""The GPU check (`make gpu-check`) cannot rot: its full-size model set has the published shapes, and its
``--cpu-smoke`` mode runs every part of the same code path on the tiny model and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_sdxl_architecture_has_the_published_parameter_counts():
    """stabilityai/stable-diffusion-xl-base-1.0's models, counted on the meta device (no memory, no weights),
    and the FaceID adapter shaped for its 70 cross-attention layers."""
    from rp_distributed.diffusion.architectures import SDXL
    from rp_distributed.diffusion.tiny import random_models

    with torch.device("meta"):
        unet, vae, te1, te2 = random_models(SDXL)
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, te1, te2)]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(cross) == 70 and unet.config.cross_attention_dim == 2048


def test_r50_arcface_is_an_arcface_for_insightface(tmp_path):
    """The IResNet-50-shaped ONNX loads as insightface's recognition model and embeds aligned crops: unit-norm
    512-d vectors, a different vector for a different face."""
    import onnx

    from rp_distributed.diffusion.arcface_onnx import make_arcface_onnx
    from rp_distributed.faces.arcface import IdentityEmbedder

    path = make_arcface_onnx(tmp_path / "w600k_r50.onnx", layout="r50")
    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    assert 43_000_000 < params < 44_000_000
    embedder = IdentityEmbedder(path)
    from skimage import data

    crops = [np.ascontiguousarray(data.astronaut()[:224, 128:352]), np.ascontiguousarray(data.chelsea()[:224, :224])]
    kps = np.array([[80, 96], [144, 96], [112, 130], [86, 164], [138, 164]], np.float32)
    emb = embedder.embed_many(crops, [kps, kps])
    assert emb.shape == (2, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert float(emb[0] @ emb[1]) < 0.999


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_check_cpu_smoke(tmp_path):
    """Every part runs on the CPU and the JSON carries every figure that is not CUDA-only."""
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
                           "--work", str(tmp_path), "--budget-s", "900"], capture_output=True, text=True,
                          timeout=1200, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert {k: v["status"] for k, v in parts.items()} == {k: "ok" for k in (
        "build", "startup", "load", "faces", "unet_eager", "hot_loop", "arcface", "stage", "unet_compiled",
        "whole_job")}
    assert [r["faces"] for r in parts["unet_eager"]["rows"]] == [1, 2, 4]
    assert all(r["unet_evals_per_s"] > 0 for r in parts["unet_eager"]["rows"])
    assert parts["hot_loop"]["unet_evals"] == 4 * 4 and parts["hot_loop"]["crop_px"] == 64
    faces = parts["faces"]["faces"]  # t1.jpg's six people as dlib HOG finds them at the GPU config's threshold
    assert faces >= 4 and parts["stage"]["faces"] == faces and not parts["stage"]["face_errors"]
    job = parts["whole_job"]
    assert (job["images"], job["faces"], job["statuses"]) == (1, faces, ["ok"])
    assert job["job_over_stage"] > 0 and parts["unet_compiled"]["backend"] == "aot_eager"
    assert parts["arcface"]["cpu_provider"] == "CPUExecutionProvider"
    cuda_only = {"peak GPU memory, one face, GiB", "ArcFace faces/s, CUDA"}
    table = {r["figure"]: r for r in result["table"]}
    assert all(isinstance(r["measured"], (int, float)) for f, r in table.items() if f not in cuda_only), table
    assert all(table[f]["measured"] is None for f in cuda_only)
    assert "s per face, anonymizer stage" in proc.stdout and "n/a (cpu smoke)" in proc.stdout


def _gpu_check_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu_check


def test_gpu_run_loads_half_precision_variant_files_as_published(tmp_path):
    """What the GPU run writes and loads, on the tiny model: float16 weights in ``*.fp16.safetensors`` files,
    configs/sdxl.yaml's settings (variant fp16, float16, reference steps and size, batch auto) pointed at them;
    the pipeline loads in float16 with the VAE read in float32."""
    from rp_distributed.diffusion.sdxl import load_pipeline
    from rp_distributed.diffusion.tiny import make_random_model

    gpu_check = _gpu_check_module()
    make_random_model(tmp_path, "tiny", dtype=torch.float16, variant="fp16")
    assert (tmp_path / "sdxl" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    cfg = gpu_check.job_config(gpu_check.settings(cpu_smoke=False), tmp_path)
    d = cfg.diffusion
    assert (d.device, d.dtype, d.variant, d.num_inversion_steps, d.unet_batch_size, cfg.alignment.face_size) == (
        "cuda", "float16", "fp16", 100, "auto", 1024)
    assert (cfg.detection.backend, cfg.privacy.escalate, cfg.anonymizer.resources.num_gpus) == ("dlib", False, 1)
    loaded = load_pipeline(d.model_copy(update={"device": "cpu"}))
    assert loaded.pipe.unet.dtype == torch.float16 and loaded.pipe.vae.dtype == torch.float32


def test_gpu_check_without_cuda_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr and "--cpu-smoke" in proc.stderr
