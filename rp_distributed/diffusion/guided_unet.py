"""Guided noise predictions: one UNet call carries every guidance branch of up to ``batch_size`` samples.

How the call is executed (batch size, padding for a compiled graph, the attention kernel) changes results by
rounding only; what is computed is ALGORITHM.md's ``eps_neg + g * (eps_pos - eps_neg)``, with a pseudonym branch
``+ h * (eps_pseu - eps_neg)``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch

from .conditioning import Conditioning

log = logging.getLogger(__name__)


def plan_batch_size(peak_one: int, peak_two: int, free: int, fraction: float = 0.85, cap: int = 64) -> int:
    """The largest UNet batch (samples, each carried by both branches) whose extrapolated peak memory fits in
    ``fraction`` of ``free`` bytes, from peaks measured at batch 1 and 2 (linear in the batch; at least 1)."""
    per = max(peak_two - peak_one, 1)
    base = max(peak_one - per, 0)
    return int(max(1, min(cap, (fraction * free - base) // per)))


class GuidedUNet:
    """The UNet behind guided calls. ``batch_size``: samples per call; ``compiled``: every call is padded to
    ``batch_size`` samples so a compiled graph sees one shape (escalation tails and last chunks do not
    recompile)."""

    def __init__(self, unet, dtype: torch.dtype, batch_size: int, sdpa_backend: str = "auto"):
        self.module = unet  # the nn.Module (hooks, memory format); ``self.forward`` may be its compiled form
        self.forward = unet
        self.dtype = dtype
        self.batch_size = batch_size
        self.sdpa_backend = sdpa_backend
        self.compiled = False

    @torch.no_grad()
    def raw(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Raw noise predictions [K*M, C, h, w] for rows [branch 0 ; ... ; branch K-1] of M samples at
        per-sample timesteps ``t`` [M] (device long)."""
        m, k = x.shape[0], cond.branches
        # contiguous: broadcasting upstream can hand out permuted strides, which a compiled graph would treat
        # as a new input (a recompile)
        rows = [torch.cat([x] * k).to(self.dtype).contiguous(), torch.cat([t] * k)] + cond.tensors()
        pad = self.capacity(k) - m if self.compiled else 0
        if pad > 0:  # repeat each branch's sample 0; the extra rows are dropped below
            rows = [torch.cat([torch.cat([r[j * m:(j + 1) * m], r[j * m:j * m + 1].expand(pad, *r.shape[1:])])
                               for j in range(k)]) for r in rows]
        inp, ts, text, pooled, time_ids, ids = rows
        with self._attention():
            out = self.forward(inp, ts, encoder_hidden_states=text,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids, "image_embeds": [ids]},
                               return_dict=False)[0]
        if pad > 0:
            out = torch.cat([out[j * (m + pad):j * (m + pad) + m] for j in range(k)])
        return out

    def capacity(self, branches: int) -> int:
        """Samples per call with ``branches`` guidance branches: as many UNet rows as ``batch_size`` samples of two
        branches (what the memory probe measured), so a three-branch call carries 2/3 as many samples."""
        return max(1, 2 * self.batch_size // branches)

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, g: torch.Tensor,
            h: torch.Tensor | None = None) -> torch.Tensor:
        """Guided noise prediction eps_neg + g * (eps_pos - eps_neg) in float32, plus h * (eps_pseu - eps_neg) with a
        third (pseudonym) branch; ``g``, ``h`` [M, 1, 1, 1]."""
        out = self.raw(x, t, cond).to(torch.float32).chunk(cond.branches)
        neg, pos = out[0], out[1]
        guided = neg + g * (pos - neg)
        if cond.branches == 3:
            guided = guided + h * (out[2] - neg)
        return guided

    def _attention(self):
        if self.sdpa_backend == "auto":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[self.sdpa_backend]
        return sdpa_kernel(backend)

    @torch.no_grad()
    def probe_batch_size(self, call: Callable[[int], torch.Tensor], device: torch.device) -> int:
        """Measure the peak memory of ``call(m)`` (a guided call of m samples) at 1 and 2 samples and
        extrapolate (``plan_batch_size``)."""
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        base = torch.cuda.memory_allocated(device)
        peaks = []
        for m in (1, 2):
            torch.cuda.reset_peak_memory_stats(device)
            call(m)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        torch.cuda.empty_cache()
        return plan_batch_size(peaks[0], peaks[1], free)

    def compile(self, backend: str, warmup: Callable[[], torch.Tensor]) -> None:
        """torch.compile the UNet (static shapes, channels_last); compiles now, on ``warmup``, so the first
        face does not pay for it."""
        self.module.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.module, dynamic=False, backend=backend)
        self.compiled = True
        t0 = time.perf_counter()
        warmup()
        log.info("UNet compiled in %.1f s (batch %d)", time.perf_counter() - t0, self.batch_size)
