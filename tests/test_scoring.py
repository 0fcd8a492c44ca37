"""Re-identification scoring with dlib's recognizer on real photos (insightface's t1.jpg: six people)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from rp_distributed.config import AlignmentConfig, DetectionConfig, PrivacyConfig
from rp_distributed.faces import align as A
from rp_distributed.faces import build_detector
from rp_distributed.faces.backends import ModelFilesMissing
from rp_distributed.scoring import ReidResult, ReidScorer, iou


def _t1() -> np.ndarray:
    folder = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0])
    return np.asarray(Image.open(folder / "data" / "images" / "t1.jpg").convert("RGB"))


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return _t1()


@pytest.fixture(scope="module")
def faces(t1):
    return build_detector(DetectionConfig(backend="dlib")).detect(t1)


@pytest.fixture(scope="module")
def scorer() -> ReidScorer:
    return ReidScorer(PrivacyConfig())


def _jpeg(img: np.ndarray, quality: int = 40) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _blur(img: np.ndarray, box, strength: float = 0.12) -> np.ndarray:
    """The anonymizer's default blur: Gaussian, sigma = 12% of the face size."""
    side = float(max(box[2] - box[0], box[3] - box[1]))
    return cv2.GaussianBlur(img, (0, 0), strength * side)


def test_threshold_comes_from_the_config():
    assert ReidScorer(PrivacyConfig(reid_threshold=0.45)).threshold == 0.45
    assert ReidScorer().threshold == 0.6


def test_different_people_are_not_reidentified(t1, faces, scorer):
    assert len(faces) == 6
    desc = [scorer.descriptor(t1, f.box) for f in faces]
    for d in desc:
        assert d.shape == (128,) and d.dtype == np.float32
    for i in range(6):
        for j in range(i + 1, 6):
            assert scorer.distance(desc[i], desc[j]) > scorer.threshold, (i, j)


def test_augmented_copies_are_reidentified(t1, faces, scorer):
    bright = np.clip(t1.astype(np.float32) * 1.3 + 10, 0, 255).astype(np.uint8)
    jpeg = _jpeg(t1)
    small = cv2.resize(t1, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    flipped = np.ascontiguousarray(t1[:, ::-1])
    w = t1.shape[1]
    for f in faces:
        for other in (bright, jpeg):
            res = scorer.compare(t1, other, f.box)
            assert isinstance(res, ReidResult)
            assert res.reidentified and res.distance < 0.4 and res.face_still_detected
        d0 = scorer.descriptor(t1, f.box)
        assert scorer.distance(d0, scorer.descriptor(small, f.box * 0.8)) < 0.3
        mirror_box = np.array([w - f.box[2], f.box[1], w - f.box[0], f.box[3]])
        assert scorer.distance(d0, scorer.descriptor(flipped, mirror_box)) < 0.4


def test_identical_images_distance_zero(t1, faces, scorer):
    res = scorer.compare(t1, t1, faces[0].box)
    assert res.distance == pytest.approx(0.0, abs=1e-6) and res.reidentified and res.face_still_detected


def test_heavy_blur_is_not_reidentified_and_not_a_face(t1, faces, scorer):
    for f in faces:
        res = scorer.compare(t1, _blur(t1, f.box), f.box)
        assert not res.reidentified and res.distance > scorer.threshold
        assert not res.face_still_detected


def test_descriptor_from_given_landmarks(t1, faces, scorer):
    d68 = [scorer.descriptor(t1, f.box, landmarks=f.landmarks) for f in faces[:3]]
    for f, d in zip(faces[:3], d68):
        assert scorer.distance(d, scorer.descriptor(t1, f.box)) < scorer.threshold  # same person
        # 5-point (insightface order) landmarks fall back to the predictor.
        assert np.array_equal(scorer.descriptor(t1, f.box, landmarks=A.five_points(f.landmarks)), scorer.descriptor(t1, f.box))
    assert scorer.distance(d68[0], d68[1]) > scorer.threshold and scorer.distance(d68[1], d68[2]) > scorer.threshold


def test_works_on_aligned_crops(t1, faces, scorer):
    cfg = AlignmentConfig(face_size=256)
    for f in faces[:3]:
        af = A.align(t1, f, cfg)
        same = scorer.compare(af.crop, _jpeg(af.crop, 60), af.face_box)
        assert same.reidentified and same.face_still_detected
        blurred = scorer.compare(af.crop, _blur(af.crop, af.face_box), af.face_box)
        assert not blurred.reidentified and not blurred.face_still_detected
        # The crop and the original image describe the same person.
        assert scorer.distance(scorer.descriptor(af.crop, af.face_box), scorer.descriptor(t1, f.box)) < 0.35
    # A different person's crop in place of this one is caught as a new identity.
    a, b = A.align(t1, faces[0], cfg), A.align(t1, faces[1], cfg)
    swap = scorer.compare(a.crop, b.crop, a.face_box)
    assert not swap.reidentified and swap.face_still_detected


def test_empty_or_outside_box(t1, scorer):
    assert scorer.descriptor(t1, [10, 10, 10, 50]) is None
    assert scorer.descriptor(t1, [5000, 5000, 5100, 5100]) is None
    res = scorer.compare(t1, t1, [5000, 5000, 5100, 5100])
    # No descriptor: the check could not run, and a check that cannot run counts as failed (re-identified).
    assert res.distance == float("inf") and not res.checked and res.reidentified and not res.face_still_detected
    assert scorer.is_reidentified(float("inf")) and scorer.is_reidentified(float("nan"))


def test_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0


def test_missing_model_folder_names_folder_and_backend(tmp_path):
    with pytest.raises(ModelFilesMissing) as err:
        ReidScorer(PrivacyConfig(), model_dir=str(tmp_path / "nope"))
    msg = str(err.value)
    assert str(tmp_path / "nope") in msg and "reid" in msg and "dlib_face_recognition_resnet_model_v1.dat" in msg
