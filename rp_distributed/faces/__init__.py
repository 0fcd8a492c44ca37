"""Face detection, landmarks and alignment behind one small interface.

A backend turns an RGB uint8 image into ``DetectedFace`` records (image pixel coordinates).
``align`` maps any backend's landmarks (68 or 5 points) to the reference "whole face" framing, so crops
agree across backends. The pipeline only calls ``build_detector(cfg).detect(image)`` and ``align``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class DetectedFace:
    """One face found in an image. Coordinates are image pixels, x right, y down."""

    box: np.ndarray  # (4,) float32: x0, y0, x1, y1
    score: float  # the backend's own confidence scale
    landmarks: np.ndarray  # (68, 2) or (5, 2) float32; 5 points in insightface order
    # insightface order for 5 points: left eye centre, right eye centre, nose tip, left mouth corner,
    # right mouth corner ("left" = image left).

    @property
    def size(self) -> float:
        x0, y0, x1, y1 = self.box
        return float(max(x1 - x0, y1 - y0))


class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces in an RGB uint8 HxWx3 image, largest first."""
        ...


def build_detector(cfg) -> FaceDetector:
    """The backend named by ``cfg.backend`` (a ``DetectionConfig``), built once per actor."""
    from .backends import build

    return build(cfg)
