"""Face detector backends behind ``build(cfg)``, with the post-processing they all share.

Every backend turns an RGB uint8 image into ``DetectedFace`` records in image pixels. The shared part
(``BaseDetector.detect``) validates the image, drops faces scoring below ``cfg.threshold``, sorts
largest first and keeps ``cfg.max_faces``. Backends load their weights from a local folder only and
never download: a missing folder or file raises ``ModelFilesMissing`` naming the folder and backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from . import DetectedFace


class ModelFilesMissing(FileNotFoundError):
    """A backend's weights folder or one of its files is not there (nothing is ever downloaded)."""

    def __init__(self, backend: str, folder: str | os.PathLike | None, missing: Iterable[str], hint: str = ""):
        self.backend = backend
        self.folder = str(folder) if folder is not None else None
        self.missing = list(missing)
        where = f"folder {self.folder}" if self.folder else "no folder configured"
        if self.folder and not Path(self.folder).is_dir():
            what = "does not exist (needs " + ", ".join(self.missing) + ")"
        else:
            what = "lacks " + ", ".join(self.missing)
        msg = f"{backend} backend: model {where} {what}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """A C-contiguous HxWx3 uint8 view of ``image`` (gray is stacked, an alpha channel dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def make_face(box, score: float, landmarks, image_shape: tuple[int, ...] | None = None) -> DetectedFace:
    """A ``DetectedFace`` with float32 arrays; the box is clipped to the image when its shape is given."""
    box = np.asarray(box, dtype=np.float32).reshape(4).copy()
    if image_shape is not None:
        h, w = image_shape[:2]
        box[[0, 2]] = np.clip(box[[0, 2]], 0, w)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, h)
    lm = np.asarray(landmarks, dtype=np.float32).reshape(-1, 2)
    return DetectedFace(box=box, score=float(score), landmarks=lm)


def postprocess(faces: list[DetectedFace], threshold: float, max_faces: int) -> list[DetectedFace]:
    """Drop faces scoring below ``threshold`` or with an empty box, sort largest first, keep ``max_faces``."""
    kept = [
        f for f in faces if f.score >= threshold and f.box[2] > f.box[0] and f.box[3] > f.box[1]
    ]
    kept.sort(key=lambda f: (-f.size, -f.score))
    return kept[:max_faces]


class BaseDetector:
    """Shared ``detect``: subclasses implement ``_detect(rgb) -> list[DetectedFace]``."""

    name = "base"

    def __init__(self, cfg):
        self.cfg = cfg

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:  # pragma: no cover - abstract
        raise NotImplementedError

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces in an RGB uint8 HxWx3 image, largest first."""
        image = as_rgb_uint8(image)
        if image.shape[0] == 0 or image.shape[1] == 0:
            return []
        return postprocess(self._detect(image), self.cfg.threshold, self.cfg.max_faces)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.cfg.model!r}, model_dir={self.cfg.model_dir!r})"


def build(cfg) -> "BaseDetector":
    """The backend named by ``cfg.backend`` (a ``DetectionConfig``)."""
    backend = cfg.backend
    if backend == "dlib":
        from .dlib_backend import DlibDetector

        return DlibDetector(cfg)
    if backend == "insightface":
        from .insightface_backend import InsightFaceDetector

        return InsightFaceDetector(cfg)
    if backend == "face_alignment":
        from .face_alignment_backend import FaceAlignmentDetector

        return FaceAlignmentDetector(cfg)
    raise ValueError(f"detection.backend: unknown face detection backend {backend!r}")
