"""Reverse personalization with the privacy ladder: each face is inverted and regenerated with negative identity
guidance (``diffusion.ReversePersonalizer``), checked against an independent recognizer, and a face still
re-identified runs again at the next, stronger guidance of ``privacy.guidance_ladder`` (inversion and generation at
that guidance, same seed: ALGORITHM.md, "Stronger guidance"); after ``privacy.max_tries`` it falls back to the
destructive method.

Batched for the device: all faces go through a rung in chunks of ``face_batch_size``, and the faces still
re-identified after a rung are pooled across chunks into full chunks for the next one. CPU work stays off the
device's path: the identity embedding comes from the detection stage, and the next chunk's noise and each
generated face's re-ID descriptor are made in background threads while the device works.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..faults import describe, raise_if_device_fault
from ..pseudonyms import embeddings
from ..records import REVERSE_PERSONALIZATION, Applied, Face, Try
from .contract import Fallback
from .settings import AnonymizerSettings


def _finite(x: float | None) -> float | None:
    """JSON-safe distance: inf (no face found to compare) becomes None."""
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


class ReversePersonalization:
    name = REVERSE_PERSONALIZATION

    def __init__(self, settings: AnonymizerSettings):
        from ..diffusion import ReversePersonalizer
        from ..faces.arcface import IdentityEmbedder
        from ..scoring import ReidScorer, gate_model_dir

        self.rp = ReversePersonalizer.from_config(settings.diffusion, face_size=settings.alignment.face_size)
        self.embedder = IdentityEmbedder.from_config(settings.diffusion)
        privacy = settings.privacy
        self.scorer = ReidScorer(privacy, model_dir=gate_model_dir(settings)) if privacy.escalate else None
        # One thread draws the next chunk's noise, one makes re-ID descriptors (dlib's recognizer is not safe to
        # call from two threads at once).
        self.noise_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anonymizer-noise")
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anonymizer-reid")
        size = settings.anonymizer.face_batch_size
        if size == "auto":  # on CUDA the probe's UNet batch; the CPU gains little from larger batches
            size = self.rp.batch_size if self.rp.device.type == "cuda" else 4
        self.face_batch_size = int(size)
        self.pseudonym_scale = settings.pseudonyms.scale  # h of the faces that have a subject (ALGORITHM.md)

    def params(self, settings: AnonymizerSettings) -> dict:
        d, privacy = settings.diffusion, settings.privacy
        return {
            "skip": d.skip, "num_inversion_steps": d.num_inversion_steps, "guidance_scale": d.guidance_scale,
            "ip_adapter_scale": d.ip_adapter_scale, "id_emb_scale": d.id_emb_scale,
            "attribute_prompt": d.attribute_prompt, "seed_mode": d.seed_mode, "face_size": settings.alignment.face_size,
            "guidance_ladder": privacy.guidance_ladder if privacy.escalate else [],
            "max_tries": privacy.max_tries if privacy.escalate else 1,
            "reid_threshold": privacy.reid_threshold,
        } | ({"pseudonym_scale": settings.pseudonyms.scale} if settings.pseudonyms.table else {})

    def model_info(self) -> dict | None:
        return self.rp.model_info

    def anonymize(self, faces: list[Face], settings: AnonymizerSettings, fallback: Fallback) -> None:
        try:
            self._ladder(faces, settings, fallback)
        except Exception as exc:  # noqa: BLE001 - a device fault anywhere on this path must restart the actor
            raise_if_device_fault(exc)
            raise

    def _ladder(self, faces: list[Face], settings: AnonymizerSettings, fallback: Fallback) -> None:
        ready = []
        for f in faces:
            if f.id_embedding is None:  # the detection stage could not embed it: try here
                try:
                    f.id_embedding = self.embedder.embed(f.crop, f.kps5)
                except Exception as exc:  # noqa: BLE001
                    raise_if_device_fault(exc)
                    fallback(f, f"identity embedding failed: {describe(exc)}")
                    continue
            f.tries, f.t_anonymize_s = [], 0.0
            ready.append(f)
        privacy, d = settings.privacy, settings.diffusion
        ladder = [d.guidance_scale] + list(privacy.guidance_ladder)
        tries = privacy.max_tries if self.scorer is not None else 1
        originals: dict[int, Future] = {}  # id(face) -> descriptor of its input crop, computed once
        if self.scorer is not None:  # queued now: made while the device runs the first chunk
            originals = {id(f): self.pool.submit(self.scorer.descriptor, f.crop, f.face_box) for f in ready}
        pending = ready
        for attempt in range(tries):
            pending = self._rung(pending, ladder[attempt], originals, privacy.reid_threshold, fallback)
            if not pending:
                break
        for f in pending:
            if privacy.fallback_if_reidentified:
                fallback(f, f"still re-identified after {len(f.tries)} tries (last guidance {f.guidance_final})")

    def _rung(self, faces: list[Face], g: float, originals: dict, threshold: float, fallback: Fallback) -> list[Face]:
        """One rung for ``faces``; returns those still re-identified."""
        still = []
        for f, out, check in self._generate_rung(faces, g, fallback):
            dist, err = None, None
            if check is not None:
                try:
                    dist = self.scorer.distance(originals[id(f)].result(), check.result())
                    if not np.isfinite(dist):  # no descriptor: a check that could not run counts as failed
                        err = "re-identification check could not run: no face descriptor in the crop"
                except Exception as exc:  # noqa: BLE001 - a face we could not verify is not kept as it is
                    err = f"re-identification check failed: {describe(exc)}"
            f.tries.append(Try(guidance=g, reid_distance=_finite(dist)))
            f.anon_crop, f.guidance_final, f.method_applied = out, g, Applied(REVERSE_PERSONALIZATION)
            f.unet_evals = self.rp.unet_evals_per_face(tries=len(f.tries), pseudonym=self._h(f) > 0)
            if err is not None:
                fallback(f, err)
            elif dist is not None and dist < threshold:
                still.append(f)
        return still

    def _generate_rung(self, faces: list[Face], g: float, fallback: Fallback):
        """Inversion and generation at guidance ``g`` for ``faces`` in full chunks. Returns (face, generated crop,
        future of its anonymized descriptor or None) for the faces that were generated; faces whose generation
        failed have fallen back already."""
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
            outs = self._generate_chunk(chunk, g, noise, fallback)
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

    def _generate_chunk(self, chunk: list[Face], g: float, noise, fallback: Fallback) -> list[np.ndarray | None]:
        """Invert and generate ``chunk`` at guidance ``g``; on an error, retry one face at a time so one bad face
        cannot sink the others (an out-of-memory batch too). A face that fails alone falls back (None)."""
        try:
            return self._invert_generate(chunk, g, noise)
        except Exception as exc:  # noqa: BLE001
            raise_if_device_fault(exc)
            if len(chunk) == 1:
                fallback(chunk[0], f"generation failed: {describe(exc)}")
                return [None]
        outs = []
        for j, f in enumerate(chunk):
            try:
                outs.append(self._invert_generate([f], g, noise[:, j:j + 1])[0])
            except Exception as exc1:  # noqa: BLE001
                raise_if_device_fault(exc1)
                fallback(f, f"generation failed: {describe(exc1)}")
                outs.append(None)
        return outs

    def _invert_generate(self, chunk: list[Face], g: float, noise) -> list[np.ndarray]:
        # Each rung is the method run at its own g: its inversion's noise maps belong to that g
        # (ALGORITHM.md, "Stronger guidance"), and keeps h. Faces with different prompts and subjects share the calls.
        gs = [g] * len(chunk)
        inv = self.rp.invert([f.crop for f in chunk], [int(f.seed) for f in chunk], gs, noise=noise)
        ids = np.stack([f.id_embedding for f in chunk]).astype(np.float32)
        hs = [self._h(f) for f in chunk]
        ps = embeddings([f.pseudonym if h > 0 else None for f, h in zip(chunk, hs)])[0] if any(hs) else None
        return self.rp.generate(inv, ids, [f.prompt for f in chunk], gs, pseudonyms=ps, pseudonym_scales=hs)

    def _h(self, f: Face) -> float:
        """The pseudonym guidance of a face: h for a face with a subject, 0 (the plain method) without one."""
        return self.pseudonym_scale if f.pseudonym else 0.0
