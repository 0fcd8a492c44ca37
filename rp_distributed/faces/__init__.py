"""Face detection, landmarks and alignment behind one small interface.

A backend turns an RGB uint8 image into ``DetectedFace`` records (image pixel coordinates).
``align`` maps any backend's landmarks (68 or 5 points) to the reference "whole face" framing, so crops
agree across backends. The pipeline only calls ``build_detector(cfg).detect(image)`` and ``align``.
"""

from __future__ import annotations

from .types import DetectedFace, FaceDetector

__all__ = ["DetectedFace", "FaceDetector", "build_detector"]


def build_detector(cfg) -> FaceDetector:
    """The backend named by ``cfg.backend`` (a ``DetectionConfig``), built once per actor."""
    from .registry import build

    return build(cfg)
