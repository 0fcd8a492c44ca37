"""Where a face's time goes in the anonymizer stage (issue 13), component by component.

CPU part (any machine): the work around the UNet at the reference settings (100 steps, 1024 px crops,
latent 4x128x128) that the tiny UNet cannot be run at: noise draws, ArcFace, the dlib re-ID descriptor,
pixel/tensor conversions and the vectorized solver. It prints each component's seconds per face and the
anonymizer actor's critical path before and after issue 13 (what the actor's main thread waits for).

CUDA part (``--cuda``, when a device is present): the full-size SDXL UNet with random weights (no hub
needed) at batch 1..16 in float16, bfloat16 and compiled, with peak memory, the device's measured matmul
rate and the fraction of the FLOP floor (6.76 TFLOP per UNet image-evaluation at 1024 px, ALGORITHM.md).

    python benchmarks/bench_hotloop.py                 # CPU components (cpu-2c: ~1 min)
    python benchmarks/bench_hotloop.py --cuda          # + the GPU table (one H100: ~10 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np

UNET_TFLOP_1024 = 6.76  # one UNet image-evaluation at 1024 px (ALGORITHM.md, FlopCounterMode)


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def real_crop_1024():
    """An aligned 1024 px crop of t1.jpg's largest face, its face box and 5 keypoints."""
    from rp_distributed.config import load_config
    from rp_distributed.records import ImageRow
    from rp_distributed.stages.detect import DetectFaces

    cfg = load_config(overrides=["detection.backend=dlib", "alignment.face_size=1024"])
    t1 = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / "data/images/t1.jpg"
    row = DetectFaces.from_config(cfg).process(ImageRow.of({"input_uri": str(t1), "rel_path": "t1.jpg", "output_uri": "-"}))
    f = row.payload.faces[0]
    return f.crop, f.face_box, f.kps5


def cpu_components(steps: int) -> dict:
    import torch

    from rp_distributed.config import DiffusionConfig
    from rp_distributed.diffusion import ReversePersonalizer, make_tiny, solver
    from rp_distributed.faces.arcface import IdentityEmbedder
    from rp_distributed.scoring import ReidScorer

    crop, box, kps = real_crop_1024()
    tmp = Path(tempfile.mkdtemp())
    tiny = make_tiny(tmp / "tiny")
    cfg = DiffusionConfig(model=str(tiny["model"]), ip_adapter=str(tiny["ip_adapter"]), arcface=str(tiny["arcface"]),
                          cache_dir=str(tmp / "cache"), device="cpu", dtype="float32", num_inversion_steps=steps)
    rp = ReversePersonalizer.from_config(cfg, face_size=64)
    shape = (4, 128, 128)  # SDXL's latent at 1024 px
    out = {}
    out["noise_draws"] = timed(lambda: rp.draw_noise([7], shape))
    embedder = IdentityEmbedder.from_config(cfg)
    out["arcface_tiny_onnx"] = timed(lambda: embedder.embed(crop, kps))
    scorer = ReidScorer()
    out["reid_descriptor"] = timed(lambda: scorer.descriptor(crop, box))
    out["reid_still_detected_hog"] = timed(lambda: scorer.face_detected(crop, box))
    out["crop_to_tensor"] = timed(lambda: (torch.from_numpy(crop[None]).permute(0, 3, 1, 2).float() / 255 * 2 - 1))
    img = torch.rand(1, 3, 1024, 1024) * 2 - 1
    out["tensor_to_crop"] = timed(lambda: ((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round()
                                  .astype(np.uint8))
    # the inversion's vectorized solver over all steps for one face (on a GPU: a few elementwise kernels)
    n = steps
    xs = torch.randn((n, 1) + shape)
    eps = torch.randn_like(xs)
    x0 = torch.randn((1,) + shape)
    out["inversion_solver_cpu"] = timed(lambda: solver.noise_maps(rp.table, xs, x0, eps))
    x = torch.randn((1,) + shape)

    def gen_steps():
        y, prev = x, None
        for i in range(n):
            mu, std, prev = solver.step(rp.table[i], y, eps[i], prev)
            y = mu + std * eps[i]
        return y

    out["generation_solver_cpu"] = timed(gen_steps)
    tries = 1
    conv = out["crop_to_tensor"] + out["tensor_to_crop"]
    # Before issue 13, on the actor's main thread: noise, ArcFace, and per try compare() = two descriptors and
    # a HOG check. After: conversions only; noise and descriptors run in a background thread during the
    # next chunk's device work, ArcFace in the detection stage. The solver runs on the device in both.
    out["critical_path_before"] = (out["noise_draws"] + out["arcface_tiny_onnx"] + conv
                                   + tries * (2 * out["reid_descriptor"] + out["reid_still_detected_hog"]))
    out["critical_path_after"] = conv
    out["background_thread_per_face"] = out["noise_draws"] + (tries + 1) * out["reid_descriptor"]
    return {k: round(v, 4) for k, v in out.items()}


def cuda_table(batches: list[int]) -> list[dict]:
    import torch
    from diffusers import UNet2DConditionModel

    from rp_distributed.diffusion.architectures import SDXL

    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = timed(lambda: (a @ a, torch.cuda.synchronize()), repeat=5)
    matmul_tflops = 2 * 8192 ** 3 / ms / 1e12
    rows = []
    for dtype, compiled in ((torch.float16, False), (torch.bfloat16, False), (torch.float16, True)):
        unet = UNet2DConditionModel(**SDXL.unet).to(dev, dtype).eval()
        fn = unet
        if compiled:
            unet.to(memory_format=torch.channels_last)
            fn = torch.compile(unet, dynamic=False)
        for b in batches:
            m = 2 * b  # both guidance branches
            x = torch.randn(m, 4, 128, 128, device=dev, dtype=dtype)
            t = torch.full((m,), 299, device=dev)
            text = torch.randn(m, 77, 2048, device=dev, dtype=dtype)
            pooled = torch.randn(m, 1280, device=dev, dtype=dtype)
            time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * m, device=dev, dtype=dtype)
            try:
                torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    s = timed(lambda: (fn(x, t, encoder_hidden_states=text,
                                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}),
                                       torch.cuda.synchronize()), repeat=3)
                peak = torch.cuda.max_memory_allocated() / 2 ** 30
            except torch.cuda.OutOfMemoryError:
                rows.append({"dtype": str(dtype), "compiled": compiled, "faces": b, "oom": True})
                torch.cuda.empty_cache()
                break
            achieved = UNET_TFLOP_1024 * m / s
            rows.append({"dtype": str(dtype).replace("torch.", ""), "compiled": compiled, "faces": b,
                         "s_per_call": round(s, 4), "evals_per_s": round(m / s, 1), "peak_gib": round(peak, 2),
                         "tflops": round(achieved, 1), "matmul_tflops": round(matmul_tflops, 1),
                         "floor_fraction": round(achieved / matmul_tflops, 3),
                         "s_per_face_400_evals": round(400 * s / m, 2)})
            print(json.dumps(rows[-1]), flush=True)
        del unet, fn
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--cuda", action="store_true", help="also the full-size SDXL UNet on the CUDA device")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = p.parse_args()
    print(json.dumps({"cpu_components_s_per_face": cpu_components(args.steps)}), flush=True)
    if args.cuda:
        cuda_table(args.batches)


if __name__ == "__main__":
    main()
