"""Face detector backends behind ``build(cfg)``, with the post-processing they all share.

Every backend turns an RGB uint8 image into ``DetectedFace`` records in image pixels. The shared part
(``BaseDetector.detect``) validates the image, drops faces scoring below ``cfg.threshold`` and sorts
largest first. It returns *every* face: ``cfg.max_faces`` is the pipeline's budget, not a cut here.

Large images (long side above ``cfg.tile_above_px``) are searched twice: a coarse whole-image pass for
big faces, and overlapping tiles seen at a higher magnification for small ones (a backend at a fixed
input size would otherwise shrink a 30 px face to nothing). The tile overlap is twice the smallest face
the coarse pass is meant to find, so every face that pass may miss lies wholly inside some tile; tile
detections touching an interior tile edge (partial faces) are dropped, the rest mapped back to image
coordinates, and duplicates across passes merged by IoU. Backends supply the passes (``_coarse``,
``_tile``, ``_coarse_min_face``). Backends load their weights from a local folder only and never
download: a missing folder or file raises ``ModelFilesMissing`` naming the folder and backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .types import DetectedFace


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


def postprocess(faces: list[DetectedFace], threshold: float) -> list[DetectedFace]:
    """Drop faces scoring below ``threshold`` or with an empty box, sort largest first (all are kept)."""
    kept = [
        f for f in faces if f.score >= threshold and f.box[2] > f.box[0] and f.box[3] > f.box[1]
    ]
    kept.sort(key=lambda f: (-f.size, -f.score))
    return kept


Tile = tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels


def _spans(length: int, side: int, overlap: int) -> list[tuple[int, int]]:
    """Equal spans of at most ``side`` covering ``0..length``, neighbours sharing at least ``overlap``."""
    if length <= side:
        return [(0, length)]
    n = math.ceil((length - overlap) / (side - overlap))
    size = min(side, math.ceil((length + (n - 1) * overlap) / n))
    starts = np.linspace(0, length - size, n).round().astype(int)
    return [(int(a), int(a) + size) for a in starts]


def tile_grid(height: int, width: int, side: int, overlap: int) -> list[Tile]:
    """Overlapping tiles covering the image: any box up to ``overlap`` px wide lies wholly in one."""
    overlap = min(int(overlap), side // 2)
    return [(x0, y0, x1, y1) for y0, y1 in _spans(height, side, overlap) for x0, x1 in _spans(width, side, overlap)]


def touches_inner_edge(box: np.ndarray, tile: Tile, height: int, width: int, margin: float = 2.0) -> bool:
    """Whether ``box`` (tile pixels) reaches within ``margin`` px of a tile edge that is not an image edge."""
    x0, y0, x1, y1 = tile
    return bool(
        (x0 > 0 and box[0] <= margin)
        or (y0 > 0 and box[1] <= margin)
        or (x1 < width and box[2] >= (x1 - x0) - margin)
        or (y1 < height and box[3] >= (y1 - y0) - margin)
    )


def shift_face(face: DetectedFace, dx: float, dy: float, scale: float = 1.0) -> DetectedFace:
    """``face`` with box and landmarks scaled by ``scale`` then moved by ``(dx, dy)``."""
    off = np.array([dx, dy], np.float32)
    box = face.box * np.float32(scale) + np.tile(off, 2)
    return DetectedFace(box=box.astype(np.float32), score=face.score,
                        landmarks=(face.landmarks * scale + off).astype(np.float32), found_by=face.found_by)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    ih = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    inter = iw * ih
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def merge_duplicates(faces: list[DetectedFace], iou: float = 0.4) -> list[DetectedFace]:
    """Greedy NMS: of faces overlapping by more than ``iou``, the highest-scoring one stays."""
    kept: list[DetectedFace] = []
    for f in sorted(faces, key=lambda f: -f.score):
        if all(box_iou(f.box, k.box) <= iou for k in kept):
            kept.append(f)
    return kept


class BaseDetector:
    """Shared ``detect``. Subclasses implement ``_detect(rgb)`` (the whole-image pass) and may override
    the large-image hooks ``_coarse``, ``_tile``, ``_coarse_min_face`` and ``tile_side``."""

    name = "base"

    def __init__(self, cfg):
        self.cfg = cfg

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _coarse(self, image: np.ndarray) -> list[DetectedFace]:
        """Whole-image pass of a large image, meant for faces of ``_coarse_min_face`` px and more."""
        return self._detect(image)

    def _coarse_min_face(self, shape: tuple[int, ...]) -> float:
        """Smallest face side (image px) the coarse pass is meant to find in an image of ``shape``."""
        return 80.0

    def _tile(self, tile: np.ndarray) -> list[DetectedFace]:
        """Faces in one tile (tile pixels), small ones included."""
        return self._detect(tile)

    def _whole_min_face(self, shape: tuple[int, ...]) -> float:
        """Smallest face side (image px) the ordinary whole-image pass finds; 0 for backends that do not
        shrink their input (their whole-image pass is as good as tiles)."""
        return 0.0

    def needs_tiles(self, shape: tuple[int, ...]) -> bool:
        """Tile a large image, or one whose whole-image pass cannot see faces of ``min_face_size``
        (SCRFD shrinks every image to 640 px: a 40 px face in a 1600 px photo becomes 16 px)."""
        return (max(shape[:2]) > self.cfg.tile_above_px
                or self._whole_min_face(shape) > self.cfg.min_face_size)

    def tile_side(self) -> int:
        return int(self.cfg.tile_px)

    def tiles(self, shape: tuple[int, ...]) -> list[Tile]:
        """The tiles a large image of ``shape`` is searched in."""
        overlap = math.ceil(2 * self._coarse_min_face(shape))
        return tile_grid(shape[0], shape[1], self.tile_side(), overlap)

    def detect_tiled(self, image: np.ndarray) -> list[DetectedFace]:
        """Coarse pass plus tiles, partial faces at inner tile edges dropped, duplicates merged."""
        h, w = image.shape[:2]
        faces = list(self._coarse(image))
        for tile in self.tiles(image.shape):
            x0, y0, x1, y1 = tile
            for f in self._tile(np.ascontiguousarray(image[y0:y1, x0:x1])):
                if not touches_inner_edge(f.box, tile, h, w):
                    faces.append(shift_face(f, x0, y0))
        return merge_duplicates(faces)

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Every face in an RGB uint8 HxWx3 image, largest first."""
        image = as_rgb_uint8(image)
        if image.shape[0] == 0 or image.shape[1] == 0:
            return []
        if self.needs_tiles(image.shape):
            faces = self.detect_tiled(image)
        else:
            faces = self._detect(image)
        return postprocess(faces, self.cfg.threshold)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.cfg.model!r}, model_dir={self.cfg.model_dir!r})"

