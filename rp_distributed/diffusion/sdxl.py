"""Load the SDXL pipeline with the IP-Adapter-FaceID adapter and ALGORITHM.md's scheduler, from the sources
``loading`` resolves and checks (hub, local folder, URI, or a pulled tree's lock)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from ..quiet import quiet_dependencies
from .loading import (
    ModelSourceError,
    load_adapter_state_dict,
    model_lock,
    resolve_adapter_file,
    resolve_device_dtype,
    resolve_model,
    source_kind,
    validate_adapter_state_dict,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    pipe: object  # diffusers StableDiffusionXLPipeline with the FaceID adapter loaded
    device: torch.device
    dtype: torch.dtype
    info: dict  # provenance recorded in every manifest row


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.36+); older releases only know ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def has_accelerate() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def placement(device: torch.device) -> dict:
    """Load each weight straight into its place: accelerate's empty initialisation (no parameter built and then
    overwritten by the file's) onto the target device (a GPU actor reads the safetensors files into GPU memory
    instead of building the pipeline in host memory and copying it over with ``pipe.to``). Without accelerate
    diffusers falls back, with a warning, to building every model first. With a diffusers release whose pipelines
    take no device as ``device_map`` (older ones know only "balanced") the pipeline is loaded on the CPU and
    ``load_pipeline`` moves it."""
    if not has_accelerate():
        raise RuntimeError("the diffusion stage needs `accelerate` (a dependency of rp-distributed: pip install "
                           "accelerate) to load SDXL straight into the target dtype and device")
    from diffusers.pipelines import pipeline_utils

    mapped = device.type in getattr(pipeline_utils, "SUPPORTED_DEVICE_MAP", ())
    return {"low_cpu_mem_usage": True, "device_map": device.type} if mapped else {"low_cpu_mem_usage": True}


def float32_vae(vae, model_src, extra: dict):
    """The VAE in float32 (its config asks for upcasting). Casting the half-precision pipeline's VAE would keep
    weights already rounded to the model dtype (5e-4 on the tiny model's latent), so the VAE is read again from
    its files in float32. Where the files are half precision (SDXL's fp16 variant) both give the same weights.
    ``extra`` holds the variant and the placement."""
    if vae.dtype == torch.float32:
        return vae
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(model_src, subfolder="vae", use_safetensors=True, **extra,
                                             **dtype_kwarg(torch.float32))
    except Exception as exc:  # noqa: BLE001 - the cast VAE still works, slightly less exact
        log.warning("VAE upcast: cannot read %s/vae in float32 (%s); casting the loaded one", model_src, exc)
        return vae.to(torch.float32)


def _provenance(cfg, locked, pipe) -> dict:
    """The revisions (the lock's, which the config's must equal) and the lock file's sha256, so every manifest
    row names the exact weights (a lock lists size and sha256 of every file)."""
    info = {
        "model": cfg.model, "model_revision": cfg.model_revision, "variant": cfg.variant,
        "ip_adapter": cfg.ip_adapter, "ip_adapter_revision": cfg.ip_adapter_revision,
        "ip_adapter_weight_name": cfg.ip_adapter_weight_name,
        "lock_sha256": locked.digest if locked is not None else None,
        "scheduler": "DPMSolverMultistep sde-dpmsolver++ order 2",
        "skip": cfg.skip, "num_inversion_steps": cfg.num_inversion_steps,
        "ip_adapter_scale": cfg.ip_adapter_scale, "id_emb_scale": cfg.id_emb_scale,
    }
    if hasattr(pipe, "name_or_path"):
        info["model_resolved"] = str(pipe.name_or_path)
    return info


def load_pipeline(cfg) -> LoadedPipeline:
    """SDXL + FaceID adapter for a ``DiffusionConfig``, on its device and dtype (the VAE in float32 where its
    config asks for upcasting)."""
    quiet_dependencies()
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    quiet_dependencies()  # now that their loggers exist

    device, dtype = resolve_device_dtype(cfg)
    if dtype == torch.bfloat16:
        log.warning("diffusion.dtype=bfloat16 (allow_bfloat16): its error is not closed; on the shared fidelity "
                    "case the final latent lands 2.7e-1 relative from float32 (float16: 3.4e-2). README, "
                    "'Reduced precision'")
    locked = model_lock(cfg)  # a pulled tree: synced once per node, sizes and sha256 checked, pins compared
    model_src = resolve_model(cfg.model, cfg.cache_dir, cfg.variant, locked)
    adapter_file = resolve_adapter_file(cfg.ip_adapter, cfg.ip_adapter_weight_name, cfg.cache_dir,
                                        cfg.ip_adapter_revision, locked)
    adapter_sd = load_adapter_state_dict(adapter_file, device)  # its layers are built from these tensors
    validate_adapter_state_dict(adapter_sd, cfg.ip_adapter)
    extra = placement(device)
    if cfg.variant:
        extra["variant"] = cfg.variant
    if locked is None and source_kind(cfg.model) == "hub" and cfg.model_revision:
        extra["revision"] = cfg.model_revision
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            model_src, use_safetensors=True, add_watermarker=False, **extra, **dtype_kwarg(dtype)
        )
    except Exception as exc:
        hint = " (hub ids need network access or a filled HF cache)" if source_kind(cfg.model) == "hub" else ""
        raise ModelSourceError(f"diffusion.model: cannot load SDXL from {cfg.model}{hint}: "
                               f"{type(exc).__name__}: {exc}") from exc
    n_cross = sum(1 for name in pipe.unet.attn_processors if name.endswith("attn2.processor"))
    validate_adapter_state_dict(adapter_sd, cfg.ip_adapter, pipe.unet.config.cross_attention_dim, n_cross)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2
    )
    # Empty adapter layers filled with the state dict's tensors (already on the device), cast to the UNet's dtype.
    pipe.load_ip_adapter(adapter_sd, subfolder=None, weight_name=cfg.ip_adapter_weight_name,
                         image_encoder_folder=None, low_cpu_mem_usage=True)
    del adapter_sd
    pipe.set_ip_adapter_scale(cfg.ip_adapter_scale)
    if pipe.vae.config.force_upcast:
        pipe.vae = float32_vae(pipe.vae, model_src, extra)
    if "device_map" not in extra:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe, device, dtype, _provenance(cfg, locked, pipe))
