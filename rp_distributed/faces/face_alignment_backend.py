"""face_alignment backend: SFD detector + 2D-FAN 68 landmarks (the paper's reference pipeline).

The package downloads its checkpoints into ``torch.hub.get_dir()/checkpoints`` on first use; here they
must already be in a local folder. ``cfg.model_dir`` may be a TORCH_HOME (``<dir>/hub/checkpoints``), a
hub dir (``<dir>/checkpoints``) or the checkpoints folder itself; unset, torch's own hub dir is used.
The files are checked *before* the model is built, so a missing file is an error, never a download.
Scores are SFD probabilities; ``cfg.threshold <= 0`` means SFD's own 0.5.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .types import DetectedFace
from .backends import BaseDetector, ModelFilesMissing, make_face, shift_face

DEFAULT_THRESHOLD = 0.5
MIN_FACE_AT_INPUT = 20  # px: SFD's smallest anchor is 16 px (stride 4)
_FALLBACK_FILES = {"s3fd": "s3fd-619a316812.pth", "2DFAN-4": "2DFAN4-11f355bf06.pth.tar"}


def checkpoint_names() -> dict[str, str]:
    """File names the installed face_alignment expects, keyed ``s3fd`` and ``2DFAN-4``."""
    names = dict(_FALLBACK_FILES)
    try:
        from face_alignment import api
        from face_alignment.detection.sfd import sfd_detector

        names["s3fd"] = os.path.basename(urlparse(sfd_detector.models_urls["s3fd"]).path)
        names["2DFAN-4"] = os.path.basename(urlparse(api.models_urls["2DFAN-4"]).path)
    except (ImportError, KeyError, AttributeError):
        pass
    return names


def resolve_checkpoints(model_dir: str | None) -> tuple[Path, dict[str, Path]]:
    """(checkpoints folder, {key: file}); ``ModelFilesMissing`` naming the folder when a file is absent."""
    names = checkpoint_names()
    if model_dir:
        base = Path(model_dir).expanduser()
    else:
        import torch.hub

        base = Path(torch.hub.get_dir())
    candidates = [base, base / "checkpoints", base / "hub" / "checkpoints"]
    for folder in candidates:
        if all((folder / n).is_file() for n in names.values()):
            return folder, {k: folder / n for k, n in names.items()}
    # Report the candidate holding most of the files (or the configured folder).
    best = max(candidates, key=lambda f: sum((f / n).is_file() for n in names.values()))
    if not any((best / n).is_file() for n in names.values()):
        best = base
    missing = [n for n in names.values() if not (best / n).is_file()]
    raise ModelFilesMissing(
        "face_alignment",
        best,
        missing,
        "put the checkpoints in <model_dir>, <model_dir>/checkpoints or <model_dir>/hub/checkpoints; "
        "nothing is downloaded",
    )


@contextlib.contextmanager
def _hub_dir(path: Path):
    """Point torch.hub (which face_alignment's loader reads) at ``path`` for the duration."""
    import torch.hub

    old = getattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub._hub_dir = old


class FaceAlignmentDetector(BaseDetector):
    name = "face_alignment"

    def __init__(self, cfg, device: str = "cpu"):
        super().__init__(cfg)
        folder, files = resolve_checkpoints(cfg.model_dir)
        self.checkpoint_dir = folder
        import face_alignment

        self.det_thresh = float(cfg.threshold) if cfg.threshold > 0 else DEFAULT_THRESHOLD
        with contextlib.ExitStack() as stack:
            if folder.name == "checkpoints":
                hub = folder.parent
            else:
                # face_alignment looks in <hub>/checkpoints: give it a hub whose checkpoints/ is our folder.
                import tempfile

                hub = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rp_fa_hub_")))
                (hub / "checkpoints").symlink_to(folder, target_is_directory=True)
            stack.enter_context(_hub_dir(hub))
            self._fa = face_alignment.FaceAlignment(
                face_alignment.LandmarksType.TWO_D,
                device=device,
                face_detector="sfd",
                face_detector_kwargs={
                    "path_to_detector": str(files["s3fd"]),
                    "filter_threshold": self.det_thresh,
                },
                compile=False,
            )

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No faces were detected."
            landmarks, _, boxes = self._fa.get_landmarks_from_image(image, return_bboxes=True)
        if landmarks is None:
            return []
        faces = []
        for lm, box in zip(landmarks, boxes):
            box = np.asarray(box, dtype=np.float32)
            faces.append(make_face(box[:4], float(box[4]) if box.shape[0] > 4 else 1.0, lm[:, :2], image.shape))
        return faces

    # Large images: SFD already runs at native resolution, so tiles (native, cfg.tile_px) bound its memory;
    # the coarse pass sees the image shrunk to cfg.tile_above_px for faces too big for a tile's overlap.
    def _coarse_scale(self, shape: tuple[int, ...]) -> float:
        return min(1.0, float(self.cfg.tile_above_px) / max(shape[:2]))

    def _coarse_min_face(self, shape: tuple[int, ...]) -> float:
        return MIN_FACE_AT_INPUT / self._coarse_scale(shape)

    def _coarse(self, image: np.ndarray) -> list[DetectedFace]:
        import cv2

        scale = self._coarse_scale(image.shape)
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        return [shift_face(f, 0.0, 0.0, 1.0 / scale) for f in self._detect(small)]
