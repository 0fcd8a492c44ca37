"""The anonymizer: turns aligned face crops into anonymized crops, fail closed.

Methods: ``blur``, ``pixelate``, ``mask`` (destructive) and ``reverse_personalization`` (diffusion
inversion + negative identity guidance). For reverse personalization each face is checked against an
independent recognizer; a face still re-identified is run again at the next, stronger guidance of
``privacy.guidance_ladder`` (inversion and generation at that guidance, same seed), and after
``privacy.max_tries`` falls back to the destructive method. Any failure on a face also falls back, and
the face record says why. A ``records.Face`` leaves this stage with ``anon_crop`` set, or with
``face_error`` set and no crop (then the merge stage applies the destructive method on the image).
"""

from __future__ import annotations

import json
import time

import numpy as np

from . import compose
from .config import JobConfig
from .records import Face


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class DeviceFault(RuntimeError):
    """The accelerator is gone or corrupted (illegal address, ECC error, lost device). Every later face on
    this process would fail too, or fall back to blur unnoticed: the actor must end so Ray restarts it."""


# Messages of CUDA errors after which a process cannot use its device again (torch, cuBLAS/cuDNN,
# onnxruntime's CUDA provider). Out-of-memory is not one of them: it is retried one face at a time.
_DEVICE_FAULT_MARKERS = ("cuda error", "cuda failure", "cublas_status_execution_failed",
                         "cublas_status_internal_error", "cudnn_status_execution_failed",
                         "cudnn_status_internal_error", "cudnn_status_mapping_error", "cudaerror",
                         "illegal memory access", "device-side assert", "ecc error", "unspecified launch failure",
                         "misaligned address", "device lost", "no cuda-capable device", "nccl error")


def is_device_fault(exc: BaseException) -> bool:
    msg = str(exc).lower()
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in msg or "alloc_failed" in msg:
        return False
    return any(m in msg for m in _DEVICE_FAULT_MARKERS)


def raise_if_device_fault(exc: BaseException) -> None:
    if is_device_fault(exc):
        raise DeviceFault(f"device fault, this worker must restart: {_err(exc)}") from exc


def _finite(x: float | None) -> float | None:
    """JSON-safe distance: inf (no face found to compare) becomes None."""
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


class Anonymizer:
    """Built once per actor; ``__call__`` anonymizes a list of face records in place."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.acfg = cfg.anonymizer
        self.method = cfg.anonymizer.method
        self.rp = self.embedder = self.scorer = None
        if self.method == "reverse_personalization":
            from .diffusion import IdentityEmbedder, ReversePersonalizer
            from .scoring import ReidScorer

            self.rp = ReversePersonalizer.from_config(cfg.diffusion)
            self.embedder = IdentityEmbedder.from_config(cfg.diffusion)
            self.scorer = ReidScorer(cfg.privacy) if cfg.privacy.escalate else None

    # -- manifest fields ---------------------------------------------------------------------------------
    def params(self) -> str:
        if self.method != "reverse_personalization":
            a = self.acfg
            p = {"blur": {"blur_strength": a.blur_strength}, "pixelate": {"pixelate_blocks": a.pixelate_blocks},
                 "mask": {"mask_color": list(a.mask_color)}}[self.method]
            return json.dumps(p)
        d = self.cfg.diffusion
        return json.dumps({
            "skip": d.skip, "num_inversion_steps": d.num_inversion_steps, "guidance_scale": d.guidance_scale,
            "ip_adapter_scale": d.ip_adapter_scale, "id_emb_scale": d.id_emb_scale,
            "attribute_prompt": d.attribute_prompt, "seed_mode": d.seed_mode, "face_size": self.cfg.alignment.face_size,
            "guidance_ladder": self.cfg.privacy.guidance_ladder if self.cfg.privacy.escalate else [],
            "max_tries": self.cfg.privacy.max_tries if self.cfg.privacy.escalate else 1,
            "reid_threshold": self.cfg.privacy.reid_threshold,
        })

    def model_info(self) -> str | None:
        return json.dumps(self.rp.model_info) if self.rp is not None else None

    # -- the stage ---------------------------------------------------------------------------------------
    def __call__(self, faces: list[Face]) -> None:
        params, model = self.params(), self.model_info()
        for f in faces:
            f.method, f.params, f.model = self.method, params, model
        primary = []
        for f in faces:
            if f.over_budget:
                f.add_error(f"beyond detection.max_faces={self.cfg.detection.max_faces} (largest first): "
                            f"{self.acfg.fallback} on the image box")
            elif f.align_error:
                f.add_error(f.align_error)
            elif f.small and self.method == "reverse_personalization":
                self._fallback(f, f"face smaller than detection.min_face_size={self.cfg.detection.min_face_size}px")
            else:
                primary.append(f)
        if self.method == "reverse_personalization":
            self._reverse_personalize(primary)
        else:
            for f in primary:
                t0 = time.perf_counter()
                try:
                    f.anon_crop = compose.destroy(self.method, f.crop, f.face_box, self.acfg)
                    f.method_applied = self.method
                except Exception as exc:  # noqa: BLE001 - any failure must fall back
                    self._fallback(f, _err(exc))
                f.t_anonymize_s = time.perf_counter() - t0

    def _fallback(self, f: Face, reason: str) -> None:
        """Destructive method on the crop; if even that fails, leave no crop (merge blurs the image box)."""
        f.add_error(reason)
        try:
            f.anon_crop = compose.destroy(self.acfg.fallback, f.crop, f.face_box, self.acfg)
            f.method_applied = self.acfg.fallback
        except Exception as exc:  # noqa: BLE001
            f.anon_crop = None
            f.add_error(f"fallback failed: {_err(exc)}")

    # -- reverse personalization ---------------------------------------------------------------------------
    def _reverse_personalize(self, faces: list[Face]) -> None:
        ready, ids = [], []
        for f in faces:
            try:
                ids.append(self.embedder.embed(f.crop, f.kps5))
                ready.append(f)
            except Exception as exc:  # noqa: BLE001
                raise_if_device_fault(exc)
                self._fallback(f, f"identity embedding failed: {_err(exc)}")
        n = self.acfg.face_batch_size
        for start in range(0, len(ready), n):
            chunk, chunk_ids = ready[start:start + n], ids[start:start + n]
            t0 = time.perf_counter()
            try:
                self._generate_chunk(chunk, chunk_ids)
            except Exception as exc:  # noqa: BLE001 - retry one by one so one bad face cannot sink others
                raise_if_device_fault(exc)
                if len(chunk) == 1:
                    self._fallback(chunk[0], f"generation failed: {_err(exc)}")
                else:
                    for f, emb in zip(chunk, chunk_ids):
                        try:
                            self._generate_chunk([f], [emb])
                        except Exception as exc1:  # noqa: BLE001
                            raise_if_device_fault(exc1)
                            self._fallback(f, f"generation failed: {_err(exc1)}")
            per_face = (time.perf_counter() - t0) / len(chunk)
            for f in chunk:
                f.t_anonymize_s = per_face

    def _generate_chunk(self, chunk: list[Face], id_embeddings: list[np.ndarray]) -> None:
        privacy, d = self.cfg.privacy, self.cfg.diffusion
        crops = [f.crop for f in chunk]
        ids = np.stack(id_embeddings).astype(np.float32)
        prompts = [f.prompt for f in chunk]
        seeds = [int(f.seed) for f in chunk]
        ladder = [d.guidance_scale] + list(privacy.guidance_ladder)
        tries = privacy.max_tries if self.scorer is not None else 1
        results: list[dict] = [{"tries": []} for _ in chunk]
        pending = list(range(len(chunk)))
        for attempt in range(tries):
            # Each rung is the method run at its own g: its inversion's noise maps belong to that g
            # (ALGORITHM.md, "Stronger guidance"). The faces escalating together share both calls.
            g = [ladder[attempt]] * len(pending)
            inv = self.rp.invert([crops[i] for i in pending], [seeds[i] for i in pending], g)
            outs = self.rp.generate(inv, ids[pending], [prompts[i] for i in pending], g)
            g = g[0]
            still = []
            for i, out in zip(pending, outs):
                dist = None
                if self.scorer is not None:  # same recognizer as the final check, on the aligned crops
                    dist = self.scorer.compare(crops[i], out, chunk[i].face_box).distance
                results[i]["tries"].append({"guidance": g, "reid_distance": _finite(dist)})
                results[i]["crop"], results[i]["guidance"] = out, g
                if dist is not None and dist < privacy.reid_threshold:
                    still.append(i)
            pending = still
            if not pending:
                break
        for f, r in zip(chunk, results):
            f.tries = len(r["tries"])
            f.tries_json = json.dumps(r["tries"])
            f.guidance_final = r["guidance"]
            f.unet_evals = self.rp.unet_evals_per_face(tries=f.tries)
            f.anon_crop = r["crop"]
            f.method_applied = "reverse_personalization"
        for i in pending:
            if privacy.fallback_if_reidentified:
                self._fallback(chunk[i], f"still re-identified after {chunk[i].tries} tries "
                                         f"(last guidance {chunk[i].guidance_final})")
