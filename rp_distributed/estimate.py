"""``rp-anonymize estimate``: what a run will cost, before running it.

Lists the inputs as the job does, runs the job's own first stage (``stages.detect.DetectFaces``, without the
identity embeddings: no ArcFace is loaded) on a sample of them in this process (no Ray), and counts faces the
way the anonymizer will treat them: a face below ``detection.min_face_size``, beyond ``detection.max_faces`` or
whose alignment failed gets the fallback method, not diffusion (``anonymize.Anonymizer``), so it costs no UNet evaluation. Every other face
costs ``4 x len(timesteps)`` UNet image evaluations per try (5 x with the pseudonym branch) (``ReversePersonalizer.unet_evals_per_face``,
with the timesteps from ``diffusion.solver.inversion_timesteps``: no model is loaded), one try at least and
``privacy.max_tries`` at most when ``privacy.escalate``. On the sample photos themselves the face and UNet
counts are those of a real run (exact with escalation off; within the range with it on).

Time is an **estimate**: FLOPs from ALGORITHM.md's "Cost" table (full SDXL, measured with torch's
FlopCounterMode), divided by a device's dense tensor rate times an assumed utilisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import JobConfig


@dataclass(frozen=True)
class Device:
    name: str
    tflops: float  # dense (no sparsity) BF16/FP16 tensor-core peak, TFLOP/s
    source: str


# Vendor datasheets, dense BF16/FP16 tensor-core rates (the datasheets quote twice these "with sparsity").
DEVICES = {
    "H100": Device("NVIDIA H100 SXM5 80GB", 989.0,
                   "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/): BF16/FP16 Tensor "
                   "Core 1,979 TFLOPS with sparsity, 989 dense (SXM)"),
    "A100": Device("NVIDIA A100 80GB", 312.0,
                   "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100/): BF16/FP16 Tensor "
                   "Core 312 TFLOPS dense, 624 with sparsity"),
    "L4": Device("NVIDIA L4 24GB", 121.0,
                 "NVIDIA L4 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/l4/): FP16/BF16 Tensor Core "
                 "242 TFLOPS with sparsity, 121 dense"),
}
DEFAULT_UTILIZATION = 0.5

# ALGORITHM.md, "Cost": TFLOP of one image through each piece of SDXL at 512 and 1024 px (2 FLOPs per MAC).
SDXL_TFLOP = {"unet": (1.59, 6.76), "vae_encode": (1.12, 4.88), "vae_decode": (2.52, 10.47)}


def tflop_at(piece: str, side: int) -> float:
    """TFLOP of ``piece`` at a ``side`` x ``side`` crop: the power law through the two measured sizes (exact at
    512 and 1024 px; other sizes are an extrapolation)."""
    a, b = SDXL_TFLOP[piece]
    return a * (side / 512) ** math.log2(b / a)


def branch_factor(cfg: JobConfig) -> int:
    """UNet evaluations per timestep of one try: 2 (inversion) + 2 (generation), or + 3 with the pseudonym branch
    (counted for every face when a subject table and h > 0 are set: an upper bound, faces without a subject cost 4)."""
    return 5 if cfg.pseudonyms.table and cfg.pseudonyms.scale > 0 else 4


def unet_evals_per_try(cfg: JobConfig) -> int:
    """UNet image evaluations of one try on one face: an inversion and a generation, each 2 branches x N steps (a
    generation with the pseudonym branch: 3)."""
    from .diffusion.solver import inversion_timesteps

    return branch_factor(cfg) * len(inversion_timesteps(cfg.diffusion.skip, cfg.diffusion.num_inversion_steps))


def tries_range(cfg: JobConfig) -> tuple[int, int]:
    if not cfg.anonymizer.generative:
        return 0, 0
    return 1, (cfg.privacy.max_tries if cfg.privacy.escalate else 1)


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` inputs spread evenly over the sorted listing (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def _count_faces(cfg: JobConfig, rows: list[dict]) -> tuple[dict, list[dict]]:
    """The sampled images through the job's detection stage, each face routed as the anonymizer routes it
    (``anonymizer.triage``): faces, faces that would be generated, and those that get a destructive method."""
    from .anonymizer.triage import Route, triage
    from .records import ImageRow
    from .stages.detect import DetectFaces

    stage = DetectFaces.from_config(cfg, identities=False) if rows else None  # counting faces needs no ArcFace
    counts = dict(images=len(rows), with_faces=0, without_faces=0, unreadable=0, faces=0, diffusion_faces=0,
                  small=0, over_budget=0, align_failed=0, low_confidence=0)
    per_image = []
    for r in rows:
        out = stage.process(ImageRow(r["uri"], r["rel_path"], error=r["skip_reason"], annotations=r.get("annotations"),
                                     prompts=r.get("prompts")))
        if not out.pending:
            counts["unreadable"] += 1
            per_image.append({"rel_path": r["rel_path"], "faces": 0, "diffusion_faces": 0, "error": out.error})
            continue
        faces = out.payload.faces
        diff = 0
        for f in faces:
            decision = triage(f, cfg.anonymizer.generative, cfg.detection, cfg.anonymizer.fallback)
            if decision.counted_as:
                counts[decision.counted_as] += 1
            elif decision.route is Route.METHOD and cfg.anonymizer.generative:
                diff += 1
        counts["faces"] += len(faces)
        counts["diffusion_faces"] += diff
        counts["with_faces" if faces else "without_faces"] += 1
        per_image.append({"rel_path": r["rel_path"], "faces": len(faces), "diffusion_faces": diff})
    return counts, per_image


def estimate(cfg: JobConfig, input_uri: str, sample: int = 20, device: str = "H100",
             utilization: float = DEFAULT_UTILIZATION) -> dict:
    """The figures ``rp-anonymize estimate`` prints, as a dict."""
    from . import io

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICES)}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    listing = io.list_inputs_table(input_uri, cfg.input.extensions)
    n = listing.num_rows
    idx = sample_indices(n, max(1, sample)) if n else []
    rows = []
    if idx:  # the side tables (input.annotations, prompts.table) joined in as the plan does
        from .annotations import attach

        picked = listing.take(idx)
        rows = attach(cfg, picked.append_column("input_uri", picked["uri"]))[0].to_pylist()
    counts, per_image = _count_faces(cfg, rows)
    rp = cfg.anonymizer.generative
    scale = n / len(rows) if rows else 0.0
    per_try = unet_evals_per_try(cfg) if rp else 0
    lo_tries, hi_tries = tries_range(cfg)
    side = cfg.alignment.face_size
    try_tflop = (per_try * tflop_at("unet", side) + tflop_at("vae_encode", side) + tflop_at("vae_decode", side)
                 if rp else 0.0)
    dev = DEVICES[device]
    sample_evals = [counts["diffusion_faces"] * per_try * t for t in (lo_tries, hi_tries)]
    est_diff_faces = counts["diffusion_faces"] * scale
    total_pflop = [est_diff_faces * t * try_tflop / 1000 for t in (lo_tries, hi_tries)]
    gpu_hours = [p * 1000 / (dev.tflops * utilization) / 3600 for p in total_pflop]
    return {
        "input_uri": input_uri, "images_listed": n, "sampled": len(rows), "sample": counts,
        "per_image": per_image, "method": cfg.anonymizer.method, "generative": rp,
        "estimated_faces": counts["faces"] * scale, "estimated_diffusion_faces": est_diff_faces,
        "unet_evals_per_try": per_try, "branches": branch_factor(cfg), "tries": [lo_tries, hi_tries],
        "sample_unet_evals": sample_evals, "estimated_unet_evals": [e * scale for e in sample_evals],
        "face_size": side, "tflop_per_try": try_tflop, "estimated_pflop": total_pflop,
        "device": {"key": device, **dev.__dict__}, "utilization": utilization, "gpu_hours": gpu_hours,
        "all_devices": {k: [p * 1000 / (d.tflops * utilization) / 3600 for p in total_pflop]
                        for k, d in DEVICES.items()},
    }


def _range(pair, spec: str) -> str:
    lo, hi = pair
    return format(lo, spec) if lo == hi else f"{format(lo, spec)} - {format(hi, spec)}"


def estimate_text(e: dict) -> str:
    c, dev = e["sample"], e["device"]
    all_sampled = e["sampled"] == e["images_listed"]
    lines = [
        f"rp-anonymize estimate {e['input_uri']}   (method: {e['method']})",
        f"  inputs            {e['images_listed']} images listed; {e['sampled']} sampled"
        + (" (all of them: counts are exact)" if all_sampled else " (spread over the listing; totals extrapolated)"),
        f"  sample            {c['faces']} faces in {c['with_faces']} images, {c['without_faces']} without a face, "
        f"{c['unreadable']} unreadable or withheld",
    ]
    generative = e["generative"]
    if generative:
        lines.append(f"                    {c['diffusion_faces']} faces by diffusion; fallback without diffusion: "
                     f"{c['small']} below detection.min_face_size, {c['over_budget']} beyond detection.max_faces, "
                     f"{c['align_failed']} alignment failed, {c['low_confidence']} low-confidence detections")
    lines.append(f"  faces             {e['estimated_faces']:.0f} estimated"
                 + (f" ({e['estimated_faces'] / e['images_listed']:.2f} per image)" if e["images_listed"] else ""))
    if not generative:
        lines.append("  UNet evaluations  0 (a destructive method: no diffusion, no GPU)")
        return "\n".join(lines)
    lo, hi = e["tries"]
    esc = (f"{lo} to {hi} tries per face (privacy.escalate, max_tries {hi}): a range" if hi > lo
           else "1 try per face (escalation off): exact")
    lines += [
        f"  UNet evaluations  {_range(e['estimated_unet_evals'], ',.0f')}  "
        f"({e['unet_evals_per_try']} per face per try = {e['branches']} x {e['unet_evals_per_try'] // e['branches']} "
        f"timesteps; {esc})",
        f"  compute           {_range(e['estimated_pflop'], ',.3g')} PFLOP  (full SDXL at {e['face_size']} px crops: "
        f"{e['tflop_per_try']:,.4g} TFLOP per face per try, UNet + VAE; ALGORITHM.md \"Cost\")",
        f"  GPU-hours         {_range(e['gpu_hours'], ',.3g')} on {dev['name']}  "
        f"({dev['tflops']:g} TFLOP/s dense BF16/FP16 at an assumed {100 * e['utilization']:.0f}% utilisation: "
        f"{e['tflop_per_try'] / (dev['tflops'] * e['utilization']):.3g} s per face per try)",
        "                    other devices: " + "; ".join(f"{k} {_range(v, ',.3g')}" for k, v in e["all_devices"].items()
                                                      if k != dev["key"]),
        "  ESTIMATE: time is FLOPs / (datasheet rate x utilisation), not a measurement. Faces come from the job's",
        "  own detection stage: on the sampled photos they and the UNet evaluations are what a run records.",
        "  rate source: " + dev["source"],
    ]
    return "\n".join(lines)
