"""``build(cfg)``: the detector named by ``cfg.backend`` (a ``DetectionConfig``), by a registry of loaders
(imported only when chosen: each backend pulls in its own heavy libraries)."""

from __future__ import annotations

import importlib

# backend name -> (module, class); every class takes the DetectionConfig.
BACKENDS: dict[str, tuple[str, str]] = {
    "dlib": ("dlib_backend", "DlibDetector"),
    "insightface": ("insightface_backend", "InsightFaceDetector"),
    "face_alignment": ("face_alignment_backend", "FaceAlignmentDetector"),
    "centerface": ("centerface_backend", "CenterFaceDetector"),
    "mtcnn": ("mtcnn_backend", "MTCNNDetector"),
    "ensemble": ("ensemble", "EnsembleDetector"),
}


def build(cfg):
    """The backend named by ``cfg.backend``, built once per actor."""
    try:
        module, name = BACKENDS[cfg.backend]
    except KeyError:
        raise ValueError(f"detection.backend: unknown face detection backend {cfg.backend!r}") from None
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)(cfg)
