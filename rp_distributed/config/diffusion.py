"""Reverse personalization's settings (shared/ALGORITHM.md); defaults are the paper's reference settings. The
combination checks that keep generation from reproducing its input live here once (``parameter_errors``) and run
whenever a ``DiffusionConfig`` is validated: at load, and again by the diffusion stage on what it is given."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import EXECUTION, WHEN_SET, _Section, outside_fingerprint
from .sections import _auto_or_range


class DiffusionConfig(_Section):
    """Reverse personalization (ALGORITHM.md); defaults are the paper's reference settings."""

    model: str = Field("stabilityai/stable-diffusion-xl-base-1.0", description="hub id, local folder or fsspec URI")
    model_revision: str | None = Field(None, description="hub revision of `model` (a commit pins it; `models pull` "
                                       "records the commit); with lock_file, must be the lock's", json_schema_extra=WHEN_SET)
    variant: str | None = Field(None, description="diffusers weights variant: fp16 loads *.fp16.safetensors (half the "
                                "bytes of the float32 files); null: the plain files", json_schema_extra=WHEN_SET)
    ip_adapter: str = Field("h94/IP-Adapter-FaceID", description="hub id, local folder or fsspec URI")
    ip_adapter_revision: str | None = Field(None, description="hub revision of `ip_adapter`; with lock_file, must be "
                                            "the lock's", json_schema_extra=WHEN_SET)
    ip_adapter_weight_name: str = "ip-adapter-faceid_sdxl.bin"
    arcface: str = Field("~/.insightface/models/buffalo_l/w600k_r50.onnx", description="ArcFace ONNX file or URI")
    lock_file: str | None = Field(None, description="models.lock.json of a tree written by `rp-anonymize models pull`: "
                                  "model, ip_adapter and arcface must lie in it; each node copies it once into "
                                  "cache_dir, keyed by the lock's content, and checks size and sha256 of every file",
                                  json_schema_extra=WHEN_SET)
    cache_dir: str = Field("~/.cache/rp_distributed", description="local cache for models synced from URIs",
                           json_schema_extra=outside_fingerprint("a cache"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=outside_fingerprint(EXECUTION))
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    skip: float = Field(0.7, gt=0, lt=1)
    num_inversion_steps: int = Field(100, ge=2, le=1000)
    # g >= 0, a zero adapter scale or a zero identity make the generation conditioning equal (or, for g = 1,
    # as good as) the inversion conditioning: the output would be the input. Refused (parameter_errors).
    guidance_scale: float = Field(-10.0, allow_inf_nan=False, description="must be < 0 (negative identity guidance)")
    ip_adapter_scale: float = Field(1.0, le=10, description="must be > 0")
    id_emb_scale: float = Field(1.0, le=10, description="must be > 0")
    attribute_prompt: str | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    seed_mode: Literal["fixed", "per_face"] = Field(
        "per_face", description="fixed: every face uses `seed` (reference); per_face: derived from seed, input and face index"
    )
    arcface_providers: list[str] = Field(["CPUExecutionProvider"], json_schema_extra=outside_fingerprint(EXECUTION))
    # How the hot loop runs: batching, compilation, the attention kernel change results by rounding only.
    unet_batch_size: int | Literal["auto"] = Field(
        "auto", description="(timestep, face) samples per UNet call, each carried by both guidance branches; "
        "inversion packs its 100 independent calls per face into calls of this size. auto: on CUDA the largest "
        "size a peak-memory probe at start-up fits into 85% of free memory (at most 64); on CPU 8",
        json_schema_extra=outside_fingerprint(EXECUTION))
    compile: bool = Field(False, description="torch.compile the UNet (channels_last, every call padded to "
                          "unet_batch_size so escalation tails never recompile)",
                          json_schema_extra=outside_fingerprint(EXECUTION))
    compile_backend: str = Field("inductor", description="torch.compile backend (inductor; aot_eager traces "
                                 "without generating code, for checking graph capture)",
                                 json_schema_extra=outside_fingerprint(EXECUTION))
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = Field(
        "auto", description="scaled-dot-product attention kernel; auto: torch's choice",
        json_schema_extra=outside_fingerprint(EXECUTION))

    allow_bfloat16: bool = Field(False, description="run dtype bfloat16 anyway (logged as a warning): its error is "
                                 "not closed, see README 'Reduced precision'",
                                 json_schema_extra=outside_fingerprint("permits dtype=bfloat16, which is itself in the "
                                                                       "fingerprint"))

    @model_validator(mode="after")
    def _bfloat16_refused(self):
        if self.dtype == "bfloat16" and not self.allow_bfloat16:
            raise ValueError(
                "dtype=bfloat16 is refused: the negative guidance (x10 per step, 200 steps) amplifies its rounding "
                "to 2.7e-1 relative on the final latent of the shared fidelity case (float16: 3.4e-2); use float16 "
                "or float32, or set diffusion.allow_bfloat16=true to run it anyway (README, 'Reduced precision')")
        return self

    @field_validator("unet_batch_size")
    @classmethod
    def _positive_batch(cls, v):
        return _auto_or_range(v, 1, 256)

    @field_validator("guidance_scale", "ip_adapter_scale", "id_emb_scale")
    @classmethod
    def _anonymizes(cls, v: float, info) -> float:
        if error := _scale_error(info.field_name, v):
            raise ValueError(error)
        return v

    @model_validator(mode="after")
    def _timesteps(self):
        if error := _timesteps_error(self):
            raise ValueError(error)
        return self


def _timesteps_error(cfg) -> str | None:
    if not 0 < cfg.skip < 1:
        return None  # the field's own range says so
    t_max = int(1000 - cfg.skip * 1000 - 1)
    if t_max < 1:
        return f"skip={cfg.skip} leaves no timesteps (first timestep {t_max} < 1)"
    if not 2 <= cfg.num_inversion_steps <= t_max:
        return (f"num_inversion_steps={cfg.num_inversion_steps} must be in [2, {t_max}] with skip={cfg.skip} "
                f"(timesteps {t_max}..1 would repeat)")
    return None


def _scale_error(name: str, v) -> str | None:
    """g >= 0, or no identity (a zero adapter or embedding scale), make the generation conditioning equal the
    inversion conditioning: the output would be the input face."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return f"{name}={v} must be a finite number"
    if name == "guidance_scale" and not v < 0:
        return (f"guidance_scale={v} must be negative (reference: -10): g >= 0 reproduces the input face instead of "
                "anonymizing it")
    if name != "guidance_scale" and not v > 0:
        return f"{name}={v} must be > 0 (reference: 1.0): 0 removes the identity and generation reproduces the input face"
    return None


def parameter_errors(cfg) -> list[str]:
    """What makes these settings unusable: timesteps that do not exist or repeat, and any setting that would turn
    anonymization into reconstruction."""
    errors = [_timesteps_error(cfg)] + [_scale_error(n, getattr(cfg, n))
                                        for n in ("guidance_scale", "ip_adapter_scale", "id_emb_scale")]
    return [e for e in errors if e]


def check_parameters(cfg: DiffusionConfig) -> None:
    """``cfg`` checked again, as the diffusion stage receives it (a copy made with ``model_copy(update=...)`` or
    ``model_construct`` skipped validation): ValueError naming what is out of range."""
    errs = parameter_errors(cfg)
    if errs:
        raise ValueError("diffusion config out of range: " + "; ".join(errs))
    DiffusionConfig.model_validate(cfg.model_dump())  # every field's own range
