"""Real photos for the subject clustering (``tests/test_subjects.py``, ``bench_subjects.py --photos``): insightface's
``t1.jpg`` (six people) under scale, rotation, JPEG and crop variations, and the other package photos with a face
(scikit-image's ``astronaut``, matplotlib's ``grace_hopper.jpg``, insightface's ``Tom_Hanks_54745.png``, scikit-image's
``camera``) as distractors, two of them in two versions each.

Every variant is an affine warp of its source (``cv2.warpAffine``: scale, rotation about the centre, a crop as a
translation into a smaller canvas) and an optional JPEG re-encode. A face's true identity comes from its source:
the face's box centre is carried back through the inverse warp and matched to the nearest face detected on the
untouched source (within half that face's width): identity ``source#index``. A face that matches none (a false
detection) is an identity of its own.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def _pkg(name: str) -> Path:
    return Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])


def sources() -> dict[str, np.ndarray]:
    def rgb(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    return {"t1": rgb(_pkg("insightface") / "data" / "images" / "t1.jpg"),
            "astronaut": rgb(_pkg("skimage") / "data" / "astronaut.png"),
            "hopper": rgb(_pkg("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg"),
            "hanks": rgb(_pkg("insightface") / "data" / "images" / "Tom_Hanks_54745.png"),
            "camera": rgb(_pkg("skimage") / "data" / "camera.png")}


@dataclass(frozen=True)
class Variant:
    name: str
    source: str
    scale: float = 1.0
    angle: float = 0.0  # degrees, counter-clockwise, about the source's centre
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # fractions of the warped image kept
    jpeg: int | None = None  # quality of a re-encode

    def matrix(self, shape) -> tuple[np.ndarray, tuple[int, int]]:
        """The 2 x 3 source -> variant warp and the variant's (width, height)."""
        h, w = shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), self.angle, self.scale)
        m[:, 2] += (np.array([w, h]) * (self.scale - 1) / 2)  # keep the scaled image's origin at the corner
        fx0, fy0, fx1, fy1 = self.crop
        sw, sh = w * self.scale, h * self.scale
        m[:, 2] -= (fx0 * sw, fy0 * sh)
        return m, (max(1, int(round((fx1 - fx0) * sw))), max(1, int(round((fy1 - fy0) * sh))))

    def render(self, src: np.ndarray) -> np.ndarray:
        m, size = self.matrix(src.shape)
        out = cv2.warpAffine(src, m, size, flags=cv2.INTER_AREA if self.scale < 1 else cv2.INTER_CUBIC,
                             borderMode=cv2.BORDER_REFLECT101)
        if self.jpeg:
            buf = io.BytesIO()
            Image.fromarray(out).save(buf, "JPEG", quality=self.jpeg)
            out = np.asarray(Image.open(buf).convert("RGB"))
        return out

    def to_source(self, points: np.ndarray, shape) -> np.ndarray:
        """Variant pixel points (N x 2) in source pixels."""
        inverse = cv2.invertAffineTransform(self.matrix(shape)[0])
        return np.asarray(points, np.float64) @ inverse[:, :2].T + inverse[:, 2]


VARIANTS = [
    Variant("t1/original.jpg", "t1"),
    Variant("t1/small.jpg", "t1", scale=0.6),
    Variant("t1/large.jpg", "t1", scale=1.5),
    Variant("t1/turned_left.jpg", "t1", angle=12),
    Variant("t1/turned_right.jpg", "t1", angle=-10, scale=0.9),
    Variant("t1/jpeg_q20.jpg", "t1", jpeg=20),
    Variant("t1/crop_left.jpg", "t1", crop=(0.0, 0.05, 0.62, 1.0)),
    Variant("t1/crop_right.jpg", "t1", crop=(0.38, 0.0, 1.0, 0.9), scale=1.2, jpeg=50),
    Variant("t1/mixed.jpg", "t1", scale=0.75, angle=6, jpeg=35, crop=(0.1, 0.0, 0.95, 1.0)),
    Variant("distractors/astronaut.png", "astronaut"),
    Variant("distractors/astronaut_small.jpg", "astronaut", scale=0.7, jpeg=40),
    Variant("distractors/hopper.jpg", "hopper"),
    Variant("distractors/hopper_turned.jpg", "hopper", angle=-8),
    Variant("distractors/hanks.png", "hanks", scale=2.0),
    Variant("distractors/hanks_jpeg.jpg", "hanks", scale=2.5, jpeg=30),
    Variant("distractors/camera.png", "camera", scale=1.5),
]


@dataclass
class SetFace:
    image: str  # the variant's name
    face_index: int
    identity: str
    descriptor: np.ndarray


def identity_of(variant: Variant, box, shape, reference: list[np.ndarray]) -> str:
    """``source#i``: the source face whose centre the box's centre maps back to; the variant's own name otherwise."""
    centre = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]])
    at = variant.to_source(centre, shape)[0]
    best, best_d = None, np.inf
    for i, ref in enumerate(reference):
        d = float(np.hypot(*(at - [(ref[0] + ref[2]) / 2, (ref[1] + ref[3]) / 2])))
        if d < 0.5 * (ref[2] - ref[0]) and d < best_d:
            best, best_d = i, d
    return f"{variant.source}#{best}" if best is not None else f"{variant.name}#{box.tolist()}"


def described_set(stage, folder: Path, variants=VARIANTS) -> list[SetFace]:
    """Every variant written under ``folder`` and described by ``stage`` (``subjects.describe.DescribeFaces``), each
    face with its true identity."""
    from rp_distributed.records import ImageRow, Status

    srcs = sources()
    reference = {}
    for name, rgb in srcs.items():  # the untouched sources' faces: the identities
        path = folder / "_sources" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
        found = stage.describe(ImageRow(str(path), path.name))
        reference[name] = [f.box for f in found.faces]
    faces = []
    for v in variants:
        rgb = v.render(srcs[v.source])
        path = folder / v.name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path, **({"quality": 100} if path.suffix == ".jpg" else {}))
        found = stage.describe(ImageRow(str(path), v.name))
        assert found.status in (Status.OK, Status.NO_FACE), (v.name, found.error)
        for f in found.faces:
            faces.append(SetFace(v.name, f.face_index, identity_of(v, f.box, srcs[v.source].shape,
                                                                    reference[v.source]), f.descriptor))
    return faces
