"""The DPM-Solver++ (2M, SDE) math of edit-friendly inversion and generation (shared/ALGORITHM.md): pure
tensor arithmetic, no model. The noise is injected by the caller (drawn up front for inversion, the stored
maps for generation) and the noise predictions come from a callable, so this module knows no pipeline.

Data prediction, lambda = log(alpha/sigma), alpha/sigma read from ``alphas_cumprod`` at integer train
timesteps, h = lambda_next - lambda_cur:
    mu = sigma_next/sigma_cur * exp(-h) * x + alpha_next * (1 - exp(-2h)) * (D0 + 0.5 * D1)
    D0 = x0_pred, D1 = (x0_pred - x0_pred_prev) / r0, r0 = h_prev / h   (D1 = 0 on the first step)
    x_next = mu + sigma_next * sqrt(1 - exp(-2h)) * z
The step after the last timestep goes to train timestep 0. The solver history is reset before generation
(the reference carries it over from inversion; see ALGORITHM.md), so generating with the inversion
conditioning returns the input latent exactly (up to rounding).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

# Columns of ``solver_table``: per step i, the coefficients of the step from timesteps[i] to the next
# timestep (train timestep 0 after the last).
A_S, S_S, C_X, C_D, C_D1, STD = range(6)


def inversion_timesteps(skip: float, num_steps: int) -> np.ndarray:
    """``int64(linspace(1000 - skip*1000 - 1, 1, N))``, descending (reference: 299 ... 1)."""
    return np.linspace(1000 - skip * 1000 - 1, 1, num_steps).astype(np.int64)


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


def step(coefficients: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, prev_x0: torch.Tensor | None):
    """One step with one row of ``solver_table`` (device scalars: no host sync). Returns
    (mu, noise_std, x0_pred); the caller adds ``noise_std * z``."""
    c = coefficients
    x0 = (x - c[S_S] * eps) / c[A_S]
    mu = c[C_X] * x + c[C_D] * x0
    if prev_x0 is not None:
        mu = mu + c[C_D1] * (x0 - prev_x0)
    return mu, c[STD], x0


def _per_step(table: torch.Tensor) -> torch.Tensor:
    """The table viewed [N, 1, 1, 1, 1, 6]: each step's coefficients broadcast over latents [N, B, C, h, w]."""
    return table.view(table.shape[0], 1, 1, 1, 1, 6)


def noisy_latents(table: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[N, B, C, h, w]: x_{t_i} = alpha_i x0 + sigma_i noise_i, the inversion's UNet inputs of every step, all
    known before the first UNet call."""
    sc = _per_step(table)
    return sc[..., A_S] * x0 + sc[..., S_S] * noise


def noise_maps(table: torch.Tensor, xs: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The inversion's noise maps z [N, B, C, h, w] from the UNet inputs ``xs`` of all steps and their guided
    noise predictions ``eps``, over all steps at once. The sequential loop's re-anchoring
    x_{t_{i+1}} := mu_i + std_i z_i is the identity in exact arithmetic, so this equals the loop to rounding."""
    sc = _per_step(table)
    x0_pred = (xs - sc[..., S_S] * eps) / sc[..., A_S]
    mu = sc[..., C_X] * xs + sc[..., C_D] * x0_pred
    mu[1:] += sc[1:, ..., C_D1] * (x0_pred[1:] - x0_pred[:-1])
    del x0_pred
    x_next = torch.cat([xs[1:], x0[None]])
    return (x_next - mu) / sc[..., STD]


def sample(table: torch.Tensor, x: torch.Tensor, zs: torch.Tensor,
           eps_at: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Generation: from ``x`` (x_T) through every step, injecting the stored noise ``zs[i]``; ``eps_at(x, i)``
    is the guided noise prediction at step i. The solver history starts empty (ALGORITHM.md)."""
    prev = None
    for i in range(table.shape[0]):
        mu, std, prev = step(table[i], x, eps_at(x, i), prev)
        x = mu + std * zs[i]
    return x
