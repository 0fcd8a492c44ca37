"""Held-out composites of real faces for the recall benchmark (``bench_recall.py``) and its CI slice.

Faces come from photos that ship inside installed packages: insightface's ``t1.jpg`` (six people) and
``Tom_Hanks_54745.png``, scikit-image's ``astronaut`` and ``camera``, matplotlib's ``grace_hopper.jpg``, and the
100 face patches of scikit-image's ``lfw_subset`` (25 px, grey; half the faces of 24 px and less, the other half
are photo faces shrunk with their context). Backgrounds are scikit-image photos without
people (coffee, chelsea the cat, rocket, brick, grass, gravel, the Hubble deep field, a motorcycle, the moon, a
page of text).

Ground truth comes from the untouched sources: on each upright source photo, CenterFace at scale 1 with
threshold 0.5 (its detections there are far above it: 0.83-0.94), and the count must be the known number of
people (t1: 6, the others 1: ``locate_sources`` asserts it); the boxes were checked by eye on a contact sheet of
the sources. An LFW patch is one face filling the patch: its box is the patch. Each face is cut with a margin (its
box grown to 1.6x, an elliptical feathered alpha), scaled so the box's long side is the wanted size, rotated, and
pasted; its true box is carried through the same scale and rotation (the bounds of the box's inscribed ellipse,
as the ensemble maps its rotated boxes back). Each image then gets one degradation: none, JPEG q30, blur
(sigma 1.5 px), dark (x0.3, gamma 1.4) or noise (sigma 15).

Buckets (the issue's): upright (|angle| <= 30) >= 110 px, 32-72 px, <= 24 px (14-24); turned (45-90) >= 110 px,
32-72 px. A detection finds a face when their boxes overlap by IoU >= 0.3 (one detection per face, best score
first); a false detection is one overlapping no face (IoU < 0.1 and its centre in no face box).
"""

from __future__ import annotations

import importlib.util
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

BUCKETS = {  # name: (|angle| range, face size range)
    "upright >=110px": ((0, 30), (110, 200)),
    "upright 32-72px": ((0, 30), (32, 72)),
    "upright <=24px": ((0, 30), (14, 24)),
    "turned 45-90 >=110px": ((45, 90), (110, 200)),
    "turned 45-90 32-72px": ((45, 90), (32, 72)),
}
BUCKET_WEIGHTS = [0.2, 0.25, 0.2, 0.15, 0.2]
BACKGROUNDS = ["coffee.png", "chelsea.png", "rocket.jpg", "brick.png", "grass.png", "gravel.png",
               "hubble_deep_field.jpg", "motorcycle_left.png", "moon.png", "page.png"]
DEGRADATIONS = ["none", "jpeg", "blur", "dark", "noise"]
MARGIN = 1.6  # patch side / face box long side
PEOPLE = {"t1": 6, "hanks": 1, "astronaut": 1, "camera": 1, "hopper": 1}


def _pkg(name: str) -> Path:
    return Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def source_photos() -> dict[str, np.ndarray]:
    ins, sk = _pkg("insightface") / "data" / "images", _pkg("skimage") / "data"
    return {"t1": _rgb(ins / "t1.jpg"), "hanks": _rgb(ins / "Tom_Hanks_54745.png"),
            "astronaut": _rgb(sk / "astronaut.png"), "camera": _rgb(sk / "camera.png"),
            "hopper": _rgb(_pkg("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg")}


@dataclass
class SourceFace:
    image: np.ndarray  # the source photo (or LFW patch), RGB
    box: np.ndarray  # (4,) the face in it
    name: str
    small_only: bool = False  # LFW's 25 px patches: pasted at 24 px and below only


def locate_sources() -> list[SourceFace]:
    """Every face of the source photos (CenterFace on the upright source, count checked), and LFW's patches."""
    from rp_distributed.config import DetectionConfig
    from rp_distributed.faces.centerface_backend import CenterFaceDetector

    det = CenterFaceDetector(DetectionConfig(backend="centerface"))
    faces = []
    for name, img in source_photos().items():
        found = det.detect_at(img, 1.0, 0.5)
        assert len(found) == PEOPLE[name], (name, len(found))
        faces += [SourceFace(img, f.box.copy(), f"{name}#{i}") for i, f in enumerate(found)]
    lfw = np.load(_pkg("skimage") / "data" / "lfw_subset.npy")[:100]  # the first 100 are faces
    for i, patch in enumerate(lfw):
        rgb = np.repeat((patch * 255).round().astype(np.uint8)[..., None], 3, axis=2)
        faces.append(SourceFace(rgb, np.array([0, 0, 25, 25], np.float32), f"lfw#{i}", small_only=True))
    return faces


@dataclass
class Composite:
    image: np.ndarray
    boxes: np.ndarray  # (N, 4) true face boxes
    buckets: list[str]
    sources: list[str]
    background: str
    degradation: str
    notes: dict = field(default_factory=dict)


def _patch(src: SourceFace, size: float, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb, alpha, true box in patch px) of ``src``'s face scaled to ``size`` px and turned ``angle`` degrees."""
    x0, y0, x1, y1 = src.box
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    k = size / side
    half = MARGIN * size / 2
    out = int(math.ceil(2 * half * math.sqrt(2))) + 2
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, k)
    m[:, 2] += np.array([out / 2 - cx, out / 2 - cy])
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
    rgb = cv2.warpAffine(src.image, m, (out, out), flags=interp, borderMode=cv2.BORDER_REFLECT_101)
    alpha = np.zeros((out, out), np.float32)
    # The ellipse inscribed in the face box grown MARGIN times (the box's corners lie inside it), feathered.
    axes = (int(round(MARGIN / 2 * (x1 - x0) * k)), int(round(MARGIN / 2 * (y1 - y0) * k)))
    cv2.ellipse(alpha, (out // 2, out // 2), axes, -angle, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(0.6, 0.06 * size))
    if src.small_only:  # the patch is all face: its square, turned
        sq = np.zeros((out, out), np.float32)
        pts = cv2.transform(np.array([[[0, 0], [25, 0], [25, 25], [0, 25]]], np.float32), m)[0]
        cv2.fillConvexPoly(sq, pts.round().astype(np.int32), 1.0)
        alpha = cv2.GaussianBlur(sq, (0, 0), 0.6)
    from rp_distributed.faces.rotate import ellipse_bounds

    box = ellipse_bounds(np.array([out / 2, out / 2]), (x1 - x0) * k / 2, (y1 - y0) * k / 2, angle)
    return rgb, alpha, box


def _background(name: str, w: int, h: int) -> np.ndarray:
    img = _rgb(_pkg("skimage") / "data" / name)
    s = max(w / img.shape[1], h / img.shape[0])
    big = cv2.resize(img, (math.ceil(img.shape[1] * s), math.ceil(img.shape[0] * s)), interpolation=cv2.INTER_CUBIC)
    y, x = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
    return np.ascontiguousarray(big[y:y + h, x:x + w])


def degrade(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=30)
        return np.asarray(Image.open(buf).convert("RGB"))
    if kind == "blur":
        return cv2.GaussianBlur(img, (0, 0), 1.5)
    if kind == "dark":
        return (255 * (img / 255.0) ** 1.4 * 0.3).round().astype(np.uint8)
    if kind == "noise":
        return np.clip(img + rng.normal(0, 15, img.shape), 0, 255).round().astype(np.uint8)
    return img


def _spec(rng: np.random.Generator) -> tuple[str, float, float]:
    bucket = list(BUCKETS)[rng.choice(len(BUCKETS), p=BUCKET_WEIGHTS)]
    (a0, a1), (s0, s1) = BUCKETS[bucket]
    return bucket, float(rng.uniform(s0, s1)), float(rng.uniform(a0, a1) * rng.choice([-1, 1]))


def make_composite(sources: list[SourceFace], rng: np.random.Generator, index: int, size=(960, 720),
                   faces: int = 4) -> Composite:
    w, h = size
    bg_name = BACKGROUNDS[index % len(BACKGROUNDS)]
    img = _background(bg_name, w, h).astype(np.float32)
    taken: list[tuple[int, int, int, int]] = []
    boxes, buckets, names = [], [], []
    for _ in range(faces):
        bucket, s, angle = _spec(rng)
        # A small face is a photo's face shrunk with its context (hair, head) or, half the time, an LFW patch (a
        # tight crop: no context at all, the hardest kind).
        lfw = s <= 24 and rng.random() < 0.5
        pool = [f for f in sources if f.small_only == lfw]
        src = pool[rng.integers(len(pool))]
        rgb, alpha, box = _patch(src, s, angle)
        n = rgb.shape[0]
        if n >= min(w, h):
            continue
        for _try in range(200):
            x, y = int(rng.integers(0, w - n)), int(rng.integers(0, h - n))
            b = (x + box[0], y + box[1], x + box[2], y + box[3])
            pad = 0.35 * s
            rect = (int(b[0] - pad), int(b[1] - pad), int(b[2] + pad), int(b[3] + pad))
            if all(rect[2] <= t[0] or t[2] <= rect[0] or rect[3] <= t[1] or t[3] <= rect[1] for t in taken):
                break
        else:
            continue
        taken.append(rect)
        a = alpha[..., None]
        img[y:y + n, x:x + n] = img[y:y + n, x:x + n] * (1 - a) + rgb * a
        boxes.append(b)
        buckets.append(bucket)
        names.append(src.name)
    kind = DEGRADATIONS[index % len(DEGRADATIONS)]
    out = degrade(img.round().clip(0, 255).astype(np.uint8), kind, rng)
    return Composite(out, np.array(boxes, np.float32).reshape(-1, 4), buckets, names, bg_name, kind)


def composites(seed: int, count: int, size=(960, 720), faces: int = 4, sources=None) -> list[Composite]:
    """``count`` composites drawn with ``seed`` (one seed tunes, another reports)."""
    sources = sources if sources is not None else locate_sources()
    rng = np.random.default_rng(seed)
    return [make_composite(sources, rng, i, size, faces) for i in range(count)]


# -- scoring ---------------------------------------------------------------------------------------------------

def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


@dataclass
class ImageScore:
    found: list[bool]  # per true face
    false: int  # detections overlapping no face
    outside_px: float  # fraction of the image's pixels changed outside the faces (boxes grown 30% a side)


def grown(box, k: float = 0.3) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([x0 - k * (x1 - x0), y0 - k * (y1 - y0), x1 + k * (x1 - x0), y1 + k * (y1 - y0)])


def score_image(truth: np.ndarray, dets: np.ndarray, scores: np.ndarray, shape) -> ImageScore:
    """Match detections (boxes ``dets``) to true boxes, best score first, IoU >= 0.3."""
    found = [False] * len(truth)
    ious = iou_matrix(dets, truth) if len(truth) and len(dets) else np.zeros((len(dets), len(truth)))
    for i in np.argsort(-np.asarray(scores)):
        free = [j for j in range(len(truth)) if not found[j] and ious[i, j] >= 0.3]
        if free:
            found[max(free, key=lambda j: ious[i, j])] = True
    false = 0
    for i, d in enumerate(dets):
        c = ((d[0] + d[2]) / 2, (d[1] + d[3]) / 2)
        inside = any(t[0] <= c[0] <= t[2] and t[1] <= c[1] <= t[3] for t in truth)
        if not inside and (not len(truth) or ious[i].max() < 0.1):
            false += 1
    h, w = shape[:2]
    changed, faces = np.zeros((h, w), bool), np.zeros((h, w), bool)
    for mask, boxes in ((changed, dets), (faces, truth)):
        for b in boxes:
            x0, y0, x1, y1 = np.clip(grown(b), 0, [w, h, w, h]).round().astype(int)
            mask[y0:y1, x0:x1] = True
    return ImageScore(found, false, float((changed & ~faces).mean()))
