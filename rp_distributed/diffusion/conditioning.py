"""The UNet's conditioning for classifier-free guidance: text, pooled text, identity and SDXL's time ids,
one block of rows per guidance branch (shared/ALGORITHM.md, "Conditioning").

A ``Conditioning`` of B samples holds K branches as rows [branch 0 (B) ; branch 1 (B) ; ...]: branch 0 is
the negative branch every guidance term is taken against. ``ConditioningBuilder`` encodes prompts through the
pipeline's text encoders (diffusers' ``encode_prompt``) once per distinct prompt and keeps them on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ID_DIM = 512


@dataclass
class Conditioning:
    """Rows [branch 0 ; branch 1 ; ...], ``samples`` rows each."""

    text: torch.Tensor  # [K*B, 77, D]
    pooled: torch.Tensor  # [K*B, P]
    ids: torch.Tensor  # [K*B, 1, 1, 512]
    time_ids: torch.Tensor  # [K*B, 6]
    branches: int = 2

    @property
    def samples(self) -> int:
        return self.text.shape[0] // self.branches

    def tensors(self) -> list[torch.Tensor]:
        return [self.text, self.pooled, self.time_ids, self.ids]

    def take(self, start: int, end: int) -> "Conditioning":
        """Samples ``start:end`` of every branch."""
        return self.select(range(start, end))

    def select(self, samples) -> "Conditioning":
        """The given samples (indices) of every branch, in that order."""
        b, idx = self.samples, torch.as_tensor(list(samples), dtype=torch.long)
        rows = torch.cat([k * b + idx for k in range(self.branches)]).to(self.text.device)
        return Conditioning(self.text[rows], self.pooled[rows], self.ids[rows], self.time_ids[rows], self.branches)

    def repeat(self, m: int) -> "Conditioning":
        """A one-sample conditioning for M samples: rows [branch 0 x M ; branch 1 x M ; ...]."""
        def rep(t):
            return torch.cat([t[k:k + 1].expand(m, *t.shape[1:]) for k in range(self.branches)])

        return Conditioning(rep(self.text), rep(self.pooled), rep(self.ids), rep(self.time_ids), self.branches)


class ConditioningBuilder:
    """Builds ``Conditioning`` rows with the pipeline's text encoders; prompts are encoded once and cached."""

    def __init__(self, pipe, device: torch.device, dtype: torch.dtype):
        self.pipe, self.device, self.dtype = pipe, device, dtype
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode_texts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
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

    def texts_or_zeros(self, prompts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt encoded; None or blank: zeros (SDXL's ``force_zeros_for_empty_prompt``)."""
        ref_e, ref_p = self.encode_texts([""])
        embs, pools = [], []
        for p in prompts:
            if p is None or not p.strip():
                embs.append(torch.zeros_like(ref_e))
                pools.append(torch.zeros_like(ref_p))
            else:
                e, q = self.encode_texts([p])
                embs.append(e)
                pools.append(q)
        return torch.cat(embs), torch.cat(pools)

    def time_ids(self, n: int, size: tuple[int, int]) -> torch.Tensor:
        """SDXL micro-conditioning: original and target size = crop size, crop top-left (0, 0)."""
        h, w = size
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
        return ids.repeat(n, 1)

    def identities(self, ids: torch.Tensor | None, b: int) -> torch.Tensor:
        """[B, 1, 1, 512] identity rows on the device; None: zeros (the null identity)."""
        if ids is None:
            return torch.zeros(b, 1, 1, ID_DIM, dtype=self.dtype, device=self.device)
        return ids.to(self.device, self.dtype).view(b, 1, 1, ID_DIM)

    def build(self, neg_prompts: list[str | None], ids: torch.Tensor | None, size: tuple[int, int],
              pseudonyms: torch.Tensor | None = None) -> Conditioning:
        """Rows [negative ; positive], and [; pseudonym] with ``pseudonyms``. Negative: ``neg_prompts`` encoded
        (None -> zeros), zero identity. Positive: ``""`` encoded, identity ``ids`` [B, 512] (None -> zeros: the null
        identity). Pseudonym (ALGORITHM.md, "Pseudonyms"): the negative branch's text with identity ``pseudonyms``
        [B, 512], so that its difference to the negative branch is the identity alone."""
        b = len(neg_prompts)
        neg_e, neg_p = self.texts_or_zeros(neg_prompts)
        pos_e, pos_p = self.encode_texts([""] * b)
        text, pooled = [neg_e, pos_e], [neg_p, pos_p]
        identities = [self.identities(None, b), self.identities(ids, b)]
        if pseudonyms is not None:
            text, pooled = text + [neg_e], pooled + [neg_p]
            identities.append(self.identities(pseudonyms, b))
        k = len(text)
        return Conditioning(text=torch.cat(text), pooled=torch.cat(pooled), ids=torch.cat(identities),
                            time_ids=self.time_ids(k * b, size), branches=k)
