"""The record every face backend returns, and the detector protocol."""

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
    found_by: tuple[str, ...] = ()  # the detector passes that found it (an ensemble names each; empty: one pass)
    confident: bool = True  # False: an ensemble's low-confidence detection (the fallback method, not generation)

    @property
    def size(self) -> float:
        x0, y0, x1, y1 = self.box
        return float(max(x1 - x0, y1 - y0))


class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces in an RGB uint8 HxWx3 image, largest first."""
        ...

