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
from rp_distributed.faces.backends import (
    ModelFilesMissing,
    make_face,
    postprocess,
    tile_grid,
    touches_inner_edge,
)


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


def test_threshold_filter_and_largest_first(t1, t1_faces):
    det = build_detector(DetectionConfig(backend="dlib", threshold=0.9))
    faces = det.detect(t1)
    strong = sorted([f for f in t1_faces if f.score >= 0.9], key=lambda f: -f.size)
    assert 0 < len(faces) < len(t1_faces) and all(f.score >= 0.9 for f in faces)
    assert [tuple(f.box) for f in faces] == [tuple(f.box) for f in strong]
    # The shared post-processing alone: threshold, empty boxes out, largest first, nothing cut.
    empty = DetectedFace(box=np.array([5, 5, 5, 9], np.float32), score=3.0, landmarks=np.zeros((68, 2), np.float32))
    kept = postprocess(list(reversed(t1_faces)) + [empty], threshold=1.0)
    assert [f.size for f in kept] == sorted((f.size for f in t1_faces if f.score >= 1.0), reverse=True)
    assert len(postprocess(list(t1_faces), threshold=-10)) == len(t1_faces)


def test_detect_returns_every_face_whatever_max_faces(t1, t1_faces):
    """max_faces is the pipeline's budget for the requested method, never a cut in the detector: a
    dropped face would leave the image unanonymized there."""
    faces = build_detector(DetectionConfig(backend="dlib", max_faces=2)).detect(t1)
    assert len(faces) == len(t1_faces) == 6
    assert [tuple(f.box) for f in faces] == [tuple(f.box) for f in t1_faces]


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
    det = build_detector(DetectionConfig(backend="insightface", model="buffalo_l", model_dir=str(tmp_path), threshold=0.7))
    img = np.zeros((480, 640, 3), np.uint8)
    img[200:300, 300:400] = 255  # a bright square: the only place scoring above 0.7
    faces = det.detect(img)
    assert faces  # (the toy model's fixed boxes overlap little: several survive SCRFD's NMS, all kept)
    for f in faces:
        assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
        assert f.score >= 0.7
        cx, cy = (f.box[:2] + f.box[2:]) / 2
        assert 280 <= cx <= 420 and 180 <= cy <= 320
        x0, y0, x1, y1 = f.box
        assert np.all((f.landmarks[:, 0] >= x0) & (f.landmarks[:, 0] <= x1))
        assert f.landmarks[0, 0] < f.landmarks[1, 0]  # insightface order kept
    assert det.detect(np.zeros((480, 640, 3), np.uint8)) == []


def _squares(shape, corners, side=20):
    img = np.zeros(shape, np.uint8)
    for x, y in corners:
        img[y:y + side, x:x + side] = 255
    return img


def test_insightface_large_image_goes_through_tiles_mapped_back(tmp_path):
    """20 px bright squares in a 3000x2400 image: SCRFD's 640 px whole-image pass shrinks them to 4 px
    and sees nothing; the tiles (scale 1) find each one, in image coordinates."""
    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    _tiny_scrfd(pack / "det_10g.onnx")
    cfg = dict(backend="insightface", model="buffalo_l", model_dir=str(tmp_path), threshold=0.7)
    det = build_detector(DetectionConfig(**cfg))
    shape = (2400, 3000, 3)
    tiles = det.tiles(shape)
    edge = tiles[0][2]  # the first tile's right edge: an inner edge
    corners = [(40, 40), (2940, 2340), (1500, 1200), (edge - 10, 600), (2500, 300), (300, 2100)]
    img = _squares(shape, corners)
    faces = det.detect(img)
    centres = np.array([[x + 10, y + 10] for x, y in corners], np.float32)
    for f in faces:  # every detection lies on a square (none shifted by a tile offset)...
        c = (f.box[:2] + f.box[2:]) / 2
        assert np.linalg.norm(centres - c, axis=1).min() < 20, f.box
        x0, y0, x1, y1 = f.box
        assert np.all((f.landmarks[:, 0] >= x0) & (f.landmarks[:, 0] <= x1))
        assert np.all((f.landmarks[:, 1] >= y0) & (f.landmarks[:, 1] <= y1))
    for c in centres:  # ...and every square is found
        assert any(np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - c) < 20 for f in faces), c
    # The toy model's boxes around one square vary in size (20-64 px), so a tile's box and the coarse
    # pass's may overlap by less than the merge IoU: at most one duplicate per square survives.
    assert len(faces) <= 2 * len(corners)
    assert postprocess(det._detect(img), 0.7) == []  # the old single whole-image pass sees none


def test_insightface_tiles_a_mid_size_photo_whose_resize_hides_min_size_faces(tmp_path):
    """A 1900 px photo is below tile_above_px, but SCRFD's 640 px resize turns a 20 px face into 7 px:
    it is tiled because a min_face_size face would be invisible to the whole-image pass."""
    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    _tiny_scrfd(pack / "det_10g.onnx")
    cfg = dict(backend="insightface", model="buffalo_l", model_dir=str(tmp_path), threshold=0.7)
    det = build_detector(DetectionConfig(**cfg))  # min_face_size 24, tile_above_px 2000
    shape = (1400, 1900, 3)
    assert max(shape[:2]) <= det.cfg.tile_above_px and det.needs_tiles(shape)
    corners = [(100, 100), (1700, 1200), (950, 700)]
    faces = det.detect(_squares(shape, corners))
    for x, y in corners:
        assert any(np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - (x + 10, y + 10)) < 20 for f in faces), (x, y)
    # Where min_face_size faces survive the resize, the image is not tiled (no extra cost).
    assert not build_detector(DetectionConfig(**cfg, min_face_size=64)).needs_tiles(shape)
    assert build_detector(DetectionConfig(**cfg, min_face_size=64)).detect(_squares(shape, corners)) == []


# --- face_alignment backend ------------------------------------------------------------------------------


def test_face_alignment_missing_weights_names_folder_and_backend(tmp_path):
    with pytest.raises(ModelFilesMissing) as err:
        build_detector(DetectionConfig(backend="face_alignment", model="sfd", model_dir=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path) in msg and "face_alignment" in msg and "s3fd" in msg and "2DFAN4" in msg


def _random_fa_checkpoints(ckpt: Path) -> None:
    """Random-weight SFD (made never to fire: background wins everywhere) and FAN checkpoints."""
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    from rp_distributed.faces.face_alignment_backend import checkpoint_names

    names = checkpoint_names()
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


def test_face_alignment_loads_weights_from_the_folder_without_downloading(tmp_path, astronaut):
    """Random-weight checkpoints in a TORCH_HOME layout: the backend builds from them (no network here)."""
    import torch

    ckpt = tmp_path / "weights"  # flat: the checkpoint files directly in model_dir
    _random_fa_checkpoints(ckpt)
    hub_before = torch.hub.get_dir()
    det = build_detector(DetectionConfig(backend="face_alignment", model="sfd", model_dir=str(ckpt)))
    assert det.checkpoint_dir == ckpt
    assert torch.hub.get_dir() == hub_before  # torch's hub dir is restored
    assert det.detect(cv2.resize(astronaut, (128, 128))) == []


def test_face_alignment_large_image_goes_through_tiles_mapped_back(tmp_path):
    """SFD runs at native resolution: a large image is cut into tiles (bounded memory) plus a coarse pass
    at tile_above_px. The backend's own pass is replaced by a stand-in that finds bright squares, so the
    shared tiling, the coarse rescale and the coordinate mapping run for real."""
    ckpt = tmp_path / "weights"
    _random_fa_checkpoints(ckpt)
    det = build_detector(DetectionConfig(backend="face_alignment", model="sfd", model_dir=str(ckpt)))
    seen: list[tuple[int, ...]] = []

    def squares(image):
        seen.append(image.shape)
        n, _, stats, _ = cv2.connectedComponentsWithStats((image[..., 0] > 127).astype(np.uint8))
        out = []
        for x, y, w, h, _ in stats[1:]:
            grid = np.stack(np.meshgrid(np.linspace(0.1, 0.9, 17), np.linspace(0.2, 0.8, 4)), -1).reshape(68, 2)
            out.append(make_face([x, y, x + w, y + h], 1.0, grid * [w, h] + [x, y], image.shape))
        return out

    det._detect = squares
    shape = (2400, 3000, 3)
    tiles = det.tiles(shape)
    corners = [(40, 40), (2940, 2340), (1500, 1200), (tiles[0][2] - 4, 600), (300, tiles[0][3] - 4)]
    faces = det.detect(_squares(shape, corners))
    assert len(seen) == 1 + len(tiles) and max(seen[0][:2]) == 2000  # the coarse pass, then each tile
    assert all(max(s[:2]) <= 1024 for s in seen[1:])
    assert len(faces) == len(corners)  # partial squares at inner tile edges dropped, duplicates merged
    for x, y in corners:
        truth = np.array([x, y, x + 20, y + 20], np.float32)
        f = max(faces, key=lambda f: _iou(f.box, truth))
        assert _iou(f.box, truth) > 0.8
        assert np.all((f.landmarks >= truth[:2] - 1) & (f.landmarks <= truth[2:] + 1))


@pytest.mark.parametrize("layout", ["", "checkpoints", "hub/checkpoints"])
def test_face_alignment_checkpoint_layouts(tmp_path, layout):
    from rp_distributed.faces.face_alignment_backend import (
        checkpoint_names,
        resolve_checkpoints,
    )

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


# --- large images: a coarse whole-image pass plus magnified, overlapping tiles --------------------------------


def test_tile_grid_covers_the_image_and_holds_every_small_box():
    rng = np.random.default_rng(0)
    for h, w, side, overlap in [(3000, 4000, 1024, 160), (2400, 3000, 640, 200), (700, 5000, 1024, 64)]:
        tiles = tile_grid(h, w, side, overlap)
        covered = np.zeros((h, w), bool)
        for x0, y0, x1, y1 in tiles:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and x1 - x0 <= side and y1 - y0 <= side
            covered[y0:y1, x0:x1] = True
        assert covered.all()
        # A face up to the overlap (less the edge margin) lies in some tile clear of its inner edges, so
        # dropping partial faces at inner edges never drops a face.
        for _ in range(300):
            n = overlap - 6
            bx, by = rng.integers(0, w - n), rng.integers(0, h - n)
            box = np.array([bx, by, bx + n, by + n], np.float32)
            assert any(
                t[0] <= bx and t[1] <= by and bx + n <= t[2] and by + n <= t[3]
                and not touches_inner_edge(box - [t[0], t[1], t[0], t[1]], t, h, w)
                for t in tiles
            )
    assert tile_grid(500, 800, 1024, 160) == [(0, 0, 800, 500)]
    tile = (100, 0, 300, 200)  # an inner left edge, the image's top edge
    assert touches_inner_edge(np.array([1, 50, 40, 90]), tile, 1000, 1000)
    assert not touches_inner_edge(np.array([10, 0, 40, 40]), tile, 1000, 1000)
    assert touches_inner_edge(np.array([150, 50, 199.5, 90]), tile, 1000, 1000)


def _canvas(t1, scale, size, offset, background=None):
    """t1 shrunk by ``scale`` (INTER_AREA) and pasted at ``offset`` into a ``size`` (w, h) canvas: a
    natural photo stretched to that size, or gray."""
    w, h = size
    if background is None:
        img = np.full((h, w, 3), 128, np.uint8)
    else:
        img = cv2.resize(_skimage(background), (w, h), interpolation=cv2.INTER_CUBIC)
    small = cv2.resize(t1, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ox, oy = offset
    img[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    return img


def _placed(t1_faces, scale, offset) -> list[np.ndarray]:
    """t1's own detections, scaled and moved as ``_canvas`` placed the photo."""
    ox, oy = offset
    return [f.box * scale + np.array([ox, oy, ox, oy], np.float32) for f in t1_faces]


def _assert_found(faces, expected):
    """One detection per expected box (IoU > 0.45), nothing else, landmarks on the face, largest first."""
    assert len(faces) == len(expected), [f.box for f in faces]
    assert [f.size for f in faces] == sorted((f.size for f in faces), reverse=True)
    matched = set()
    for e in expected:
        i = max(range(len(faces)), key=lambda k: _iou(faces[k].box, e))
        assert _iou(faces[i].box, e) > 0.45, (e, faces[i].box)
        matched.add(i)
    assert len(matched) == len(expected)
    for f in faces:
        x0, y0, x1, y1 = f.box
        inner = f.landmarks[27:]  # nose, eyes, mouth
        assert np.all((inner[:, 0] > x0) & (inner[:, 0] < x1) & (inner[:, 1] > y0) & (inner[:, 1] < y1))
        p = A.five_points(f.landmarks)
        assert p[0, 0] < p[1, 0] and max(p[0, 1], p[1, 1]) < p[2, 1]


# t1 at 0.25: its faces are 22-33 px. The whole-image HOG pass at upsample 1 (what every image got before
# tiling) sees them at 44-66 px, under dlib's 80 px window, and finds 3 of 6 (measured; at 0.30-0.36 it
# finds 5 or 6 of 6 depending on the exact scale, too close to call for a test). Tiles magnified 3x see
# them at 66-99 px and find all six. The offsets put the group across inner tile edges.
SMALL = 0.25


def test_dlib_tiles_find_small_faces_across_tile_edges_and_merge_big_ones(t1, t1_faces):
    """A 2000x1200 image tiled like a 12 MP one (smaller thresholds, to stay fast): t1 at full size (big
    faces: coarse pass and tiles both see them, one detection each must remain) and t1 at 0.25."""
    cfg = dict(backend="dlib", tile_above_px=1000, tile_px=512)
    small_at = (1500, 300)
    img = _canvas(t1, SMALL, (2000, 1200), small_at)
    img[40:40 + t1.shape[0], 40:40 + t1.shape[1]] = t1
    det = build_detector(DetectionConfig(**cfg))
    assert any(1500 < t[0] < 1820 or 1500 < t[2] < 1820 for t in det.tiles(img.shape))  # an edge through the group
    expected = _placed(t1_faces, 1.0, (40, 40)) + _placed(t1_faces, SMALL, small_at)
    _assert_found(det.detect(img), expected)
    whole = build_detector(DetectionConfig(**{**cfg, "tile_above_px": 10_000})).detect(img)
    assert len(whole) < 12  # the old single pass


@pytest.mark.slow
def test_small_faces_in_a_12_mp_photo(t1, t1_faces):
    """The hole: a 4000x3000 photo with 22-33 px faces used to come out as no/too few faces."""
    offset = (2200, 1300)  # across the inner edges of the default 1024 px tiles
    img = _canvas(t1, SMALL, (4000, 3000), offset, background="rocket.jpg")
    det = build_detector(DetectionConfig(backend="dlib"))
    tiles = det.tiles(img.shape)
    assert len(tiles) > 1 and any(2200 < t[0] < 2520 or 2200 < t[2] < 2520 for t in tiles)
    _assert_found(det.detect(img), _placed(t1_faces, SMALL, offset))
    # That one pass over the whole photo misses them is shown on the smaller canvas above (``whole``), at a third of
    # the cost of showing it again here.


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
