"""Random-weight model sets of the real architectures, for tests, smoke runs and GPU checks (no downloads).

``make_random_model(out_dir, "tiny" | "sdxl", ...)`` writes
- ``sdxl/``: a diffusers StableDiffusionXLPipeline folder (UNet with text_time embedding, VAE, two CLIP text
  encoders, tokenizers, sde-dpmsolver++ scheduler) of ``architectures.TINY`` (UNet sample_size 64 latents =
  128 px crops) or ``architectures.SDXL`` (SDXL base 1.0's shapes, 1024 px);
- ``ip-adapter/ip-adapter-faceid_sdxl.bin``: a FaceID adapter in the layout of ``ip-adapter-faceid_sdxl.bin``;
- ``arcface/w600k_r50.onnx``: an ArcFace-shaped ONNX (``data`` N x 3 x 112 x 112 -> N x 512), tiny or IResNet-50;
- ``random_model.json``: what was written (architecture, dtype, weights variant).
``make_tiny(out_dir)`` is the tiny set in float32 on the CPU. Deterministic (fixed seeds); the tokenizers are a
small CLIP-style vocabulary in both sets (the text encoders keep their full vocabulary size).
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch

from .arcface_onnx import make_arcface_onnx
from .architectures import ARCHITECTURES, ID_DIM, NUM_TOKENS, Architecture

SCHEDULER_CONFIG = dict(
    algorithm_type="sde-dpmsolver++", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
    dynamic_thresholding_ratio=0.995, euler_at_final=False, final_sigmas_type="zero", lambda_min_clipped=-float("inf"),
    lower_order_final=True, num_train_timesteps=1000, prediction_type="epsilon", rescale_betas_zero_snr=False,
    sample_max_value=1.0, solver_order=2, solver_type="midpoint", steps_offset=1, thresholding=False,
    timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False, use_lu_lambdas=False, variance_type=None,
)


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for ch in string.ascii_lowercase + string.digits:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    _write_tokenizer_files(tmp)
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "!", "model_max_length": 77,
    }))
    return CLIPTokenizer.from_pretrained(str(tmp))


def random_models(arch: Architecture):
    """UNet, VAE and the two text encoders of ``arch``, randomly initialised from the architecture's seeds on the
    current default device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(arch.seeds["unet"])
    unet = UNet2DConditionModel(**arch.unet)
    torch.manual_seed(arch.seeds["vae"])
    vae = AutoencoderKL(**arch.vae)
    torch.manual_seed(arch.seeds["text"])
    te1 = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2))
    return unet, vae, te1, te2


def make_adapter_state_dict(unet, seed: int = 3, dtype: torch.dtype = torch.float32) -> dict:
    """Random FaceID adapter for ``unet``: {"image_proj": proj.0/proj.2/norm, "ip_adapter": N.to_k_ip/to_v_ip},
    drawn in float32 on the CPU and stored in ``dtype`` (the published file is float16)."""
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g) / i**0.5

    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.0.weight": lin(2 * ID_DIM, ID_DIM),
        "proj.0.bias": 0.1 * torch.randn(2 * ID_DIM, generator=g),
        "proj.2.weight": lin(NUM_TOKENS * cross, 2 * ID_DIM),
        "proj.2.bias": 0.1 * torch.randn(NUM_TOKENS * cross, generator=g),
        "norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
        "norm.bias": 0.1 * torch.randn(cross, generator=g),
    }
    ip_adapter = {}
    key_id = 1
    modules = dict(unet.named_modules())
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = modules[name[: -len(".processor")]]
        out_dim = attn.to_k.weight.shape[0]
        ip_adapter[f"{key_id}.to_k_ip.weight"] = lin(out_dim, cross)
        ip_adapter[f"{key_id}.to_v_ip.weight"] = lin(out_dim, cross)
        key_id += 2
    sections = {"image_proj": image_proj, "ip_adapter": ip_adapter}
    return {k: {n: v.to(dtype) for n, v in sec.items()} for k, sec in sections.items()}


def make_random_model(out_dir, arch: str = "tiny", dtype: torch.dtype = torch.float32, device: str = "cpu",
                      variant: str | None = None) -> dict[str, Path]:
    """Write the random-weight SDXL, FaceID adapter and ArcFace of ``arch`` into ``out_dir``; return their paths.
    The weights are initialised on ``device`` (the full-size set in seconds on a GPU) and saved in ``dtype``
    (as ``*.{variant}.safetensors`` with a ``variant``, as the published fp16 files are named)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    spec = ARCHITECTURES[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device(device):
        unet, vae, te1, te2 = random_models(spec)
    adapter_sd = make_adapter_state_dict(unet, spec.seeds["adapter"], dtype)
    tok_dir = out / "_tokenizer_src"
    tok = _tokenizer(tok_dir)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    if dtype != torch.float32 or device != "cpu":
        pipe.to("cpu", dtype)
    sdxl = out / "sdxl"
    pipe.save_pretrained(str(sdxl), safe_serialization=True, variant=variant)
    del pipe, unet, vae, te1, te2
    for sub in ("tokenizer", "tokenizer_2"):  # slow-tokenizer files too, for older transformers
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tok_dir / name, sdxl / sub / name)
    shutil.rmtree(tok_dir)

    adapter = out / "ip-adapter" / "ip-adapter-faceid_sdxl.bin"
    adapter.parent.mkdir(parents=True, exist_ok=True)
    torch.save(adapter_sd, str(adapter))
    arcface = make_arcface_onnx(out / "arcface" / "w600k_r50.onnx", layout="tiny" if arch == "tiny" else "r50")
    (out / "random_model.json").write_text(json.dumps({"architecture": arch, "dtype": str(dtype).replace("torch.", ""),
                                                       "variant": variant, "face_size": spec.face_size}))
    return {"model": sdxl, "ip_adapter": adapter.parent, "ip_adapter_file": adapter,
            "ip_adapter_weight_name": adapter.name, "arcface": arcface}


def make_tiny(out_dir) -> dict[str, Path]:
    """Write the tiny SDXL, FaceID adapter and ArcFace into ``out_dir`` (float32); return their paths."""
    return make_random_model(out_dir, "tiny")
