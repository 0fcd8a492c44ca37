"""Throughput of the reverse-personalization stage: seconds per face and UNet evaluations per second.

Runs the production code path (``ReversePersonalizer.from_config`` -> invert -> generate) on real
aligned face crops from insightface's t1.jpg, at several batch sizes, and prints one JSON line per
setting. Results go in BENCHMARKS.md with the machine named.

    python benchmarks/bench_diffusion.py --model models/tiny --size 128 --steps 20 --batch 1 2 4
    python benchmarks/bench_diffusion.py --model /models/sdxl --ip-adapter /models/faceid \
        --arcface /models/buffalo_l/w600k_r50.onnx --device cuda --dtype float16 --size 1024 --steps 100
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def real_crops(cfg, n: int):
    """``n`` aligned crops (cycling through t1.jpg's six faces) with their 5 keypoints."""
    import importlib.util

    from rp_distributed.records import ImageRow
    from rp_distributed.stages.detect import DetectFaces

    t1 = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / "data/images/t1.jpg"
    row = DetectFaces.from_config(cfg).process(ImageRow.of({"input_uri": str(t1), "rel_path": "t1.jpg", "output_uri": "-"}))
    faces = row.payload.faces
    return [faces[i % len(faces)] for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/tiny", help="folder from make-tiny, or an SDXL source")
    p.add_argument("--ip-adapter", default=None)
    p.add_argument("--arcface", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    from rp_distributed.config import load_config
    from rp_distributed.diffusion import ReversePersonalizer
    from rp_distributed.faces.arcface import IdentityEmbedder

    model = Path(args.model)
    sdxl = model / "sdxl" if (model / "sdxl").is_dir() else model
    cfg = load_config(None, [
        "anonymizer.method=reverse_personalization", f"diffusion.model={sdxl}",
        f"diffusion.ip_adapter={args.ip_adapter or model / 'ip-adapter'}",
        f"diffusion.arcface={args.arcface or model / 'arcface' / 'w600k_r50.onnx'}",
        f"diffusion.device={args.device}", f"diffusion.dtype={args.dtype}",
        f"diffusion.num_inversion_steps={args.steps}", f"alignment.face_size={args.size}"])
    t0 = time.perf_counter()
    rp = ReversePersonalizer.from_config(cfg.diffusion)
    embedder = IdentityEmbedder.from_config(cfg.diffusion)
    load_s = time.perf_counter() - t0
    faces = real_crops(cfg, max(args.batch))
    ids = np.stack([embedder.embed(f.crop, f.kps5) for f in faces])
    machine = f"{platform.node()} {platform.machine()}"
    try:
        import torch

        if args.device == "cuda":
            machine = torch.cuda.get_device_name(0)
        else:
            machine += f", {torch.get_num_threads()} torch threads"
    except Exception:  # noqa: BLE001
        pass
    rp.anonymize([faces[0].crop], ids[:1], seeds=[0])  # warm-up
    for b in args.batch:
        crops = [f.crop for f in faces[:b]]
        times = []
        for _ in range(args.repeats):
            if args.device == "cuda":
                import torch

                torch.cuda.synchronize()
            t = time.perf_counter()
            rp.anonymize(crops, ids[:b], seeds=list(range(b)))
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        best = min(times)
        evals = rp.unet_evals_per_face() * b
        print(json.dumps({"machine": machine, "size": args.size, "steps": args.steps, "batch": b,
                          "dtype": args.dtype, "s_per_batch": round(best, 3), "s_per_face": round(best / b, 3),
                          "unet_image_evals_per_s": round(evals / best, 1), "model_load_s": round(load_s, 2)}))


if __name__ == "__main__":
    main()
