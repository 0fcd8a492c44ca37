"""insightface backend: SCRFD detector from a model pack folder (e.g. ``~/.insightface/models/buffalo_l``).

``cfg.model_dir`` is the pack folder itself (holding ``det_10g.onnx``) or a folder containing the pack
named by ``cfg.model``; unset, it is ``~/.insightface/models/<cfg.model>``. A URI is synced once per node into
``cfg.cache_dir``; with ``cfg.lock_file`` (a tree written by ``rp-anonymize models pull``) the folder must lie in
that tree and is checked against the lock (size, sha256) first. SCRFD gives 5 keypoints in insightface order.
Scores are SCRFD probabilities; ``cfg.threshold <= 0`` means SCRFD's own 0.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .types import DetectedFace
from .backends import BaseDetector, ModelFilesMissing, make_face

DEFAULT_PACK = "buffalo_l"
DETECTOR_FILES = ("det_10g.onnx", "det_2.5g.onnx", "det_500m.onnx")  # buffalo_l/_m, ..., buffalo_s/_sc
DEFAULT_THRESHOLD = 0.5
INPUT_SIZE = (640, 640)  # (width, height) of the whole-image pass
STRIDE = 32  # SCRFD's coarsest feature stride: tile inputs are padded to a multiple of it
MIN_FACE_AT_INPUT = 16  # px: SCRFD's smallest anchor


def resolve_detector_file(model_dir: str | None, pack: str | None) -> Path:
    pack = pack or DEFAULT_PACK
    if pack in ("hog", "cnn", "sfd"):  # another backend's model name left in the config
        pack = DEFAULT_PACK
    if model_dir:
        base = Path(model_dir).expanduser()
        candidates = [base, base / pack]
    else:
        base = Path("~/.insightface/models").expanduser() / pack
        candidates = [base]
    for folder in candidates:
        if not folder.is_dir():
            continue
        for name in DETECTOR_FILES:
            if (folder / name).is_file():
                return folder / name
        extra = sorted(folder.glob("det_*.onnx"))
        if extra:
            return extra[0]
    raise ModelFilesMissing(
        "insightface",
        candidates[0],
        [DETECTOR_FILES[0]],
        f"expected an SCRFD det_*.onnx in {' or '.join(str(c) for c in candidates)}",
    )


def local_model_dir(cfg) -> str | None:
    """``cfg.model_dir`` as a local folder: through the lock file when one is set, synced when a URI."""
    lock_file = getattr(cfg, "lock_file", None)
    if lock_file:
        from ..modelstore import ModelSourceError, sync_locked

        if not cfg.model_dir:
            raise ModelSourceError("detection.lock_file is set but detection.model_dir is not: name the pack folder "
                                   "in the pulled tree (`rp-anonymize models pull` prints it)")
        return str(sync_locked(lock_file, cfg.cache_dir).local(cfg.model_dir, "detection.model_dir"))
    if cfg.model_dir and "://" in cfg.model_dir:
        from ..modelstore import sync_uri

        return str(sync_uri(cfg.model_dir, cfg.cache_dir))
    return cfg.model_dir


def _ctx_id(providers: list[str]) -> int:
    return 0 if any("CUDA" in p or "Tensorrt" in p for p in providers) else -1


class InsightFaceDetector(BaseDetector):
    name = "insightface"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model_file = resolve_detector_file(local_model_dir(cfg), cfg.model)
        from insightface.model_zoo import get_model

        from .onnx_threads import session_options

        model = get_model(str(self.model_file), providers=list(cfg.providers), sess_options=session_options())
        if model is None or getattr(model, "taskname", None) != "detection":
            raise ValueError(f"insightface backend: {self.model_file} is not an SCRFD detection model")
        self.det_thresh = float(cfg.threshold) if cfg.threshold > 0 else DEFAULT_THRESHOLD
        model.prepare(ctx_id=_ctx_id(list(cfg.providers)), det_thresh=self.det_thresh, input_size=INPUT_SIZE)
        self._model = model

    def _run(self, image: np.ndarray, input_size: tuple[int, int]) -> list[DetectedFace]:
        bgr = np.ascontiguousarray(image[..., ::-1])
        dets, kpss = self._model.detect(bgr, input_size=input_size)
        faces = []
        for i in range(len(dets)):
            x0, y0, x1, y1, score = (float(v) for v in dets[i][:5])
            if kpss is not None:
                kps = kpss[i]
            else:  # a detector without keypoints: approximate them from the box
                w, h = x1 - x0, y1 - y0
                kps = np.array([[0.34, 0.46], [0.66, 0.46], [0.5, 0.64], [0.37, 0.82], [0.63, 0.82]]) * [w, h] + [x0, y0]
            faces.append(make_face([x0, y0, x1, y1], score, kps, image.shape))
        return faces

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
        return self._run(image, INPUT_SIZE)

    # Large images: the coarse pass is the usual resize to 640; tiles run at scale 1 (padded to SCRFD's
    # stride), so a small face is seen at full resolution.
    def _coarse_min_face(self, shape: tuple[int, ...]) -> float:
        h, w = shape[:2]
        return MIN_FACE_AT_INPUT / min(INPUT_SIZE[0] / w, INPUT_SIZE[1] / h)

    def _whole_min_face(self, shape: tuple[int, ...]) -> float:
        return self._coarse_min_face(shape)  # the whole-image pass is the same 640 resize

    def _fixed_input(self) -> tuple[int, int] | None:
        """(width, height) of a model exported at one input size (insightface then ignores ours)."""
        fixed = getattr(self._model, "static_input_size", None)
        return (int(fixed[0]), int(fixed[1])) if fixed else None

    def tile_side(self) -> int:
        fixed = self._fixed_input()
        return min(fixed) if fixed else int(self.cfg.tile_px)

    def _tile(self, tile: np.ndarray) -> list[DetectedFace]:
        h, w = tile.shape[:2]
        fixed = self._fixed_input()
        ph, pw = (fixed[1], fixed[0]) if fixed else (-(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE)
        padded = np.zeros((ph, pw, 3), np.uint8)
        padded[:h, :w] = tile
        return [make_face(f.box, f.score, f.landmarks, tile.shape) for f in self._run(padded, (pw, ph))]
