"""MTCNN (facenet-pytorch's P/R/O-Net weights) as a backend and as an ensemble pass on small-face duty, on real
photos and on the recall benchmark's CI slice."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.recall_set import composites, iou_matrix, locate_sources
from rp_distributed.config import CENTERFACE_PASSES, DetectionConfig, PassConfig
from rp_distributed.faces import build_detector
from rp_distributed.faces.backends import ModelFilesMissing, box_iou

# The pass measured in BENCHMARKS.md ("Small faces: MTCNN"): the image as it is, faces of at most 48 px, O-Net 0.9.
SMALL = PassConfig(member="mtcnn", scale=1.0, threshold=0.9, max_face_px=48)


def test_mtcnn_finds_t1s_six_people_with_five_landmarks(t1_rgb):
    cf = build_detector(DetectionConfig(backend="centerface")).detect(t1_rgb)
    faces = build_detector(DetectionConfig(backend="mtcnn")).detect(t1_rgb)
    assert len(cf) == 6
    for truth in cf:
        f = max(faces, key=lambda g: box_iou(g.box, truth.box))
        assert box_iou(f.box, truth.box) > 0.5 and f.score > 0.99
        p = f.landmarks  # insightface order: eyes (image left first), nose, mouth corners, inside the box
        assert p.shape == (5, 2) and p.dtype == np.float32
        assert p[0, 0] < p[1, 0] and max(p[0, 1], p[1, 1]) < p[2, 1] < min(p[3, 1], p[4, 1])
        x0, y0, x1, y1 = f.box
        assert np.all((p[:, 0] > x0) & (p[:, 0] < x1) & (p[:, 1] > y0) & (p[:, 1] < y1))


def test_a_pass_on_small_face_duty_keeps_no_face_above_its_size(t1_rgb):
    """t1's six faces are 114-145 px: a pass capped at 48 px reports none of them (its pyramid stops there)."""
    faces = build_detector(DetectionConfig(passes=[SMALL])).detect(t1_rgb)
    assert all(f.size <= 48 for f in faces)
    cf = build_detector(DetectionConfig(backend="centerface")).detect(t1_rgb)
    assert not any(box_iou(f.box, t.box) > 0.1 for f in faces for t in cf)


def test_mtcnn_missing_weights_name_the_folder(tmp_path):
    from rp_distributed.faces.mtcnn_backend import MTCNN

    with pytest.raises(ModelFilesMissing, match="pnet.pt") as err:
        MTCNN(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.fixture(scope="module")
def slice_images():
    from tests.test_recall import SLICE

    return composites(SLICE["seed"], SLICE["count"], SLICE["size"], SLICE["faces"], sources=locate_sources())


def _best_iou(faces, truth: np.ndarray) -> float:
    boxes = np.array([f.box for f in faces], np.float32).reshape(-1, 4)
    return float(iou_matrix(boxes, truth[None])[:, 0].max()) if len(faces) else 0.0


@pytest.mark.parametrize("image, source", [(1, "t1#0"), (4, "lfw#99")])
def test_mtcnn_pass_finds_a_small_face_the_default_misses(slice_images, image, source):
    """Two faces of 24 px and less in the CI slice that the CenterFace passes miss: t1.jpg's person 0 pasted at
    17 px under JPEG q30, and an LFW patch under noise. The MTCNN pass finds each, and adds no false detection to
    its image; the default (which has the pass) finds it too."""
    c = slice_images[image]
    j = c.sources.index(source)
    assert c.buckets[j] == "upright <=24px"
    truth = c.boxes[j]
    centerface = build_detector(DetectionConfig(passes=CENTERFACE_PASSES)).detect(c.image)
    assert _best_iou(centerface, truth) < 0.3
    small = build_detector(DetectionConfig(passes=[SMALL])).detect(c.image)
    assert _best_iou(small, truth) > 0.5
    true_boxes = np.asarray(c.boxes, np.float32)
    assert all(iou_matrix(np.asarray([f.box], np.float32), true_boxes).max() >= 0.1 for f in small)
    assert SMALL in DetectionConfig().passes
    both = build_detector(DetectionConfig()).detect(c.image)
    assert _best_iou(both, truth) > 0.5
    found = max(both, key=lambda f: box_iou(f.box, truth))
    assert "mtcnn@1x" in found.found_by
    # MTCNN alone: low-confidence (the fallback, never a GPU face); with CenterFace's weak detection agreeing (the
    # 2x pass's corroboration), two members found it.
    assert found.confident == any(t.startswith("centerface") for t in found.found_by), found.found_by


def test_preflight_names_missing_mtcnn_weights_before_the_job_starts(tmp_path, monkeypatch):
    """A config whose ensemble names an MTCNN pass fails preflight, naming the fix, when the weights are absent."""
    from rp_distributed import preflight
    from rp_distributed.config import JobConfig
    from rp_distributed.faces import mtcnn_backend

    cfg = JobConfig()  # the default ensemble has an MTCNN pass
    preflight.check_detection(cfg)  # installed: passes
    monkeypatch.setattr(mtcnn_backend, "installed_path", lambda package, rel: tmp_path)
    with pytest.raises(preflight.PreflightError, match="facenet-pytorch"):
        preflight.check_detection(cfg)
    with pytest.raises(preflight.PreflightError, match="pnet.pt"):
        preflight.check_detection(JobConfig(detection=DetectionConfig(backend="mtcnn")))
