"""dlib backend: HOG (``model: hog``) or MMOD CNN (``model: cnn``) detector + 68-point shape predictor.

Weights come from ``cfg.model_dir`` or, when unset, the ``face_recognition_models`` package's folder
(located without importing it: its ``__init__`` needs ``pkg_resources``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model_sources import installed_path
from .backends import BaseDetector, ModelFilesMissing, make_face, shift_face
from .types import DetectedFace

CNN_FILE = "mmod_human_face_detector.dat"
SHAPE68_FILE = "shape_predictor_68_face_landmarks.dat"
SHAPE5_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
WINDOW = 80  # dlib's face detectors' scanning window, px: the smallest face found without upsampling


def default_model_dir() -> Path | None:
    """``face_recognition_models``' ``models`` folder, or None when the package is not installed."""
    return installed_path("face_recognition_models", "models")


def resolve_model_files(model_dir: str | None, files: list[str], backend: str = "dlib") -> dict[str, Path]:
    """Paths of ``files`` in ``model_dir`` (or the default folder); ``ModelFilesMissing`` if any is absent."""
    folder = Path(model_dir).expanduser() if model_dir else default_model_dir()
    if folder is None:
        raise ModelFilesMissing(
            backend, None, files, "set detection.model_dir or install face_recognition_models"
        )
    missing = [f for f in files if not (folder / f).is_file()]
    if missing or not folder.is_dir():
        raise ModelFilesMissing(backend, folder, missing or files)
    return {f: folder / f for f in files}


def _rect_to_box(rect) -> np.ndarray:
    # dlib rectangles are inclusive: right/bottom are the last pixel inside.
    return np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float32)


def shape_to_array(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


class DlibDetector(BaseDetector):
    name = "dlib"

    def __init__(self, cfg):
        super().__init__(cfg)
        import dlib

        model = (cfg.model or "hog").lower()
        if model not in ("hog", "cnn"):
            raise ValueError(f"detection.model: dlib backend supports 'hog' or 'cnn', got {cfg.model!r}")
        self.model = model
        files = [SHAPE68_FILE] + ([CNN_FILE] if model == "cnn" else [])
        from ..model_sources import local_folder  # a URI or a pulled tree (lock file): its copy on this node

        folder = local_folder(cfg.model_dir, cfg.lock_file, cfg.cache_dir, "detection.model_dir")
        paths = resolve_model_files(folder, files, backend=f"dlib/{model}")
        self.model_dir = str(paths[SHAPE68_FILE].parent)
        if model == "cnn":
            self._cnn = dlib.cnn_face_detection_model_v1(str(paths[CNN_FILE]))
            self._hog = None
        else:
            self._hog = dlib.get_frontal_face_detector()
            self._cnn = None
        self._shape = dlib.shape_predictor(str(paths[SHAPE68_FILE]))

    def _run(self, image: np.ndarray, upsample: int) -> list[DetectedFace]:
        if self._hog is not None:
            # run() exposes scores; adjust_threshold lets a negative cfg.threshold surface weaker faces.
            rects, scores, _ = self._hog.run(image, upsample, min(float(self.cfg.threshold), 0.0))
            found = list(zip(rects, scores))
        else:
            found = [(d.rect, d.confidence) for d in self._cnn(image, upsample)]
        faces = []
        for rect, score in found:
            landmarks = shape_to_array(self._shape(image, rect))
            faces.append(make_face(_rect_to_box(rect), float(score), landmarks, image.shape))
        return faces

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
        return self._run(image, int(self.cfg.upsample))

    # Large images: the coarse pass runs at the image's own scale (faces from the 80 px window up), the
    # tiles magnified by cfg.tile_zoom (faces from 80 / tile_zoom px up), landmarks fitted there.
    def _coarse(self, image: np.ndarray) -> list[DetectedFace]:
        return self._run(image, 0)

    def _coarse_min_face(self, shape: tuple[int, ...]) -> float:
        return float(WINDOW)

    def _tile(self, tile: np.ndarray) -> list[DetectedFace]:
        import cv2

        if self._hog is not None:
            # HOG on luminance: a third of the gradient work of RGB (where it takes the strongest channel)
            # at zoom**2 the pixels; on the test photo it finds the same faces with the same scores.
            tile = cv2.cvtColor(tile, cv2.COLOR_RGB2GRAY)
        zoom = float(self.cfg.tile_zoom)
        big = tile if zoom == 1.0 else cv2.resize(tile, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_LINEAR)
        return [shift_face(f, 0.0, 0.0, 1.0 / zoom) for f in self._run(big, 0)]


class BoxLandmarks:
    """dlib's 68-point shape predictor run in a given box (annotation rows with a box and no landmarks): the
    same predictor the dlib backend fits to its own detections."""

    def __init__(self, model_dir: str | None = None):
        import dlib

        path = resolve_model_files(model_dir, [SHAPE68_FILE], backend="annotations/landmarks")[SHAPE68_FILE]
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(path))

    def __call__(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """(68, 2) float32 image points of the face in ``box`` (x0, y0, x1, y1, image px; exclusive end)."""
        x0, y0, x1, y1 = (int(round(float(v))) for v in np.asarray(box).reshape(4))
        rect = self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)
        return shape_to_array(self._shape(np.ascontiguousarray(image), rect))
