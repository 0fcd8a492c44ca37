"""Reverse personalization (shared/ALGORITHM.md): edit-friendly inversion of aligned face crops through
SDXL, then regeneration with negative identity guidance on the IP-Adapter-FaceID branch.

diffusers provides the models (``sdxl.load_pipeline``); the solver math lives in ``solver``, the guided UNet
call in ``guided_unet``, the conditioning rows in ``conditioning``, the VAE round trip in ``vae``. This module
composes them: ``invert`` and ``generate`` for batches of faces, each face with its own seed, prompt,
identity and guidance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from . import solver
from .conditioning import ID_DIM, Conditioning, ConditioningBuilder
from .guided_unet import GuidedUNet
from ..config.diffusion import check_parameters
from .sdxl import load_pipeline
from .vae import LatentCodec

log = logging.getLogger(__name__)


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


class ReversePersonalizer:
    """SDXL + IP-Adapter-FaceID reverse personalization. Build once per actor with ``from_config``."""

    def __init__(self, pipe, cfg, device: torch.device, dtype: torch.dtype, model_info: dict | None = None):
        check_parameters(cfg)
        self.pipe, self.cfg, self.device, self.dtype = pipe, cfg, device, dtype
        self.unet = pipe.unet
        self.codec = LatentCodec(pipe.vae, device)
        self.conditioning = ConditioningBuilder(pipe, device, dtype)
        ac = pipe.scheduler.alphas_cumprod.to(torch.float64)
        alpha, sigma = torch.sqrt(ac).tolist(), torch.sqrt(1.0 - ac).tolist()
        self._timesteps = solver.inversion_timesteps(cfg.skip, cfg.num_inversion_steps)
        # Everything the step loops read lives on the device from here on: no host-to-device copy (and no
        # launch-queue drain, no break in a CUDA graph) inside the loops.
        self.t_device = torch.as_tensor(self._timesteps, dtype=torch.long, device=device)
        self.table = solver.solver_table(self._timesteps, alpha, sigma).to(device)
        batch = 8 if cfg.unet_batch_size == "auto" else int(cfg.unet_batch_size)
        self.guided = GuidedUNet(pipe.unet, dtype, batch, cfg.sdpa_backend)
        self.model_info = dict(model_info or {})
        self.model_info.update(device=str(device), dtype=str(dtype).replace("torch.", ""))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg, face_size: int = 1024) -> "ReversePersonalizer":
        """``face_size``: the crop side the job runs at (``alignment.face_size``), for the memory probe."""
        loaded = load_pipeline(cfg)
        rp = cls(loaded.pipe, cfg, loaded.device, loaded.dtype, loaded.info)
        rp.setup_hot_loop(face_size)
        return rp

    def setup_hot_loop(self, face_size: int) -> None:
        """UNet batch size (a peak-memory probe on CUDA when ``unet_batch_size: auto``), then compilation."""
        size = (face_size, face_size)
        if self.cfg.unet_batch_size == "auto" and self.device.type == "cuda":
            self.guided.batch_size = self.guided.probe_batch_size(lambda m: self.probe_call(m, size), self.device)
            log.info("unet_batch_size auto: %d samples per UNet call at %d px", self.batch_size, face_size)
        self.model_info["unet_batch_size"] = self.batch_size
        if self.cfg.compile:
            self.guided.compile(self.cfg.compile_backend, lambda: self.probe_call(1, size))
            self.model_info["compiled"] = True

    def probe_call(self, m: int, size: tuple[int, int]) -> torch.Tensor:
        """One guided UNet call of ``m`` samples at crop ``size`` (zero latents, the inversion conditioning): what
        the batch-size probe measures, the compile warm-up traces and benchmarks time."""
        x = torch.zeros((m,) + self.latent_shape(size), dtype=torch.float32, device=self.device)
        cond = self.build_conditioning([None], None, size).repeat(m)
        g = torch.full((m, 1, 1, 1), float(self.cfg.guidance_scale), device=self.device)
        return self.guided.eps(x, self.t_device[:1].expand(m), cond, g)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def batch_size(self) -> int:
        """(timestep, face) samples per UNet call."""
        return self.guided.batch_size

    @property
    def compiled(self) -> bool:
        return self.guided.compiled

    def timesteps(self) -> np.ndarray:
        return self._timesteps.copy()

    def unet_evals_per_face(self, tries: int = 1, pseudonym: bool = False) -> int:
        """UNet image evaluations per face: each try (rung) is an inversion and a generation at its own
        guidance (ALGORITHM.md, "Stronger guidance"), each 2 branches x N steps: 4N per try; a face generated
        with a pseudonym branch (h != 0) has 3 generation branches: 5N per try."""
        return (5 if pseudonym else 4) * len(self._timesteps) * tries

    def latent_shape(self, size: tuple[int, int]) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, size[0] // f, size[1] // f)

    def build_conditioning(self, neg_prompts: list[str | None], ids: torch.Tensor | None,
                           size: tuple[int, int], pseudonyms: torch.Tensor | None = None) -> Conditioning:
        return self.conditioning.build(neg_prompts, ids, size, pseudonyms)

    # ------------------------------------------------------------------ inputs

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

    def _identities(self, id_embeddings, b: int, what: str = "id_embeddings") -> torch.Tensor:
        """[B, 512] identities x ``id_emb_scale``, checked."""
        if id_embeddings is None:
            raise ValueError(f"generation needs {what}")
        ids = torch.as_tensor(np.asarray(id_embeddings, dtype=np.float32))
        if ids.shape != (b, ID_DIM):
            raise ValueError(f"{what} must be [{b}, {ID_DIM}], got {tuple(ids.shape)}")
        if not torch.isfinite(ids).all():
            raise ValueError(f"{what} contain non-finite values")
        return ids * float(self.cfg.id_emb_scale)

    def _pseudonym_scales(self, scales: Sequence[float] | None, b: int) -> list[float]:
        """Per face h (0: no pseudonym branch), checked."""
        if scales is None:
            return [0.0] * b
        if len(scales) != b or not all(math.isfinite(float(v)) and float(v) >= 0 for v in scales):
            raise ValueError(f"need {b} finite pseudonym scales >= 0, got {scales}")
        return [float(v) for v in scales]

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

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def invert(self, crops: Sequence[np.ndarray], seeds: Sequence[int],
               guidance_scales: Sequence[float] | None = None, noise: torch.Tensor | None = None) -> Inversion:
        """Edit-friendly inversion of B crops (RGB uint8, one size); one seeded CPU generator per face.

        guidance_scales: per face, the g the inversion's noise maps belong to; generation must use the
        same g (ALGORITHM.md). None = ``cfg.guidance_scale`` for all. noise: ``draw_noise(seeds, ...)``,
        drawn here when None.

        Batched: every UNet input x_{t_i} is known up front (``solver.noisy_latents``), so the N x B noise
        predictions run as a few calls of ``batch_size`` (timestep, face) samples with per-sample timesteps;
        the solver then runs over all steps at once (``solver.noise_maps``)."""
        size = self._check_crops(crops)
        if len(seeds) != len(crops):
            raise ValueError(f"{len(crops)} crops but {len(seeds)} seeds")
        n, b = len(self._timesteps), len(crops)
        g = self._guidance(guidance_scales, b)
        x0 = self.codec.encode(crops)
        if noise is None:
            noise = self.draw_noise(seeds, tuple(x0.shape[1:]))
        if tuple(noise.shape) != (n,) + tuple(x0.shape):
            raise ValueError(f"noise must be {(n,) + tuple(x0.shape)}, got {tuple(noise.shape)}")
        xs = solver.noisy_latents(self.table, x0, noise.to(self.device, non_blocking=True))
        del noise
        flat_x = xs.view((n * b,) + tuple(x0.shape[1:]))
        flat_t = self.t_device.repeat_interleave(b)
        flat_g = g.repeat(n, 1, 1, 1)
        one = self.build_conditioning([None], None, size)
        eps = torch.empty_like(flat_x)
        for start in range(0, n * b, self.batch_size):
            end = min(start + self.batch_size, n * b)
            eps[start:end] = self.guided.eps(flat_x[start:end], flat_t[start:end], one.repeat(end - start),
                                             flat_g[start:end])
        zs = solver.noise_maps(self.table, xs, x0, eps.view_as(xs))
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
        pseudonyms: np.ndarray | None = None,
        pseudonym_scales: Sequence[float] | None = None,
    ):
        """Regenerate the inverted faces with negative identity guidance.

        id_embeddings: [B, 512] L2-normalised ArcFace embeddings (multiplied by ``id_emb_scale`` here).
        attribute_prompts: per face, None/"" = no prompt; None for the list = ``cfg.attribute_prompt`` for all.
        guidance_scales: per face; None = ``cfg.guidance_scale`` for all.
        conditioning="inversion" reuses the inversion conditioning (returns the input, a self-check).
        pseudonyms: [B, 512] unit pseudonym embeddings p (ALGORITHM.md, "Pseudonyms"; x ``id_emb_scale`` here) and
        pseudonym_scales their h per face: faces with h > 0 get the third branch, the others are generated exactly
        as without pseudonyms (two-branch calls of their own).
        Faces sharing a call may have different prompts, identities, pseudonyms and guidance: all are per-sample
        rows. More faces than a call holds (``batch_size`` two-branch samples, 2/3 as many with three branches) run
        as several calls.
        Returns uint8 HxWx3 images, or (images, final latents [B, C, h, w] float32) with ``return_latents``.
        """
        b = len(inv)
        g = self._guidance(guidance_scales, b)
        hs = self._pseudonym_scales(pseudonym_scales, b)
        if conditioning == "inversion":
            groups = [(list(range(b)), self.build_conditioning([None], None, inv.image_size).repeat(b))]
        elif conditioning == "generation":
            groups = self._generation_conditioning(inv, id_embeddings, attribute_prompts, pseudonyms, hs)
        else:
            raise ValueError(f"conditioning must be 'generation' or 'inversion', got {conditioning!r}")
        xT, zs = inv.xT.to(self.device), inv.zs.to(self.device)
        h = torch.tensor(hs, dtype=torch.float32, device=self.device).view(b, 1, 1, 1)
        x = torch.empty_like(xT)
        for group, c in groups:
            cap = self.guided.capacity(c.branches)
            for start in range(0, len(group), cap):
                sel = group[start:start + cap]
                at = torch.as_tensor(sel, dtype=torch.long, device=self.device)
                x[at] = self.sample(xT[at], zs[:, at], c.select(range(start, start + len(sel))), g[at], h[at])
        images = self.codec.decode(x)
        return (images, x) if return_latents else images

    def _generation_conditioning(self, inv: Inversion, id_embeddings, attribute_prompts, pseudonyms, hs):
        """The generation conditioning as (faces, their rows) groups: the faces with h = 0 (two branches) and
        those with h > 0 (three branches), an empty group left out."""
        b = len(inv)
        ids = self._identities(id_embeddings, b)
        if attribute_prompts is None:
            attribute_prompts = [self.cfg.attribute_prompt] * b
        if len(attribute_prompts) != b:
            raise ValueError(f"need {b} attribute prompts, got {len(attribute_prompts)}")
        prompts = list(attribute_prompts)
        with_p = [i for i in range(b) if hs[i] > 0]
        plain = [i for i in range(b) if hs[i] == 0]
        groups = []
        if plain:
            groups.append((plain, self.build_conditioning([prompts[i] for i in plain], ids[plain], inv.image_size)))
        if with_p:
            ps = self._identities(pseudonyms, b, "pseudonyms")
            groups.append((with_p, self.build_conditioning([prompts[i] for i in with_p], ids[with_p], inv.image_size,
                                                           ps[with_p])))
        return groups

    def sample(self, x: torch.Tensor, zs: torch.Tensor, cond: Conditioning, g: torch.Tensor,
               h: torch.Tensor | None = None) -> torch.Tensor:
        """The generation loop for the faces of one call (``solver.sample``)."""
        m = x.shape[0]
        return solver.sample(self.table, x, zs,
                             lambda y, i: self.guided.eps(y, self.t_device[i].expand(m), cond, g, h))

    def anonymize(self, crops, id_embeddings, attribute_prompts=None, seeds=None, guidance_scales=None):
        """invert + generate; returns uint8 RGB crops."""
        if seeds is None:
            seeds = [self.cfg.seed] * len(crops)
        inv = self.invert(crops, seeds, guidance_scales)
        return self.generate(inv, id_embeddings, attribute_prompts, guidance_scales)
