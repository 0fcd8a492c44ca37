"""Reduced precision on the shared fidelity case (issue 13): where float16's and bfloat16's error enters.

Runs the production code path (``ReversePersonalizer.from_config`` -> invert -> generate) on
shared/fidelity (the inputs of tests/test_diffusion.py's fidelity test: tiny SDXL, crop.png, id.npy, seed 0,
100 steps, g = -10) and reports the final latent's relative difference to the same code in float32
(‖x − x_fp32‖ / ‖x_fp32‖). Then bisects bfloat16's error without touching library code:

- *islands*: the model loaded in bfloat16, one part moved back to float32 (``module.to(float32)`` with a
  pre-hook casting its floating inputs up and a hook casting its outputs back to the model dtype);
- *probes*: the model loaded in float32, one part rounded to bfloat16 (the same hooks the other way round),
  so that the error of that part alone shows;
- a single UNet call's error (no guidance, no 200-step amplification) and the effect of the guidance scale.

    python benchmarks/bench_precision.py                       # everything (about 40 full runs)
    python benchmarks/bench_precision.py --only fp16 bf16 bf16+unet_fp32_io_bf16
    python benchmarks/bench_precision.py --list

One JSON line per run on stdout (and ``--json FILE``), a table at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- casting hooks


def _cast(obj, dtype):
    """Floating tensors inside obj (tuples, lists, dicts) cast to dtype; everything else untouched."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def run_in(module: torch.nn.Module, compute: torch.dtype, out: torch.dtype) -> None:
    """Make ``module`` compute in ``compute``: its parameters cast, its floating inputs cast on the way in,
    its floating outputs cast to ``out`` on the way out (what the rest of the model expects)."""
    module.to(compute)
    module.register_forward_pre_hook(lambda m, args, kwargs: (_cast(args, compute), _cast(kwargs, compute)),
                                     with_kwargs=True)
    module.register_forward_hook(lambda m, args, output: _cast(output, out))


def norms(unet) -> list[torch.nn.Module]:
    return [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]


def of_type(unet, *names) -> list[torch.nn.Module]:
    return [m for m in unet.modules() if type(m).__name__ in names]


def ip_kv(unet) -> list[torch.nn.Module]:
    """The IP-Adapter's to_k_ip / to_v_ip linears inside the attention processors."""
    mods = []
    for proc in unet.attn_processors.values():
        for name in ("to_k_ip", "to_v_ip"):
            mods.extend(getattr(proc, name, []) or [])
    return mods


@contextlib.contextmanager
def sdpa_in(compute: torch.dtype):
    """torch's scaled_dot_product_attention (diffusers calls it as F.scaled_dot_product_attention) computed in
    ``compute``, its output cast back to the query's dtype."""
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention

    def patched(q, k, v, *a, **kw):
        return orig(q.to(compute), k.to(compute), v.to(compute), *a, **kw).to(q.dtype)

    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def round_weights(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters rounded to ``dtype`` and stored back in their own dtype (weight quantization only)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).to(p.dtype))


# --------------------------------------------------------------------------- the case


class Case:
    def __init__(self, shared: Path, size: int = 128, steps: int = 100, unet_batch_size: int = 8):
        from PIL import Image

        self.fid = shared / "fidelity"
        img = Image.open(self.fid / "tiny" / "crop.png").convert("RGB")
        if size != img.size[0]:  # a cheaper variant of the case (reduced precision is slow on CPUs without it)
            img = img.resize((size, size), Image.LANCZOS)
        self.crop = np.asarray(img)
        self.steps, self.unet_batch_size = steps, unet_batch_size
        self.idv = np.load(self.fid / "tiny" / "id.npy").astype(np.float32)[None]
        self.expected = np.load(self.fid / "expected.npz")

    def load(self, dtype: str):
        from rp_distributed.config import DiffusionConfig
        from rp_distributed.diffusion import ReversePersonalizer

        cfg = DiffusionConfig(model=str(self.fid / "tiny" / "sdxl"), ip_adapter=str(self.fid / "tiny"),
                              ip_adapter_weight_name="ip-adapter-faceid_tiny.bin", device="cpu", dtype=dtype,
                              num_inversion_steps=self.steps, unet_batch_size=self.unet_batch_size,
                              allow_bfloat16=dtype == "bfloat16")
        return ReversePersonalizer.from_config(cfg)

    def run(self, model, g: float = -10.0, noise: torch.Tensor | None = None) -> np.ndarray:
        inv = model.invert([self.crop], [0], [g], noise=noise)
        images, latent = model.generate(inv, self.idv, guidance_scales=[g], return_latents=True)
        lat = latent.numpy()
        if not np.isfinite(lat).all() or not np.isfinite(np.asarray(images, np.float64)).all():
            raise FloatingPointError("non-finite latent or image")
        return lat

    def noise_f32(self, model) -> torch.Tensor:
        """The reference's noise stream drawn in float32 (``draw_noise`` draws it in the model dtype)."""
        n = len(model.timesteps())
        shape = tuple(model.latent_shape(self.crop.shape[:2]))
        noise = torch.empty((n, 1) + shape)
        gen = torch.Generator("cpu").manual_seed(0)
        for i in reversed(range(n)):
            noise[i, 0] = torch.randn((1,) + shape, generator=gen, dtype=F32)[0]
        return noise


# --------------------------------------------------------------------------- configurations

# name -> (load dtype, setup(model) -> context manager or None, description)
Setup = Callable[[object], object]


def _unet_islands(base, compute, pick) -> Setup:
    def setup(model):
        for m in pick(model.unet):
            run_in(m, compute, base)
    return setup


def _configs() -> dict[str, tuple[str, Setup | None, str, dict]]:
    c: dict[str, tuple[str, Setup | None, str, dict]] = {}

    def add(name, dtype, setup, desc, **run_kw):
        c[name] = (dtype, setup, desc, run_kw)

    add("fp16", "float16", None, "float16 as from_config loads it (VAE upcast to float32)")
    add("bf16", "bfloat16", None, "bfloat16 as from_config loads it (VAE upcast to float32)")

    # ---- islands: bfloat16 model, one part back in float32
    add("bf16+noise_fp32", "bfloat16", None, "bf16, inversion noise drawn in float32 (draw_noise rounds it)",
        noise_f32=True)

    def vae32(model):
        from diffusers import AutoencoderKL

        exact = AutoencoderKL.from_pretrained(str(model.cfg.model), subfolder="vae", torch_dtype=F32)
        model.codec.vae.load_state_dict(exact.state_dict())  # from_config upcasts a VAE loaded in the model dtype
    add("bf16+vae_weights_fp32", "bfloat16", vae32,
        "bf16, the upcast VAE's weights reloaded in float32 (from_config rounds them to bf16 on loading)")

    def text32(model):
        model.pipe.text_encoder.to(F32)
        model.pipe.text_encoder_2.to(F32)
    add("bf16+text_enc_fp32", "bfloat16", text32, "bf16, CLIP text encoders in float32 (embeddings rounded once)")
    add("bf16+ip_proj_fp32", "bfloat16", _unet_islands(BF16, F32, lambda u: [u.encoder_hid_proj]),
        "bf16, IP-Adapter image projection (unet.encoder_hid_proj) in float32")
    add("bf16+ip_proj_kv_fp32", "bfloat16", _unet_islands(BF16, F32, lambda u: [u.encoder_hid_proj] + ip_kv(u)),
        "bf16, IP projection and every to_k_ip/to_v_ip in float32")
    add("bf16+time_emb_fp32", "bfloat16",
        _unet_islands(BF16, F32, lambda u: [u.time_embedding, u.add_embedding]),
        "bf16, time_embedding and add_embedding (text_time) in float32")
    add("bf16+norms_fp32", "bfloat16", _unet_islands(BF16, F32, norms), "bf16, every GroupNorm/LayerNorm in float32")

    def sdpa32(model):
        return sdpa_in(F32)
    add("bf16+sdpa_fp32", "bfloat16", sdpa32, "bf16, attention (SDPA incl. softmax) in float32")
    add("bf16+conv_io_fp32", "bfloat16",
        _unet_islands(BF16, F32, lambda u: [u.conv_in, u.conv_norm_out, u.conv_out]),
        "bf16, conv_in, conv_norm_out, conv_out in float32")
    add("bf16+resnets_fp32", "bfloat16", _unet_islands(BF16, F32, lambda u: of_type(u, "ResnetBlock2D")),
        "bf16, every ResnetBlock2D in float32")
    add("bf16+transformers_fp32", "bfloat16", _unet_islands(BF16, F32, lambda u: of_type(u, "Transformer2DModel")),
        "bf16, every Transformer2DModel (attention blocks incl. IP-Adapter k/v) in float32")
    add("bf16+down_fp32", "bfloat16", _unet_islands(BF16, F32, lambda u: list(u.down_blocks)), "bf16, down_blocks fp32")
    add("bf16+mid_fp32", "bfloat16", _unet_islands(BF16, F32, lambda u: [u.mid_block]), "bf16, mid_block fp32")
    add("bf16+up_fp32", "bfloat16", _unet_islands(BF16, F32, lambda u: list(u.up_blocks)), "bf16, up_blocks fp32")
    add("bf16+unet_fp32_io_bf16", "bfloat16", _unet_islands(BF16, F32, lambda u: [u]),
        "bf16 everywhere but the whole UNet computes in float32 (its inputs and output still rounded to bf16)")
    add("bf16+unet_fp32_io_bf16+noise_fp32", "bfloat16", _unet_islands(BF16, F32, lambda u: [u]),
        "as above, noise drawn in float32", noise_f32=True)

    # ---- probes: float32 model, one part rounded to bfloat16
    def probe(pick):
        return _unet_islands(F32, BF16, pick)

    add("fp32+noise_bf16", "float32", None, "fp32, inversion noise rounded to bf16 only", noise_bf16=True)

    def weights16(model):
        round_weights(model.unet, BF16)
    add("fp32+unet_weights_bf16", "float32", weights16, "fp32, UNet weights rounded to bf16, computed in fp32")

    def io16(model):
        u = model.unet
        u.register_forward_pre_hook(lambda m, args, kwargs: (_cast(_cast(args, BF16), F32),
                                                             _cast(_cast(kwargs, BF16), F32)), with_kwargs=True)
        u.register_forward_hook(lambda m, args, output: _cast(_cast(output, BF16), F32))
    add("fp32+unet_io_bf16", "float32", io16, "fp32, only the UNet's inputs and output rounded to bf16")
    add("fp32+ip_proj_bf16", "float32", probe(lambda u: [u.encoder_hid_proj]), "fp32, only the IP projection in bf16")
    add("fp32+ip_kv_bf16", "float32", probe(ip_kv), "fp32, only to_k_ip/to_v_ip in bf16")
    add("fp32+time_emb_bf16", "float32", probe(lambda u: [u.time_embedding, u.add_embedding]),
        "fp32, only time_embedding and add_embedding in bf16")
    add("fp32+norms_bf16", "float32", probe(norms), "fp32, only GroupNorm/LayerNorm in bf16")
    add("fp32+resnets_bf16", "float32", probe(lambda u: of_type(u, "ResnetBlock2D")), "fp32, only ResnetBlock2D in bf16")
    add("fp32+transformers_bf16", "float32", probe(lambda u: of_type(u, "Transformer2DModel")),
        "fp32, only Transformer2DModel blocks in bf16")
    add("fp32+convs_linears_bf16", "float32", probe(lambda u: of_type(u, "Conv2d", "Linear", "LoRACompatibleConv",
                                                                   "LoRACompatibleLinear")),
        "fp32, only Conv2d and Linear layers (weights and their outputs) in bf16")

    # ---- the guidance scale: how much of the error is the x10 amplification
    add("fp16@g=1", "float16", None, "float16, g = +1 (positive branch only: no amplification)", g=1.0)
    add("bf16@g=1", "bfloat16", None, "bfloat16, g = +1", g=1.0)
    add("fp16@g=-1", "float16", None, "float16, g = -1 (2 eps_neg - eps_pos)", g=-1.0)
    add("bf16@g=-1", "bfloat16", None, "bfloat16, g = -1", g=-1.0)
    return c


# --------------------------------------------------------------------------- single UNet call


def unet_call_errors(case: Case, model32, others: dict, ts=(299, 150, 1)) -> list[dict]:
    """One 2-branch UNet call (generation conditioning) at x_t = alpha x0 + sigma noise: relative error of
    eps_neg, eps_pos and the guided eps (g = -10 and g = +1) against float32. No solver, no amplification."""
    rows = []
    pipe = model32.pipe
    with torch.no_grad():
        x0 = model32.codec.encode([case.crop])
        emb, _, pooled, _ = pipe.encode_prompt(prompt=[""], device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    ac = pipe.scheduler.alphas_cumprod.to(torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    h, w = case.crop.shape[:2]
    idv = torch.from_numpy(case.idv).view(1, 1, 1, 512)

    def call(model, t):
        dt = next(model.unet.parameters()).dtype if model is model32 else model.dtype
        a, s = float(ac[t].sqrt()), float((1 - ac[t]).sqrt())
        x = (a * x0 + s * noise).repeat(2, 1, 1, 1).to(dt)
        text = torch.cat([torch.zeros_like(emb), emb]).to(dt)
        pool = torch.cat([torch.zeros_like(pooled), pooled]).to(dt)
        ids = torch.cat([torch.zeros_like(idv), idv]).to(dt)
        tid = torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=dt)
        with torch.no_grad():
            out = model.unet(x, torch.tensor([t, t]), encoder_hidden_states=text,
                             added_cond_kwargs={"text_embeds": pool, "time_ids": tid, "image_embeds": [ids]},
                             return_dict=False)[0]
        neg, pos = out.float().chunk(2)
        return neg.numpy(), pos.numpy()

    for t in ts:
        n32, p32 = call(model32, t)
        for name, m in others.items():
            n, p = call(m, t)
            rows.append({"call": name, "t": t, "eps_neg": rel(n, n32), "eps_pos": rel(p, p32),
                         "guided_g-10": rel(11 * n - 10 * p, 11 * n32 - 10 * p32), "guided_g+1": rel(p, p32),
                         "diff_pos_neg": rel(p - n, p32 - n32)})
    return rows


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", default=None, help="folder holding fidelity/ (default: RP_SHARED_DIR or ../shared)")
    p.add_argument("--only", nargs="*", default=None, help="run only these configurations (see --list)")
    p.add_argument("--skip-unet-call", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--size", type=int, default=128, help="crop size (128: the case as shipped; 64: resized)")
    p.add_argument("--steps", type=int, default=100, help="num_inversion_steps (100: the case as shipped)")
    p.add_argument("--unet-batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="append one JSON line per run to this file")
    p.add_argument("--list", action="store_true")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse HEAD here)")
    args = p.parse_args()

    configs = _configs()
    if args.list:
        for name, (dtype, _, desc, _) in configs.items():
            print(f"{name:38s} {desc}")
        return
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    repo = Path(__file__).resolve().parents[1]
    shared = Path(args.shared or os.environ.get("RP_SHARED_DIR") or repo.parent / "shared")
    case = Case(shared, args.size, args.steps, args.unet_batch_size)
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                    text=True).stdout.strip() or None
        except OSError:
            pass
    meta = {"commit": commit, "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "size": args.size, "steps": args.steps}
    sink = open(args.json, "a") if args.json else None

    def emit(row):
        row = {**row, **meta}
        print(json.dumps(row), flush=True)
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    t0 = time.perf_counter()
    model32 = case.load("float32")
    refs: dict[float, np.ndarray] = {}
    for g in (-10.0, 1.0, -1.0):
        if args.only is not None and g != -10.0 and not any(f"@g={g:g}" in n for n in args.only):
            continue
        t = time.perf_counter()
        refs[g] = case.run(model32, g)
        row = {"run": f"fp32@g={g:g}", "seconds": round(time.perf_counter() - t, 1)}
        if g == -10.0 and args.size == 128 and args.steps == 100:
            row["rel_vs_expected"] = rel(refs[g], case.expected["latent"])
        emit(row)

    if not args.skip_unet_call and (args.only is None or "unet_call" in args.only):
        others = {"fp16": case.load("float16"), "bf16": case.load("bfloat16")}
        for row in unet_call_errors(case, model32, others):
            emit({"run": "unet_call", **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}})
        del others

    results = {}
    for name, (dtype, setup, desc, kw) in configs.items():
        if args.only is not None and name not in args.only:
            continue
        kw = dict(kw)
        g = kw.pop("g", -10.0)
        model = case.load(dtype)
        noise = None
        if kw.pop("noise_f32", False):
            noise = case.noise_f32(model)
        if kw.pop("noise_bf16", False):
            noise = case.noise_f32(model).to(BF16).to(F32)
        ctx = setup(model) if setup else None
        t = time.perf_counter()
        with ctx if ctx is not None else contextlib.nullcontext():
            try:
                lat = case.run(model, g, noise)
                err = rel(lat, refs[g])
            except FloatingPointError:
                err = float("nan")
        results[name] = err
        emit({"run": name, "g": g, "rel_vs_fp32": err, "seconds": round(time.perf_counter() - t, 1), "what": desc})
        del model

    print(f"\n{'configuration':40s} {'rel. final latent vs fp32':>26s}")
    for name, err in results.items():
        print(f"{name:40s} {err:26.3e}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
