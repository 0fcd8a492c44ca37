"""Crops to latents and back through SDXL's VAE (x scaling factor, or SDXL-style latent mean/std when the
VAE config has them), in slices of a few faces: a 1024 px decode holds several GB of activations per face."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

VAE_BATCH = 4  # faces per VAE call


class LatentCodec:
    def __init__(self, vae, device: torch.device):
        self.vae, self.device = vae, device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _mean_std(self, like: torch.Tensor):
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is None or getattr(cfg, "latents_std", None) is None:
            return None
        return (torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(like),
                torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(like))

    @torch.no_grad()
    def encode(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """x0 = VAE latent (mode) x scaling factor, float32 [B, C, h, w]."""
        img = torch.from_numpy(np.stack([np.asarray(c) for c in crops])).permute(0, 3, 1, 2)
        img = (img.to(torch.float32) / 255.0) * 2.0 - 1.0
        lat = torch.cat([self.vae.encode(part.to(self.device, self.dtype)).latent_dist.mode()
                         for part in img.split(VAE_BATCH)])
        scale, mean_std = self.vae.config.scaling_factor, self._mean_std(lat)
        lat = lat * scale if mean_std is None else (lat - mean_std[0]) * scale / mean_std[1]
        return lat.to(torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output: str = "uint8") -> list[np.ndarray]:
        """uint8 HxWx3 RGB crops (``output="float"``: floats in [0, 1])."""
        lat = latents.to(self.device, self.dtype)
        scale, mean_std = self.vae.config.scaling_factor, self._mean_std(lat)
        lat = lat / scale if mean_std is None else lat * mean_std[1] / scale + mean_std[0]
        img = torch.cat([self.vae.decode(part, return_dict=False)[0] for part in lat.split(VAE_BATCH)])
        img = (img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output == "float":
            return list(img)
        return [(x * 255).round().astype(np.uint8) for x in img]
