"""Reverse personalization (shared/ALGORITHM.md): DDPM-style inversion with the DPM-Solver++ 2nd-order SDE,
then regeneration with negative identity guidance.

diffusers provides the models (SDXL UNet/VAE/text encoders, the IP-Adapter-FaceID projection and attention
processors, prompt encoding). This module holds only the inversion, noise injection and guidance math.

Solver (data prediction, lambda = log(alpha/sigma), alpha/sigma read from ``alphas_cumprod`` at integer train
timesteps, h = lambda_next - lambda_cur):
    mu = sigma_next/sigma_cur * exp(-h) * x + alpha_next * (1 - exp(-2h)) * (D0 + 0.5 * D1)
    D0 = x0_pred, D1 = (x0_pred - x0_pred_prev) / r0, r0 = h_prev / h   (D1 = 0 on the first step)
    x_next = mu + sigma_next * sqrt(1 - exp(-2h)) * z
The step after the last timestep goes to train timestep 0. The solver history is reset before generation
(the reference carries it over from inversion; see ALGORITHM.md), so generating with the inversion
conditioning returns the input latent exactly (up to rounding).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from .loading import (
    ModelSourceError,
    check_parameters,
    load_adapter_state_dict,
    model_lock,
    resolve_adapter_file,
    resolve_device_dtype,
    resolve_model,
    source_kind,
    validate_adapter_state_dict,
)

log = logging.getLogger(__name__)

ID_DIM = 512
VAE_BATCH = 4  # faces per VAE call: a 1024 px decode holds several GB of activations per face


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.36+); older releases only know ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def inversion_timesteps(skip: float, num_steps: int) -> np.ndarray:
    """``int64(linspace(1000 - skip*1000 - 1, 1, N))``, descending (reference: 299 ... 1)."""
    return np.linspace(1000 - skip * 1000 - 1, 1, num_steps).astype(np.int64)


# Columns of ``solver_table``: per step i, the coefficients of the DPM-Solver++ (2M, SDE) step from
# timesteps[i] to the next timestep (train timestep 0 after the last).
A_S, S_S, C_X, C_D, C_D1, STD = range(6)


def solver_table(timesteps: np.ndarray, alpha: Sequence[float], sigma: Sequence[float]) -> torch.Tensor:
    """float32 [N, 6]: alpha_s, sigma_s, c_x, c_d, c_d1, std per step, computed in float64.

    x0 = (x - sigma_s eps) / alpha_s;  mu = c_x x + c_d x0 + c_d1 (x0 - x0_prev);  x_next = mu + std z,
    with c_d1 = 0.5 c_d / r0 (0 on the first step: first order)."""
    rows = []
    lam = [math.log(alpha[int(t)]) - math.log(sigma[int(t)]) for t in timesteps]
    for i, t in enumerate(timesteps):
        t_next = int(timesteps[i + 1]) if i + 1 < len(timesteps) else 0
        a_t, s_t = alpha[t_next], sigma[t_next]
        h = (math.log(a_t) - math.log(s_t)) - lam[i]
        c_x = s_t / sigma[int(t)] * math.exp(-h)
        c_d = a_t * (1.0 - math.exp(-2.0 * h))
        c_d1 = 0.0 if i == 0 else 0.5 * c_d * h / (lam[i] - lam[i - 1])  # 0.5 c_d / r0, r0 = h_prev / h
        rows.append((alpha[int(t)], sigma[int(t)], c_x, c_d, c_d1, s_t * math.sqrt(1.0 - math.exp(-2.0 * h))))
    return torch.tensor(rows, dtype=torch.float64).to(torch.float32)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector [M] viewed to broadcast over latents [M, C, h, w] (or [N, B, C, h, w] with [N, 1])."""
    return v.view(v.shape + (1,) * (like.dim() - v.dim()))


def plan_batch_size(peak_one: int, peak_two: int, free: int, fraction: float = 0.85, cap: int = 64) -> int:
    """The largest UNet batch (samples, each carried by both branches) whose extrapolated peak memory fits in
    ``fraction`` of ``free`` bytes, from peaks measured at batch 1 and 2 (linear in the batch; at least 1)."""
    per = max(peak_two - peak_one, 1)
    base = max(peak_one - per, 0)
    return int(max(1, min(cap, (fraction * free - base) // per)))


@dataclass
class Inversion:
    """Inverted latents of B faces. ``zs[i]`` is the noise of the step leaving ``timesteps[i]``."""

    x0: torch.Tensor  # [B, C, h, w] float32: VAE latent of the crop (x scaling factor)
    xT: torch.Tensor  # [B, C, h, w] float32: latent at timesteps[0], where generation starts
    zs: torch.Tensor  # [N, B, C, h, w] float32
    seeds: list[int]
    image_size: tuple[int, int]  # crop (H, W) in pixels
    timesteps: np.ndarray = field(repr=False, default=None)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def select(self, indices: Sequence[int]) -> "Inversion":
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.x0.device)
        return Inversion(
            x0=self.x0[idx], xT=self.xT[idx], zs=self.zs[:, idx], seeds=[self.seeds[i] for i in indices],
            image_size=self.image_size, timesteps=self.timesteps,
        )

    def to(self, device) -> "Inversion":
        return Inversion(self.x0.to(device), self.xT.to(device), self.zs.to(device), list(self.seeds),
                         self.image_size, self.timesteps)


@dataclass
class _Conditioning:
    """Both CFG branches for one UNet call: rows [negative (B) ; positive (B)]."""

    text: torch.Tensor  # [2B, 77, D]
    pooled: torch.Tensor  # [2B, P]
    ids: torch.Tensor  # [2B, 1, 1, 512]
    time_ids: torch.Tensor  # [2B, 6]


class ReversePersonalizer:
    """SDXL + IP-Adapter-FaceID reverse personalization. Build once per actor with ``from_config``."""

    def __init__(self, pipe, cfg, device: torch.device, dtype: torch.dtype, model_info: dict | None = None):
        check_parameters(cfg)
        self.pipe = pipe
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.unet = pipe.unet
        self.vae = pipe.vae
        ac = pipe.scheduler.alphas_cumprod.to(torch.float64)
        self._alpha = torch.sqrt(ac).tolist()
        self._sigma = torch.sqrt(1.0 - ac).tolist()
        self._timesteps = inversion_timesteps(cfg.skip, cfg.num_inversion_steps)
        # Everything the step loop reads lives on the device from here on: no host-to-device copy (and no
        # launch-queue drain, no break in a CUDA graph) inside the loop (issue 13).
        self._t_dev = torch.as_tensor(self._timesteps, dtype=torch.long, device=device)
        self._sched = solver_table(self._timesteps, self._alpha, self._sigma).to(device)
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.batch_size = 8 if cfg.unet_batch_size == "auto" else int(cfg.unet_batch_size)
        self.compiled = False
        self.model_info = dict(model_info or {})
        self.model_info.update(device=str(device), dtype=str(dtype).replace("torch.", ""))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg, face_size: int = 1024) -> "ReversePersonalizer":
        """``face_size``: the crop side the job runs at (``alignment.face_size``), for the memory probe."""
        rp = cls._load(cfg)
        rp.setup_hot_loop(face_size)
        return rp

    def setup_hot_loop(self, face_size: int) -> None:
        """UNet batch size (a peak-memory probe on CUDA when ``unet_batch_size: auto``), then compilation."""
        if self.cfg.unet_batch_size == "auto" and self.device.type == "cuda":
            self.batch_size = self.probe_batch_size((face_size, face_size))
            log.info("unet_batch_size auto: %d samples per UNet call at %d px", self.batch_size, face_size)
        self.model_info["unet_batch_size"] = self.batch_size
        if self.cfg.compile:
            self.compile((face_size, face_size))

    def _dummy_call(self, m: int, size: tuple[int, int]) -> torch.Tensor:
        x = torch.zeros((m,) + self.latent_shape(size), dtype=torch.float32, device=self.device)
        cond = self._repeat_cond(self.build_conditioning([None], None, size), m)
        g = torch.full((m, 1, 1, 1), float(self.cfg.guidance_scale), device=self.device)
        return self._eps(x, self._t_dev[:1].expand(m), cond, g)

    @torch.no_grad()
    def probe_batch_size(self, size: tuple[int, int]) -> int:
        """Measure the peak memory of a guided UNet call at 1 and 2 samples and extrapolate (``plan_batch_size``)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        base = torch.cuda.memory_allocated(self.device)
        peaks = []
        for m in (1, 2):
            torch.cuda.reset_peak_memory_stats(self.device)
            self._dummy_call(m, size)
            torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
        torch.cuda.empty_cache()
        return plan_batch_size(peaks[0], peaks[1], free)

    def compile(self, size: tuple[int, int]) -> None:
        """torch.compile the UNet (static shapes, channels_last); every call is then padded to ``batch_size``
        samples, so one graph serves inversion chunks, generation and escalation tails. Compiles now, on a
        dummy call, so the first face does not pay for it."""
        self.unet.to(memory_format=torch.channels_last)
        self.unet = torch.compile(self.pipe.unet, dynamic=False, backend=self.cfg.compile_backend)
        self.compiled = True
        t0 = time.perf_counter()
        self._dummy_call(1, size)
        self.model_info["compiled"] = True
        log.info("UNet compiled in %.1f s (batch %d at %s)", time.perf_counter() - t0, self.batch_size, size)

    @staticmethod
    def _float32_vae(vae, model_src, extra: dict):
        """The VAE in float32 (its config asks for upcasting). Casting the half-precision pipeline's VAE would
        keep weights already rounded to the model dtype (5e-4 on the tiny model's latent, issue 13), so the VAE
        is read again from its files in float32. Where the files are half precision (SDXL's fp16 variant)
        both give the same weights."""
        if vae.dtype == torch.float32:
            return vae
        from diffusers import AutoencoderKL

        try:
            return AutoencoderKL.from_pretrained(model_src, subfolder="vae", use_safetensors=True, **extra,
                                                 **_dtype_kwarg(torch.float32))
        except Exception as exc:  # noqa: BLE001 - the cast VAE still works, slightly less exact
            log.warning("VAE upcast: cannot read %s/vae in float32 (%s); casting the loaded one", model_src, exc)
            return vae.to(torch.float32)

    @classmethod
    def _load(cls, cfg) -> "ReversePersonalizer":
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

        check_parameters(cfg)
        device, dtype = resolve_device_dtype(cfg)
        if dtype == torch.bfloat16:
            log.warning("diffusion.dtype=bfloat16 (allow_bfloat16): its error is not closed; on the shared fidelity "
                        "case the final latent lands 2.7e-1 relative from float32 (float16: 3.4e-2). README, "
                        "'Reduced precision'")
        locked = model_lock(cfg)  # a pulled tree: synced once per node, sizes and sha256 checked, pins compared
        model_src = resolve_model(cfg.model, cfg.cache_dir, cfg.variant, locked)
        adapter_file = resolve_adapter_file(cfg.ip_adapter, cfg.ip_adapter_weight_name, cfg.cache_dir,
                                            cfg.ip_adapter_revision, locked)
        adapter_sd = load_adapter_state_dict(adapter_file)
        validate_adapter_state_dict(adapter_sd, cfg.ip_adapter)
        extra = {}
        if cfg.variant:
            extra["variant"] = cfg.variant
        if locked is None and source_kind(cfg.model) == "hub" and cfg.model_revision:
            extra["revision"] = cfg.model_revision
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                model_src, use_safetensors=True, add_watermarker=False, **extra, **_dtype_kwarg(dtype)
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
        pipe.load_ip_adapter(adapter_sd, subfolder=None, weight_name=cfg.ip_adapter_weight_name,
                             image_encoder_folder=None, low_cpu_mem_usage=False)
        pipe.set_ip_adapter_scale(cfg.ip_adapter_scale)
        pipe.to(device)
        if pipe.vae.config.force_upcast:
            pipe.vae = cls._float32_vae(pipe.vae, model_src, extra).to(device)
        pipe.set_progress_bar_config(disable=True)
        # Provenance: the revisions (the lock's, which the config's must equal) and the lock file's sha256, so
        # every manifest row names the exact weights (a lock lists size and sha256 of every file).
        info = {
            "model": cfg.model,
            "model_revision": cfg.model_revision,
            "variant": cfg.variant,
            "ip_adapter": cfg.ip_adapter,
            "ip_adapter_revision": cfg.ip_adapter_revision,
            "ip_adapter_weight_name": cfg.ip_adapter_weight_name,
            "lock_sha256": locked.digest if locked is not None else None,
            "scheduler": "DPMSolverMultistep sde-dpmsolver++ order 2",
            "skip": cfg.skip,
            "num_inversion_steps": cfg.num_inversion_steps,
            "ip_adapter_scale": cfg.ip_adapter_scale,
            "id_emb_scale": cfg.id_emb_scale,
        }
        if hasattr(pipe, "name_or_path"):
            info["model_resolved"] = str(pipe.name_or_path)
        return cls(pipe, cfg, device, dtype, info)

    # ------------------------------------------------------------------ bookkeeping

    def timesteps(self) -> np.ndarray:
        return self._timesteps.copy()

    def unet_evals_per_face(self, tries: int = 1) -> int:
        """UNet image evaluations per face: each try (rung) is an inversion and a generation at its own
        guidance (ALGORITHM.md, "Stronger guidance"), each 2 branches x N steps: 4N per try."""
        return 4 * len(self._timesteps) * tries

    # ------------------------------------------------------------------ VAE

    @property
    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """x0 = VAE latent (mode) x scaling factor, float32 [B, C, h, w]."""
        img = torch.from_numpy(np.stack([np.asarray(c) for c in crops])).permute(0, 3, 1, 2)
        img = (img.to(torch.float32) / 255.0) * 2.0 - 1.0
        lat = torch.cat([self.vae.encode(part.to(self.device, self._vae_dtype)).latent_dist.mode()
                         for part in img.split(VAE_BATCH)])
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(lat)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(lat)
            lat = (lat - mean) * cfg.scaling_factor / std
        else:
            lat = lat * cfg.scaling_factor
        return lat.to(torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output: str = "uint8") -> list[np.ndarray]:
        cfg = self.vae.config
        lat = latents.to(self.device, self._vae_dtype)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(lat)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(lat)
            lat = lat * std / cfg.scaling_factor + mean
        else:
            lat = lat / cfg.scaling_factor
        img = torch.cat([self.vae.decode(part, return_dict=False)[0] for part in lat.split(VAE_BATCH)])
        img = (img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output == "float":
            return list(img)
        return [(x * 255).round().astype(np.uint8) for x in img]

    # ------------------------------------------------------------------ conditioning

    def _encode_texts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            with torch.no_grad():
                emb, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=todo, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
            for i, p in enumerate(todo):
                self._text_cache[p] = (emb[i : i + 1].to(self.dtype), pooled[i : i + 1].to(self.dtype))
        embs, pools = zip(*(self._text_cache[p] for p in prompts))
        return torch.cat(embs), torch.cat(pools)

    def _texts_or_zeros(self, prompts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        ref_e, ref_p = self._encode_texts([""])
        embs, pools = [], []
        for p in prompts:
            if p is None or not p.strip():
                embs.append(torch.zeros_like(ref_e))
                pools.append(torch.zeros_like(ref_p))
            else:
                e, q = self._encode_texts([p])
                embs.append(e)
                pools.append(q)
        return torch.cat(embs), torch.cat(pools)

    def _time_ids(self, n: int, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
        return ids.repeat(n, 1)

    def build_conditioning(self, neg_prompts: list[str | None], ids: torch.Tensor | None,
                           size: tuple[int, int]) -> _Conditioning:
        """Rows [negative ; positive]. Negative: ``neg_prompts`` encoded (None -> zeros), zero identity.
        Positive: ``""`` encoded, identity ``ids`` [B, 512] (None -> zeros: the null identity)."""
        b = len(neg_prompts)
        neg_e, neg_p = self._texts_or_zeros(neg_prompts)
        pos_e, pos_p = self._encode_texts([""] * b)
        zeros = torch.zeros(b, 1, 1, ID_DIM, dtype=self.dtype, device=self.device)
        pos_ids = zeros if ids is None else ids.to(self.device, self.dtype).view(b, 1, 1, ID_DIM)
        return _Conditioning(
            text=torch.cat([neg_e, pos_e]),
            pooled=torch.cat([neg_p, pos_p]),
            ids=torch.cat([zeros, pos_ids]),
            time_ids=self._time_ids(2 * b, size),
        )

    # ------------------------------------------------------------------ math

    @torch.no_grad()
    def _unet(self, x: torch.Tensor, t: torch.Tensor, cond: _Conditioning) -> torch.Tensor:
        """Raw UNet noise predictions [2M, C, h, w] for rows [negative ; positive] of M samples at per-sample
        timesteps ``t`` [M] (device long). Compiled: every call is padded to ``batch_size`` samples, so the
        graph sees one shape (escalation tails and last chunks do not recompile)."""
        m = x.shape[0]
        # contiguous: broadcasting in invert() can hand out permuted strides, which a compiled graph would
        # treat as a new input (a recompile)
        rows = [torch.cat([x, x]).to(self.dtype).contiguous(), torch.cat([t, t]), cond.text, cond.pooled,
                cond.time_ids, cond.ids]
        pad = self.batch_size - m if self.compiled else 0
        if pad > 0:  # repeat sample 0 in both halves; its extra rows are dropped below
            rows = [torch.cat([r[:m], r[:1].expand(pad, *r.shape[1:]), r[m:], r[m:m + 1].expand(pad, *r.shape[1:])])
                    for r in rows]
        inp, ts, text, pooled, time_ids, ids = rows
        with self._attention():
            out = self.unet(inp, ts, encoder_hidden_states=text,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids, "image_embeds": [ids]},
                            return_dict=False)[0]
        if pad > 0:
            out = torch.cat([out[:m], out[m + pad:2 * m + pad]])
        return out

    def _attention(self):
        import contextlib

        if self.cfg.sdpa_backend == "auto":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[self.cfg.sdpa_backend]
        return sdpa_kernel(backend)

    @torch.no_grad()
    def _eps(self, x: torch.Tensor, t: torch.Tensor, cond: _Conditioning, g: torch.Tensor) -> torch.Tensor:
        """Guided noise prediction eps_neg + g * (eps_pos - eps_neg) in float32; ``g`` [M, 1, 1, 1]."""
        neg, pos = self._unet(x, t, cond).to(torch.float32).chunk(2)
        return neg + g * (pos - neg)

    def _step(self, x: torch.Tensor, eps: torch.Tensor, i: int, prev_x0: torch.Tensor | None):
        """DPM-Solver++ (2M, SDE) step from timesteps[i] to the next one (train timestep 0 after the last).
        Returns (mu, noise_std, x0_pred); the coefficients are device scalars (no host sync)."""
        c = self._sched[i]
        x0 = (x - c[S_S] * eps) / c[A_S]
        mu = c[C_X] * x + c[C_D] * x0
        if prev_x0 is not None:
            mu = mu + c[C_D1] * (x0 - prev_x0)
        return mu, c[STD], x0

    def _check_crops(self, crops) -> tuple[int, int]:
        if not len(crops):
            raise ValueError("no crops")
        shapes = {np.asarray(c).shape for c in crops}
        if len(shapes) != 1:
            raise ValueError(f"all crops of a batch must have one size, got {sorted(shapes)}")
        (shape,) = shapes
        mult = self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        if len(shape) != 3 or shape[2] != 3 or shape[0] % mult or shape[1] % mult:
            raise ValueError(f"crops must be HxWx3 with H, W multiples of {mult}, got {shape}")
        if any(np.asarray(c).dtype != np.uint8 for c in crops):
            raise ValueError("crops must be uint8 RGB")
        return shape[0], shape[1]

    def _guidance(self, guidance_scales: Sequence[float] | None, b: int) -> torch.Tensor:
        """[B, 1, 1, 1] float32 on the device; None = ``cfg.guidance_scale`` for all."""
        if guidance_scales is None:
            guidance_scales = [self.cfg.guidance_scale] * b
        if len(guidance_scales) != b or not all(math.isfinite(float(v)) for v in guidance_scales):
            raise ValueError(f"need {b} finite guidance scales, got {guidance_scales}")
        return torch.tensor([float(v) for v in guidance_scales], dtype=torch.float32, device=self.device).view(b, 1, 1, 1)

    # ------------------------------------------------------------------ public

    def latent_shape(self, size: tuple[int, int]) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, size[0] // f, size[1] // f)

    def draw_noise(self, seeds: Sequence[int], latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The inversion's noise [N, B, C, h, w] float32 on the CPU: per face one seeded CPU generator, one
        draw of the latent's shape per timestep in ascending t (the reference's stream, whatever the batch).
        Pure CPU work with the GIL released: callers may draw the next chunk's noise in a thread while the
        device works (``invert(noise=...)``)."""
        n = len(self._timesteps)
        noise = torch.empty((n, len(seeds)) + tuple(latent_shape), dtype=torch.float32)
        for j, seed in enumerate(seeds):
            gen = torch.Generator("cpu").manual_seed(int(seed))
            for i in reversed(range(n)):
                noise[i, j] = torch.randn((1,) + tuple(latent_shape), generator=gen, dtype=self.dtype)[0]
        return noise

    def _repeat_cond(self, cond: _Conditioning, m: int) -> _Conditioning:
        """A one-sample conditioning ([neg ; pos], 2 rows) for M samples: rows [neg x M ; pos x M]."""
        def rep(t):
            return torch.cat([t[:1].expand(m, *t.shape[1:]), t[1:].expand(m, *t.shape[1:])])

        return _Conditioning(rep(cond.text), rep(cond.pooled), rep(cond.ids), rep(cond.time_ids))

    @torch.no_grad()
    def invert(self, crops: Sequence[np.ndarray], seeds: Sequence[int],
               guidance_scales: Sequence[float] | None = None, noise: torch.Tensor | None = None) -> Inversion:
        """Edit-friendly inversion of B crops (RGB uint8, one size); one seeded CPU generator per face.

        guidance_scales: per face, the g the inversion's noise maps belong to; generation must use the
        same g (ALGORITHM.md). None = ``cfg.guidance_scale`` for all. noise: ``draw_noise(seeds, ...)``,
        drawn here when None.

        Batched (issue 13): every UNet input x_{t_i} = alpha_i x0 + sigma_i noise_i is known up front, so the
        N x B noise predictions run as a few calls of ``batch_size`` (timestep, face) samples with per-sample
        timesteps; the solver then runs over all steps at once. The sequential loop's re-anchoring
        x_{t_{i+1}} := mu_i + std_i z_i is the identity in exact arithmetic, so the result equals the loop's to
        rounding, and generating with the inversion conditioning still returns x0."""
        size = self._check_crops(crops)
        if len(seeds) != len(crops):
            raise ValueError(f"{len(crops)} crops but {len(seeds)} seeds")
        n, b = len(self._timesteps), len(crops)
        g = self._guidance(guidance_scales, b)
        x0 = self.encode(crops)
        if noise is None:
            noise = self.draw_noise(seeds, tuple(x0.shape[1:]))
        if tuple(noise.shape) != (n,) + tuple(x0.shape):
            raise ValueError(f"noise must be {(n,) + tuple(x0.shape)}, got {tuple(noise.shape)}")
        noise = noise.to(self.device, non_blocking=True)
        sc = self._sched.view(n, 1, 1, 1, 1, 6)  # per step, broadcast over [N, B, C, h, w]
        xs = sc[..., A_S] * x0 + sc[..., S_S] * noise  # [N, B, C, h, w]: the UNet inputs of all steps
        del noise
        flat_x = xs.view((n * b,) + tuple(x0.shape[1:]))
        flat_t = self._t_dev.repeat_interleave(b)
        flat_g = g.repeat(n, 1, 1, 1)
        one = self.build_conditioning([None], None, size)
        eps = torch.empty_like(flat_x)
        for start in range(0, n * b, self.batch_size):
            end = min(start + self.batch_size, n * b)
            eps[start:end] = self._eps(flat_x[start:end], flat_t[start:end], self._repeat_cond(one, end - start),
                                       flat_g[start:end])
        eps = eps.view_as(xs)
        x0_pred = (xs - sc[..., S_S] * eps) / sc[..., A_S]
        del eps
        mu = sc[..., C_X] * xs + sc[..., C_D] * x0_pred
        mu[1:] += sc[1:, ..., C_D1] * (x0_pred[1:] - x0_pred[:-1])
        del x0_pred
        x_next = torch.cat([xs[1:], x0[None]])
        zs = (x_next - mu) / sc[..., STD]
        return Inversion(x0=x0, xT=xs[0].clone(), zs=zs, seeds=[int(s) for s in seeds], image_size=size,
                         timesteps=self._timesteps.copy())

    @torch.no_grad()
    def generate(
        self,
        inv: Inversion,
        id_embeddings: np.ndarray | None = None,
        attribute_prompts: Sequence[str | None] | None = None,
        guidance_scales: Sequence[float] | None = None,
        conditioning: Literal["generation", "inversion"] = "generation",
        return_latents: bool = False,
    ):
        """Regenerate the inverted faces with negative identity guidance.

        id_embeddings: [B, 512] L2-normalised ArcFace embeddings (multiplied by ``id_emb_scale`` here).
        attribute_prompts: per face, None/"" = no prompt; None for the list = ``cfg.attribute_prompt`` for all.
        guidance_scales: per face; None = ``cfg.guidance_scale`` for all.
        conditioning="inversion" reuses the inversion conditioning (returns the input, a self-check).
        Faces sharing a call may have different prompts, identities and guidance: all are per-sample rows.
        More faces than ``batch_size`` run as several calls of at most ``batch_size`` faces.
        Returns uint8 HxWx3 images, or (images, final latents [B, C, h, w] float32) with ``return_latents``.
        """
        b = len(inv)
        g = self._guidance(guidance_scales, b)
        if conditioning == "inversion":
            cond = self._repeat_cond(self.build_conditioning([None], None, inv.image_size), b)
        elif conditioning == "generation":
            if id_embeddings is None:
                raise ValueError("generation needs id_embeddings")
            ids = torch.as_tensor(np.asarray(id_embeddings, dtype=np.float32))
            if ids.shape != (b, ID_DIM):
                raise ValueError(f"id_embeddings must be [{b}, {ID_DIM}], got {tuple(ids.shape)}")
            if not torch.isfinite(ids).all():
                raise ValueError("id_embeddings contain non-finite values")
            ids = ids * float(self.cfg.id_emb_scale)
            if attribute_prompts is None:
                attribute_prompts = [self.cfg.attribute_prompt] * b
            if len(attribute_prompts) != b:
                raise ValueError(f"need {b} attribute prompts, got {len(attribute_prompts)}")
            cond = self.build_conditioning(list(attribute_prompts), ids, inv.image_size)
        else:
            raise ValueError(f"conditioning must be 'generation' or 'inversion', got {conditioning!r}")
        xT, zs = inv.xT.to(self.device), inv.zs.to(self.device)
        finals = []
        for start in range(0, b, self.batch_size):
            end = min(start + self.batch_size, b)
            rows = torch.cat([torch.arange(start, end), torch.arange(b + start, b + end)]).to(self.device)
            part = _Conditioning(cond.text[rows], cond.pooled[rows], cond.ids[rows], cond.time_ids[rows])
            finals.append(self._generate_latents(xT[start:end], zs[:, start:end], part, g[start:end]))
        x = torch.cat(finals)
        images = self.decode(x)
        return (images, x) if return_latents else images

    def _generate_latents(self, x: torch.Tensor, zs: torch.Tensor, cond: _Conditioning, g: torch.Tensor):
        """The generation loop for at most ``batch_size`` faces; the solver history starts empty (ALGORITHM.md)."""
        prev = None
        m = x.shape[0]
        for i in range(len(self._timesteps)):
            eps = self._eps(x, self._t_dev[i].expand(m), cond, g)
            mu, std, prev = self._step(x, eps, i, prev)
            x = mu + std * zs[i]
        return x

    def anonymize(self, crops, id_embeddings, attribute_prompts=None, seeds=None, guidance_scales=None):
        """invert + generate; returns uint8 RGB crops."""
        if seeds is None:
            seeds = [self.cfg.seed] * len(crops)
        inv = self.invert(crops, seeds, guidance_scales)
        return self.generate(inv, id_embeddings, attribute_prompts, guidance_scales)
