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
from concurrent.futures import Future, ThreadPoolExecutor

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


def _may_carry_device_fault(exc: BaseException) -> bool:
    """Whether ``exc``'s type is one a device error arrives as: torch's (RuntimeError and its subclasses, such as
    torch.AcceleratorError; dlib's CUDA errors are RuntimeErrors too) or onnxruntime's own error types. Only these
    are read for the markers: a ValueError or an OSError is never a device fault, whatever text (a path, a table
    cell) its message holds."""
    return isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime")


def is_device_fault(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the device is gone: by type first (a
    ``DeviceFault`` is one; out-of-memory never is: it is retried one face at a time), then, for the types a device
    error arrives as, by the CUDA markers in its whole message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DeviceFault):
            return True
        msg = str(exc).lower()
        oom = type(exc).__name__ == "OutOfMemoryError" or "out of memory" in msg or "alloc_failed" in msg
        if not oom and _may_carry_device_fault(exc) and any(m in msg for m in _DEVICE_FAULT_MARKERS):
            return True
        exc = exc.__cause__
    return False


def raise_if_device_fault(exc: BaseException) -> None:
    if isinstance(exc, DeviceFault):
        raise exc
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
            from .diffusion import ReversePersonalizer
            from .faces.arcface import IdentityEmbedder
            from .scoring import ReidScorer, gate_model_dir

            self.rp = ReversePersonalizer.from_config(cfg.diffusion, face_size=cfg.alignment.face_size)
            self.embedder = IdentityEmbedder.from_config(cfg.diffusion)
            self.scorer = ReidScorer(cfg.privacy, model_dir=gate_model_dir(cfg)) if cfg.privacy.escalate else None
            # Background threads overlapping the device's work: one draws the next chunk's noise, one makes
            # re-ID descriptors (one thread: dlib's recognizer is not safe to call from two at once).
            self.noise_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anonymizer-noise")
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anonymizer-reid")
        size = cfg.anonymizer.face_batch_size
        if size == "auto":  # on CUDA the probe's UNet batch; the CPU gains little from larger batches
            size = self.rp.batch_size if self.rp is not None and self.rp.device.type == "cuda" else 4
        self.face_batch_size = int(size)

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
            elif f.low_confidence and self.method == "reverse_personalization":
                self._fallback(f, f"low-confidence detection (score {f.det_score:.2f} below detection.generate_above="
                                  f"{self.cfg.detection.generate_above}, one member): no GPU generation")
            else:
                primary.append(f)
        if self.method == "reverse_personalization":
            try:
                self._reverse_personalize(primary)
            except Exception as exc:  # noqa: BLE001 - a device fault anywhere on this path must restart the actor
                raise_if_device_fault(exc)
                raise
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
        """All faces through rung 0 in chunks of ``face_batch_size``; the faces still re-identified after a
        rung are pooled across chunks into full chunks for the next, stronger rung (issue 13: escalation
        tails do not run as small batches). CPU work stays off the device's path: the ArcFace embedding is
        made by the detection stage, the next chunk's noise is drawn and each generated face's re-ID check
        runs in a background thread while the device works on the following chunk."""
        ready = []
        for f in faces:
            if f.id_embedding is None:  # the detection stage could not embed it: try here
                try:
                    f.id_embedding = self.embedder.embed(f.crop, f.kps5)
                except Exception as exc:  # noqa: BLE001
                    raise_if_device_fault(exc)
                    self._fallback(f, f"identity embedding failed: {_err(exc)}")
                    continue
            f.tries, f.tries_json, f.t_anonymize_s = 0, "[]", 0.0
            ready.append(f)
        privacy, d = self.cfg.privacy, self.cfg.diffusion
        ladder = [d.guidance_scale] + list(privacy.guidance_ladder)
        tries = privacy.max_tries if self.scorer is not None else 1
        originals: dict[int, Future] = {}  # id(face) -> descriptor of its input crop, computed once
        if self.scorer is not None:  # queued now: made while the device runs the first chunk
            originals = {id(f): self.pool.submit(self.scorer.descriptor, f.crop, f.face_box) for f in ready}
        pending = ready
        for attempt in range(tries):
            g = ladder[attempt]
            checks = self._run_rung(pending, g, originals)
            still = []
            for f, out, check in checks:
                dist, err = None, None
                if check is not None:
                    try:
                        dist = self.scorer.distance(originals[id(f)].result(), check.result())
                        if not np.isfinite(dist):  # no descriptor: a check that could not run counts as failed
                            err = "re-identification check could not run: no face descriptor in the crop"
                    except Exception as exc:  # noqa: BLE001 - a face we could not verify is not kept as it is
                        err = f"re-identification check failed: {_err(exc)}"
                tries_list = json.loads(f.tries_json) + [{"guidance": g, "reid_distance": _finite(dist)}]
                f.tries, f.tries_json = len(tries_list), json.dumps(tries_list)
                f.anon_crop, f.guidance_final, f.method_applied = out, g, "reverse_personalization"
                f.unet_evals = self.rp.unet_evals_per_face(tries=f.tries)
                if err is not None:
                    self._fallback(f, err)
                elif dist is not None and dist < privacy.reid_threshold:
                    still.append(f)
            pending = still
            if not pending:
                break
        for f in pending:
            if privacy.fallback_if_reidentified:
                self._fallback(f, f"still re-identified after {f.tries} tries (last guidance {f.guidance_final})")

    def _run_rung(self, faces: list[Face], g: float, originals: dict) -> list[tuple[Face, np.ndarray, "Future | None"]]:
        """One rung (inversion and generation at guidance ``g``) for ``faces`` in full chunks. Returns
        (face, generated crop, future of its anonymized descriptor or None) for the faces that were generated;
        faces whose generation failed have fallen back already."""
        n = self.face_batch_size
        chunks = [faces[i:i + n] for i in range(0, len(faces), n)]
        shape = self.rp.latent_shape(faces[0].crop.shape[:2]) if faces else None
        def draw(chunk):
            return self.noise_pool.submit(self.rp.draw_noise, [int(f.seed) for f in chunk], shape)

        noise_next = draw(chunks[0]) if chunks else None
        done = []
        for k, chunk in enumerate(chunks):
            noise = noise_next.result()
            if k + 1 < len(chunks):  # drawn on the CPU while the device runs this chunk
                noise_next = draw(chunks[k + 1])
            t0 = time.perf_counter()
            outs = self._generate_chunk(chunk, g, noise)
            per_face = (time.perf_counter() - t0) / len(chunk)
            for f, out in zip(chunk, outs):
                f.t_anonymize_s = (f.t_anonymize_s or 0.0) + per_face
                if out is None:
                    continue
                check = None
                if self.scorer is not None:  # same recognizer as the final check, on the aligned crops
                    check = self.pool.submit(self.scorer.descriptor, out, f.face_box)
                done.append((f, out, check))
        return done

    def _generate_chunk(self, chunk: list[Face], g: float, noise) -> list[np.ndarray | None]:
        """Invert and generate ``chunk`` at guidance ``g``; on an error, retry one face at a time so one bad face
        cannot sink the others (an out-of-memory batch too). A face that fails alone falls back (None)."""
        try:
            return self._invert_generate(chunk, g, noise)
        except Exception as exc:  # noqa: BLE001
            raise_if_device_fault(exc)
            if len(chunk) == 1:
                self._fallback(chunk[0], f"generation failed: {_err(exc)}")
                return [None]
        outs = []
        for j, f in enumerate(chunk):
            try:
                outs.append(self._invert_generate([f], g, noise[:, j:j + 1]))
                outs[-1] = outs[-1][0]
            except Exception as exc1:  # noqa: BLE001
                raise_if_device_fault(exc1)
                self._fallback(f, f"generation failed: {_err(exc1)}")
                outs.append(None)
        return outs

    def _invert_generate(self, chunk: list[Face], g: float, noise) -> list[np.ndarray]:
        # Each rung is the method run at its own g: its inversion's noise maps belong to that g
        # (ALGORITHM.md, "Stronger guidance"). Faces with different prompts share the calls.
        gs = [g] * len(chunk)
        inv = self.rp.invert([f.crop for f in chunk], [int(f.seed) for f in chunk], gs, noise=noise)
        ids = np.stack([f.id_embedding for f in chunk]).astype(np.float32)
        return self.rp.generate(inv, ids, [f.prompt for f in chunk], gs)
