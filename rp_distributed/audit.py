"""The output audit: a second look for faces on the image about to be written (merge stage).

The first pass (``detection``) decides which faces are anonymized; a face it missed would be exported untouched.
So after paste-back and the re-ID checks, ``OutputAudit`` runs a detector pass *other* than the first one
(``merge.audit.passes``: by default CenterFace at another magnification, 1.5x) on the written
pixels. A detection that is none of the anonymized faces (``is_anonymized``: less than ``merge.audit.covered`` of
it inside an anonymized face's box, and not centred in one at about its size) is a face the first pass missed:
``anonymizer.fallback`` destroys it in the image, and it becomes a face of its own (``records.Face`` with
``audit=True``; a manifest row with ``detector: audit``, its box, ``found_by`` and ``method_applied``), counted in
the summary as "faces the first pass missed".

Faces the first pass found, anonymized by generation, are still faces: the audit sees them again, inside their
boxes, and leaves them alone. A failing audit withholds the image (we cannot say it holds no missed face).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .destructive import destroy_box
from .faults import describe
from .records import Applied, Face, Where

AUDIT_GROW = 0.3  # an anonymized box counts this much larger a side: what the fallback destroys (destroy_box's margin)
# and about where paste-back's ellipse and feather reach


def is_anonymized(box: np.ndarray, anonymized: list[np.ndarray], covered: float) -> bool:
    """Whether a detection is a face we anonymized: ``covered`` of it lies inside an anonymized box, or its centre
    does and it is about that face's size (detectors frame a face differently: dlib's box is eyes-to-lip, while a
    blurred head seen by CenterFace is a larger box around it). A smaller face beside a big one is not that face."""
    if covered_fraction(box, anonymized) >= covered:
        return True
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    for a in anonymized:
        ax0, ay0, ax1, ay1 = (float(v) for v in a)
        gx, gy, aside = AUDIT_GROW * (ax1 - ax0), AUDIT_GROW * (ay1 - ay0), max(ax1 - ax0, ay1 - ay0, 1e-6)
        if ax0 - gx <= cx <= ax1 + gx and ay0 - gy <= cy <= ay1 + gy and 0.5 <= side / aside <= 3.0:
            return True
    return False


def covered_fraction(box: np.ndarray, anonymized: list[np.ndarray]) -> float:
    """The largest fraction of ``box`` lying inside one of the ``anonymized`` boxes (each grown AUDIT_GROW a side)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    if area <= 0:
        return 1.0
    best = 0.0
    for a in anonymized:
        ax0, ay0, ax1, ay1 = (float(v) for v in a)
        gx, gy = AUDIT_GROW * (ax1 - ax0), AUDIT_GROW * (ay1 - ay0)
        iw = max(0.0, min(x1, ax1 + gx) - max(x0, ax0 - gx))
        ih = max(0.0, min(y1, ay1 + gy) - max(y0, ay0 - gy))
        best = max(best, iw * ih / area)
    return best


@dataclass
class AuditOutcome:
    faces: list[Face] = field(default_factory=list)  # the faces the first pass missed, anonymized in the image
    seconds: float = 0.0
    withheld: str | None = None  # the audit could not run: the image must not be written


class OutputAudit:
    """Built once per merge actor from its settings (``merge.audit``, ``anonymizer``, ``detection``)."""

    def __init__(self, cfg):
        from .faces.ensemble import EnsembleDetector

        self.cfg = cfg.merge.audit
        self.anon = cfg.anonymizer
        self.detector = EnsembleDetector(cfg.detection, passes=self.cfg.passes, max_pass_px=self.cfg.max_pass_px,
                                         providers=self.cfg.providers)
        self.label = "audit: " + "; ".join(
            f"{p.member}@{p.scale:g}x rot {'/'.join(f'{a:g}' for a in p.rotations)}" for p in self.cfg.passes)

    def __call__(self, image: np.ndarray, faces: list[Face]) -> AuditOutcome:
        """Look for faces outside ``faces``' boxes in ``image`` (the pixels about to be written) and destroy each
        one found there, in place."""
        t0 = time.perf_counter()
        out = AuditOutcome()
        try:
            found = self.detector.detect(image)
        except Exception as exc:  # noqa: BLE001 - fail closed: unaudited pixels are not written
            out.withheld = f"output audit failed: {describe(exc)}"
            out.seconds = time.perf_counter() - t0
            return out
        anonymized = [f.box for f in faces]
        index = len(faces)
        for d in found:
            if is_anonymized(d.box, anonymized, self.cfg.covered):
                continue
            face = Face(face_index=index, box=np.asarray(d.box, np.float32), det_score=float(d.score),
                        landmarks=np.asarray(d.landmarks, np.float32), seed=0, audit=True,
                        found_by=f"{self.label} ({'; '.join(d.found_by)})", method=self.anon.fallback)
            face.add_error("missed by the first detection pass: found on the output by the audit")
            try:
                destroy_box(image, face.box, self.anon.fallback, self.anon, out=image)
                face.method_applied = Applied(self.anon.fallback, Where.AUDIT)
            except Exception as exc:  # noqa: BLE001
                out.withheld = f"audit face {index} could not be anonymized: {describe(exc)}"[:500]
            anonymized.append(face.box)  # one face, one row: its other detections are now inside
            out.faces.append(face)
            index += 1
        out.seconds = time.perf_counter() - t0
        return out
