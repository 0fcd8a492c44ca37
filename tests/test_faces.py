"""Face backends and alignment on real photos (insightface's t1.jpg: six people; skimage's astronaut)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from rp_distributed.config import AlignmentConfig, DetectionConfig
from rp_distributed.faces import DetectedFace, build_detector
from rp_distributed.faces import align as A
from rp_distributed.faces.backends import ModelFilesMissing, postprocess


def _pkg_dir(name: str) -> Path:
    return Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])


def _photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(_pkg_dir("insightface") / "data" / "images" / name).convert("RGB"))


def _skimage(name: str) -> np.ndarray:
    return np.asarray(Image.open(_pkg_dir("skimage") / "data" / name).convert("RGB"))


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


FACE = 256
ALIGN = AlignmentConfig(face_size=FACE)


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return _photo("t1.jpg")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _skimage("astronaut.png")


@pytest.fixture(scope="module")
def hog():
    return build_detector(DetectionConfig(backend="dlib", model="hog"))


@pytest.fixture(scope="module")
def t1_faces(hog, t1) -> list[DetectedFace]:
    return hog.detect(t1)


# --- dlib backend -------------------------------------------------------------------------------------


def test_hog_finds_the_six_people_with_68_landmarks_inside_their_boxes(t1_faces, t1):
    assert len(t1_faces) == 6
    sizes = [f.size for f in t1_faces]
    assert sizes == sorted(sizes, reverse=True)
    for f in t1_faces:
        assert f.box.dtype == np.float32 and f.box.shape == (4,)
        assert f.landmarks.dtype == np.float32 and f.landmarks.shape == (68, 2)
        x0, y0, x1, y1 = f.box
        assert 0 <= x0 < x1 <= t1.shape[1] and 0 <= y0 < y1 <= t1.shape[0]
        assert 60 < f.size < 200  # the t1 faces are 90-130 px
        # Points lie on the face: inside the box (grown by 20%: the jaw line may poke out of HOG's box).
        m = 0.2 * f.size
        lm = f.landmarks
        assert np.all((lm[:, 0] > x0 - m) & (lm[:, 0] < x1 + m) & (lm[:, 1] > y0 - m) & (lm[:, 1] < y1 + m))
        inner = lm[27:]  # nose, eyes, mouth: strictly inside
        assert np.all((inner[:, 0] > x0) & (inner[:, 0] < x1) & (inner[:, 1] > y0) & (inner[:, 1] < y1))
        # Anatomy: eyes above the nose tip above the mouth; image-left eye left of image-right eye.
        p = A.five_points(lm)
        assert p[0, 0] < p[1, 0]
        assert max(p[0, 1], p[1, 1]) < p[2, 1] < min(p[3, 1], p[4, 1])


def test_threshold_and_max_faces(t1, t1_faces):
    det = build_detector(DetectionConfig(backend="dlib", threshold=0.9, max_faces=3))
    faces = det.detect(t1)
    assert len(faces) == 3
    assert all(f.score >= 0.9 for f in faces)
    strong = sorted([f for f in t1_faces if f.score >= 0.9], key=lambda f: -f.size)[:3]
    assert [tuple(f.box) for f in faces] == [tuple(f.box) for f in strong]
    # The shared post-processing alone.
    kept = postprocess(list(reversed(t1_faces)), threshold=1.0, max_faces=64)
    assert [f.size for f in kept] == sorted((f.size for f in t1_faces if f.score >= 1.0), reverse=True)


@pytest.mark.parametrize("name", ["coffee.png", "brick.png"])
def test_no_face_no_detection(hog, name):
    assert hog.detect(_skimage(name)) == []


def test_accepts_gray_and_rgba(hog, astronaut):
    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    ref = hog.detect(astronaut)[0]
    for img in (gray, rgba):
        got = hog.detect(img)
        assert got and _iou(got[0].box, ref.box) > 0.8


def test_cnn_detector_on_a_small_photo(astronaut):
    head = np.ascontiguousarray(astronaut[30:230, 120:320])  # 200 px around the face: CNN on CPU is slow
    cnn = build_detector(DetectionConfig(backend="dlib", model="cnn", upsample=0))
    faces = cnn.detect(head)
    hog_faces = build_detector(DetectionConfig(backend="dlib", model="hog", upsample=0)).detect(head)
    assert len(faces) == 1 and faces[0].landmarks.shape == (68, 2) and faces[0].score > 0.5
    assert _iou(faces[0].box, hog_faces[0].box) > 0.5
    assert A.landmark_displacement(faces[0].landmarks, hog_faces[0].landmarks) < 0.15


def test_dlib_missing_folder_names_folder_and_backend(tmp_path):
    missing = tmp_path / "no_such_models"
    with pytest.raises(ModelFilesMissing) as err:
        build_detector(DetectionConfig(backend="dlib", model="cnn", model_dir=str(missing)))
    msg = str(err.value)
    assert str(missing) in msg and "dlib" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFilesMissing, match="mmod_human_face_detector.dat") as err:
        build_detector(DetectionConfig(backend="dlib", model="cnn", model_dir=str(tmp_path / "empty")))
    assert str(tmp_path / "empty") in str(err.value)


def test_dlib_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="hog"):
        build_detector(DetectionConfig(backend="dlib", model="retina"))


# --- insightface backend --------------------------------------------------------------------------------


def test_insightface_missing_folder_names_folder_and_backend(tmp_path):
    missing = tmp_path / "buffalo_l"
    with pytest.raises(ModelFilesMissing) as err:
        build_detector(DetectionConfig(backend="insightface", model="buffalo_l", model_dir=str(missing)))
    msg = str(err.value)
    assert str(missing) in msg and "insightface" in msg and "det_10g.onnx" in msg


def _tiny_scrfd(path: Path) -> None:
    """An ONNX graph with SCRFD's 9-output signature (3 strides x scores/boxes/keypoints, 2 anchors).

    Its "face" score is high where the image is bright; boxes are 4 strides wide with fixed keypoints.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    kps = np.array([-0.7, -0.5, 0.7, -0.5, 0.0, 0.2, -0.6, 1.0, 0.6, 1.0], np.float32)
    heads = {"score": (1, None), "bbox": (4, np.full(4, 2.0, np.float32)), "kps": (10, kps)}
    for kind, (k, bias) in heads.items():
        for s in (8, 16, 32):
            name = f"{kind}_{s}"
            nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool_{name}"], kernel_shape=[s, s], strides=[s, s]))
            if kind == "score":  # mean of the normalised RGB: -1 (black) .. +1 (white)
                w = np.full((2 * k, 3, 1, 1), 8.0 / 3, np.float32)
                b = np.full(2 * k, -4.0, np.float32)
            else:
                w = np.zeros((2 * k, 3, 1, 1), np.float32)
                b = np.tile(bias, 2)
            inits += [numpy_helper.from_array(w, f"w_{name}"), numpy_helper.from_array(b, f"b_{name}")]
            nodes.append(helper.make_node("Conv", [f"pool_{name}", f"w_{name}", f"b_{name}"], [f"conv_{name}"]))
            last = f"conv_{name}"
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [last], [f"sig_{name}"]))
                last = f"sig_{name}"
            nodes.append(helper.make_node("Transpose", [last], [f"t_{name}"], perm=[0, 2, 3, 1]))
            inits.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"shape_{name}"))
            nodes.append(helper.make_node("Reshape", [f"t_{name}", f"shape_{name}"], [name]))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", k]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])], outs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_insightface_backend_runs_an_scrfd_signature_model(tmp_path):
    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    _tiny_scrfd(pack / "det_10g.onnx")
    det = build_detector(DetectionConfig(backend="insightface", model="buffalo_l", model_dir=str(tmp_path), threshold=0.7, max_faces=5))
    img = np.zeros((480, 640, 3), np.uint8)
    img[200:300, 300:400] = 255  # a bright square: the only place scoring above 0.7
    faces = det.detect(img)
    assert 1 <= len(faces) <= 5
    for f in faces:
        assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
        assert f.score >= 0.7
        cx, cy = (f.box[:2] + f.box[2:]) / 2
        assert 280 <= cx <= 420 and 180 <= cy <= 320
        x0, y0, x1, y1 = f.box
        assert np.all((f.landmarks[:, 0] >= x0) & (f.landmarks[:, 0] <= x1))
        assert f.landmarks[0, 0] < f.landmarks[1, 0]  # insightface order kept
    assert det.detect(np.zeros((480, 640, 3), np.uint8)) == []


# --- face_alignment backend ------------------------------------------------------------------------------


def test_face_alignment_missing_weights_names_folder_and_backend(tmp_path):
    with pytest.raises(ModelFilesMissing) as err:
        build_detector(DetectionConfig(backend="face_alignment", model="sfd", model_dir=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path) in msg and "face_alignment" in msg and "s3fd" in msg and "2DFAN4" in msg


def test_face_alignment_loads_weights_from_the_folder_without_downloading(tmp_path, astronaut):
    """Random-weight checkpoints in a TORCH_HOME layout: the backend builds from them (no network here)."""
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    from rp_distributed.faces.face_alignment_backend import checkpoint_names

    names = checkpoint_names()
    ckpt = tmp_path / "weights"  # flat: the checkpoint files directly in model_dir
    ckpt.mkdir()
    torch.manual_seed(0)
    sfd = s3fd().state_dict()
    for k in sfd:  # a detector that never fires: background wins everywhere
        if "mbox_conf" in k:
            sfd[k].zero_()
            if k.endswith("bias"):
                sfd[k][:-1] = 10.0
                sfd[k][-1] = -10.0
    torch.save(sfd, ckpt / names["s3fd"])
    torch.save(FAN(4).state_dict(), ckpt / names["2DFAN-4"])
    hub_before = torch.hub.get_dir()
    det = build_detector(DetectionConfig(backend="face_alignment", model="sfd", model_dir=str(ckpt)))
    assert det.checkpoint_dir == ckpt
    assert torch.hub.get_dir() == hub_before  # torch's hub dir is restored
    assert det.detect(cv2.resize(astronaut, (128, 128))) == []


@pytest.mark.parametrize("layout", ["", "checkpoints", "hub/checkpoints"])
def test_face_alignment_checkpoint_layouts(tmp_path, layout):
    from rp_distributed.faces.face_alignment_backend import checkpoint_names, resolve_checkpoints

    folder = tmp_path / layout if layout else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    names = list(checkpoint_names().values())
    (folder / names[0]).write_bytes(b"x")
    with pytest.raises(ModelFilesMissing, match=names[1]) as err:  # one file missing: named, with its folder
        resolve_checkpoints(str(tmp_path))
    assert str(folder) in str(err.value)
    (folder / names[1]).write_bytes(b"x")
    found, files = resolve_checkpoints(str(tmp_path))
    assert found == folder and sorted(p.name for p in files.values()) == sorted(names)


# --- alignment ---------------------------------------------------------------------------------------------


def test_five_points_from_68():
    lm = np.zeros((68, 2), np.float32)
    lm[36:42] = [10, 20]
    lm[42:48] = [30, 20]
    lm[30] = [20, 30]
    lm[48], lm[54] = [12, 40], [28, 40]
    assert np.allclose(A.five_points(lm), [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])
    assert np.array_equal(A.five_points(A.five_points(lm)), A.five_points(lm))
    with pytest.raises(ValueError):
        A.five_points(np.zeros((10, 2)))


def test_68_and_5_point_crops_agree(t1, t1_faces):
    rng = np.random.default_rng(0)
    for f in t1_faces:
        m68 = A.alignment_matrix(f.landmarks, FACE, ALIGN.padding, ALIGN.shift)
        m5 = A.alignment_matrix(A.five_points(f.landmarks), FACE, ALIGN.padding, ALIGN.shift)
        c68, c5 = A.warp_to_crop(t1, m68, FACE), A.warp_to_crop(t1, m5, FACE)
        assert np.abs(c68.astype(int) - c5).mean() < 1.0
        # Another backend's 5 points differ by a pixel or so: the crop barely moves.
        noisy = A.five_points(f.landmarks) + rng.normal(0, 1.0, (5, 2))
        mn = A.alignment_matrix(noisy, FACE, ALIGN.padding, ALIGN.shift)
        cn = A.warp_to_crop(t1, mn, FACE)
        assert np.abs(c68.astype(int) - cn).mean() < 12.0
        corners = np.array([[0, 0], [FACE, 0], [0, FACE], [FACE, FACE]], np.float32)
        moved = A.transform_points(A.transform_points(corners, A.invert_matrix(m68)), mn)
        assert np.abs(moved - corners).max() < 0.03 * FACE


def test_five_point_framing_matches_the_reference_33_point_fit(t1_faces):
    for f in t1_faces:
        m5 = A.alignment_matrix(f.landmarks, FACE, 0.4, 0.07)
        mref = A.alignment_matrix(f.landmarks, FACE, 0.4, 0.07, reference=True)
        # Same crop centre (within 3% of the crop), scale (10%) and rotation (6 degrees).
        c5 = A.transform_points([[FACE / 2, FACE / 2]], A.invert_matrix(m5))[0]
        cref = A.transform_points([[FACE / 2, FACE / 2]], A.invert_matrix(mref))[0]
        s5, sref = np.hypot(*m5[0, :2]), np.hypot(*mref[0, :2])
        assert np.linalg.norm(c5 - cref) * s5 < 0.03 * FACE
        assert abs(s5 / sref - 1) < 0.1
        ang = np.degrees(np.arctan2(m5[1, 0], m5[0, 0]) - np.arctan2(mref[1, 0], mref[0, 0]))
        assert abs(ang) < 6


def test_eyes_land_on_the_template(t1, t1_faces):
    tpl = A.template_in_crop(FACE, ALIGN.padding, ALIGN.shift)
    assert tpl[0, 0] < FACE / 2 < tpl[1, 0] and tpl[0, 1] < FACE / 2 < tpl[3, 1]
    for f in t1_faces:
        af = A.align(t1, f, ALIGN)
        assert af.crop.shape == (FACE, FACE, 3) and af.crop.dtype == np.uint8
        assert af.matrix.shape == (2, 3) and af.matrix.dtype == np.float32
        assert af.landmarks.shape == (68, 2) and af.kps5.shape == (5, 2)
        assert np.allclose(af.kps5, A.five_points(af.landmarks), atol=1e-3)
        err = np.linalg.norm(af.kps5 - tpl, axis=1)
        # The least-squares fit puts the five points on the template up to the face's own shape/pose.
        assert err.mean() < 0.06 * FACE
        yaw, _, _ = A.head_pose(f.landmarks)
        if abs(yaw) < 25:
            assert err[:2].max() < 0.04 * FACE
        # The crop really is the image under the matrix: a landmark's pixel matches.
        x, y = af.landmarks[30].round().astype(int)
        ix, iy = f.landmarks[30].round().astype(int)
        assert np.abs(af.crop[y, x].astype(int) - t1[iy, ix]).max() < 40


def test_aligned_face_is_redetected_centred_with_the_framing(hog, t1, t1_faces):
    for f in t1_faces:
        af = A.align(t1, f, ALIGN)
        found = hog.detect(af.crop)
        assert found, "HOG lost the face after alignment"
        box = found[0].box
        centre = (box[:2] + box[2:]) / 2
        # Whole-face framing: the face (HOG box ~ brows to chin) is central, a bit below the middle
        # because the crop is shifted toward the forehead, and fills about half the crop.
        assert abs(centre[0] - FACE / 2) < 0.1 * FACE
        assert -0.02 * FACE < centre[1] - FACE / 2 < 0.15 * FACE
        assert 0.4 * FACE < found[0].size < 0.8 * FACE
        assert _iou(box, af.face_box) > 0.5
        # Detector landmarks in the crop agree with the mapped ones.
        assert A.landmark_displacement(af.landmarks, found[0].landmarks) < 0.15


def test_alignment_undoes_rotation(hog, astronaut):
    base = hog.detect(astronaut)[0]
    c0 = A.align(astronaut, base, ALIGN)
    h, w = astronaut.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0)
    rotated = cv2.warpAffine(astronaut, rot, (w, h), flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REFLECT)
    found = hog.detect(rotated)
    assert found
    f = max(found, key=lambda x: _iou(x.box, A.box_through(base.box, rot)))
    c1 = A.align(rotated, f, ALIGN)
    assert np.abs(c0.crop.astype(int) - c1.crop).mean() < 6.0
    # Matrices agree: crop(rotated(p)) ~ crop(p).
    composed = c1.matrix.astype(np.float64) @ np.vstack([rot, [0, 0, 1]])
    pts = np.array([[0, 0], [FACE, 0], [0, FACE], [FACE, FACE]], np.float64)
    a = A.transform_points(A.transform_points(pts, A.invert_matrix(c0.matrix)), composed)
    assert np.abs(a - pts).max() < 0.05 * FACE
    roll0, roll1 = A.head_pose(base.landmarks)[2], A.head_pose(f.landmarks)[2]
    assert -28 < roll1 - roll0 < -12  # counter-clockwise image rotation = negative roll


def test_warp_border_modes_and_points_roundtrip(astronaut):
    m = np.array([[1.0, 0.0, 20.0], [0.0, 1.0, 20.0]], np.float32)  # crop x, y < 20: outside the image
    white = A.warp_to_crop(astronaut, m, 64, border="constant")
    assert np.all(white[:18, :18] == 255) and np.array_equal(white[30:, 30:], astronaut[10:44, 10:44])
    mirrored = A.warp_to_crop(astronaut, m, 64, border="reflect")
    assert mirrored[:18, :18].std() > 5 and np.array_equal(mirrored[30:, 30:], astronaut[10:44, 10:44])
    pts = np.array([[10.5, 20.25], [300, 40]], np.float32)
    assert np.allclose(A.transform_points(A.transform_points(pts, m), A.invert_matrix(m)), pts, atol=1e-3)


# --- pose and displacement ---------------------------------------------------------------------------------


def test_head_pose_template_is_frontal_and_flip_negates_yaw(hog, t1, t1_faces):
    yaw, pitch, roll = A.head_pose(A.TEMPLATE_5 * 200 + 50)
    assert abs(yaw) < 1 and abs(pitch) < 3 and abs(roll) < 1
    flipped = np.ascontiguousarray(t1[:, ::-1])
    w = t1.shape[1]
    ff = hog.detect(flipped)
    checked = 0
    for f in t1_faces:
        mirror_box = np.array([w - f.box[2], f.box[1], w - f.box[0], f.box[3]])
        g = max(ff, key=lambda x: _iou(x.box, mirror_box))
        assert _iou(g.box, mirror_box) > 0.6
        y0, _, r0 = A.head_pose(f.landmarks)
        y1, _, r1 = A.head_pose(g.landmarks)
        if abs(y0) > 10:
            assert np.sign(y1) == -np.sign(y0) and abs(y0 + y1) < 0.5 * abs(y0) + 5
            checked += 1
        if abs(r0) > 8:
            assert np.sign(r1) == -np.sign(r0)
        # The mirrored detection, mirrored back (and left/right swapped), is the same face.
        back = g.landmarks.copy()
        back[:, 0] = w - back[:, 0]
        p = A.five_points(back)[[1, 0, 2, 4, 3]]
        assert A.landmark_displacement(A.five_points(f.landmarks), p) < 0.12
    assert checked >= 3  # t1 has several turned heads


def test_landmark_displacement(t1_faces):
    a = t1_faces[0].landmarks
    assert A.landmark_displacement(a, a) == 0
    iod = np.linalg.norm(A.five_points(a)[1] - A.five_points(a)[0])
    assert A.landmark_displacement(a, a + [iod * 0.1, 0]) == pytest.approx(0.1, rel=1e-3)
    assert A.landmark_displacement(t1_faces[0].landmarks, t1_faces[1].landmarks) > 1.0
    assert A.landmark_displacement(np.zeros((5, 2)), np.ones((5, 2)), face_size=10) == pytest.approx(np.sqrt(2) / 10)
