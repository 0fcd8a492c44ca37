"""Annotation tables of photos stored turned or mirrored (EXIF orientation 2-8): ``input.annotations_frame``.

The photos are t1.jpg (six people, 1280x886: not square, so a width/height mix-up shows) stored the way a camera
stores them: the pixels turned or mirrored, and an EXIF orientation tag saying how to undo that for display
(as tests/conftest.py's exif_rotated.jpg). The pipeline decodes them upright. Where each upright pixel lies in the
stored image is found with PIL's own transposes (an index image moved like the photo), not with our mapping.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rp_distributed import annotations, compose
from rp_distributed.anonymizer import Anonymizer
from rp_distributed.config import (
    DetectionConfig,
    anonymization_fingerprint,
    anonymization_settings,
    load_config,
)
from rp_distributed.faces import build_detector
from rp_distributed.records import ImageRow
from rp_distributed.stages.detect import DetectFaces

T = Image.Transpose
# What PIL.ImageOps.exif_transpose applies to the stored image for each orientation; the camera did the inverse.
SHOW = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
        7: T.TRANSVERSE, 8: T.ROTATE_90}
UNDO = {T.ROTATE_90: T.ROTATE_270, T.ROTATE_270: T.ROTATE_90}
MIRRORING = (2, 4, 5, 7)
# dlib's 68 points listed image-left first; on a mirrored image the same face's points swap sides.
MIRROR_68 = (list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
             + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40] + list(range(54, 47, -1))
             + [59, 58, 57, 56, 55] + list(range(64, 59, -1)) + [67, 66, 65])


def store(upright: np.ndarray, orientation: int, path) -> np.ndarray:
    """Write ``upright`` as a camera would store it with this EXIF orientation; returns the stored pixels."""
    im = Image.fromarray(upright)
    if orientation != 1:
        im = im.transpose(UNDO.get(SHOW[orientation], SHOW[orientation]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, "JPEG", quality=95, exif=exif)
    return np.asarray(im)


def stored_pixel(orientation: int, shape) -> callable:
    """upright pixel (x, y) -> the stored pixel (xs, ys) it comes from, by moving an index image as the photo."""
    h, w = shape[:2]
    index = Image.fromarray(np.arange(h * w, dtype=np.int32).reshape(h, w))
    moved = np.asarray(index if orientation == 1 else index.transpose(UNDO.get(SHOW[orientation], SHOW[orientation])))
    where = np.empty(h * w, np.int64)
    where[moved.ravel()] = np.arange(moved.size)
    return lambda x, y: (int(where[int(y) * w + int(x)] % moved.shape[1]), int(where[int(y) * w + int(x)] // moved.shape[1]))


def to_stored(face, orientation: int, shape) -> dict:
    """A table row for ``face`` (upright) in the stored frame: box corners and points moved pixel by pixel (within
    a pixel), landmarks listed image-left first in the stored image."""
    at = stored_pixel(orientation, shape)
    x0, y0, x1, y1 = (float(v) for v in face.box)
    corners = [at(x, y) for x in (x0, x1 - 1) for y in (y0, y1 - 1)]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    points = np.array([[c + 0.5 for c in at(x, y)] for x, y in face.landmarks])
    if orientation in MIRRORING:
        points = points[MIRROR_68]
    return {"x0": min(xs), "y0": min(ys), "x1": max(xs) + 1, "y1": max(ys) + 1, "landmarks": points.ravel().tolist()}


def _cfg(tmp_path, *extra):
    return load_config(None, ["anonymizer.method=blur", "alignment.face_size=128", "input.mode=annotations",
                              f"input.annotations={tmp_path / 'faces.parquet'}", "input.annotations_missing=skip",
                              *extra])


def _process(cfg, paths: dict, rows: list[dict]) -> dict:
    """Each input through the detection stage with its table rows joined in as the plan joins them."""
    pq.write_table(pa.Table.from_pylist(rows), cfg.input.annotations)
    listing = pa.table({"input_uri": [str(p) for p in paths.values()], "rel_path": list(paths)})
    planned, orphans = annotations.attach(cfg, listing)
    assert not orphans
    stage = DetectFaces.from_config(cfg)
    return {r["rel_path"]: stage.process(ImageRow.of({**r, "output_uri": "x", "error": None, "notes": None,
                                          "stale_output_uri": None})) for r in planned.to_pylist()}


@pytest.fixture(scope="module")
def upright_faces(t1_rgb):
    """t1's six faces, found by dlib on the upright photo (68 points each)."""
    faces = build_detector(DetectionConfig(backend="dlib")).detect(t1_rgb)
    assert len(faces) == 6
    return faces


def test_an_annotated_photo_stored_turned_is_withheld_until_the_table_frame_is_stated(tmp_path, t1_rgb,
                                                                                      upright_faces):
    """Without input.annotations_frame a table cannot be placed on a photo stored turned: before, its stored-frame
    boxes were used as upright ones and the faces written untouched beside them. Now the image is withheld and
    says why; a photo with no orientation is unaffected; stated, the table is used."""
    paths = {"turned.jpg": tmp_path / "turned.jpg", "plain.jpg": tmp_path / "plain.jpg"}
    store(t1_rgb, 6, paths["turned.jpg"])
    store(t1_rgb, 1, paths["plain.jpg"])
    rows = ([{"path": "turned.jpg", **to_stored(f, 6, t1_rgb.shape)} for f in upright_faces]
            + [{"path": "plain.jpg", **to_stored(f, 1, t1_rgb.shape)} for f in upright_faces])
    got = _process(_cfg(tmp_path), paths, rows)
    turned, plain = got["turned.jpg"], got["plain.jpg"]
    assert turned.status == "withheld" and turned.payload.faces == []
    assert "EXIF orientation 6" in turned.error and "input.annotations_frame" in turned.error
    assert plain.pending and len(plain.payload.faces) == 6
    stated = _process(_cfg(tmp_path, "input.annotations_frame=stored"), paths, rows)
    assert all(r.pending and len(r.payload.faces) == 6 for r in stated.values())
    # The frame decides which pixels are anonymized: in the settings fingerprint when set (a rerun redoes the
    # images), left out when unset (fingerprints of earlier configs are kept).
    prints = {anonymization_fingerprint(_cfg(tmp_path, *x)) for x in
              ((), ("input.annotations_frame=stored",), ("input.annotations_frame=upright",))}
    assert len(prints) == 3 and "annotations_frame" not in anonymization_settings(_cfg(tmp_path))["input"]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_frame_boxes_and_landmarks_land_on_the_faces(orientation, tmp_path, t1_rgb, upright_faces):
    """``stored``: each row's box and 68 landmarks are mapped into the upright frame, onto the face they name
    (within the pixel the table was given to), and the faces are what the written image anonymizes."""
    path = tmp_path / "t.jpg"
    store(t1_rgb, orientation, path)
    rows = [{"path": "t.jpg", **to_stored(f, orientation, t1_rgb.shape)} for f in upright_faces]
    row = _process(_cfg(tmp_path, "input.annotations_frame=stored"), {"t.jpg": path}, rows)["t.jpg"]
    assert row.pending and (row.height, row.width) == t1_rgb.shape[:2]
    faces = sorted(row.payload.faces, key=lambda f: (f.box[0], f.box[1]))
    want = sorted(upright_faces, key=lambda f: (f.box[0], f.box[1]))
    for f, w in zip(faces, want, strict=True):
        assert np.abs(f.box - w.box).max() <= 1.0, (f.box, w.box)
        assert np.abs(f.landmarks - w.landmarks).max() <= 1.0  # the same points, in the same order
    image, _ = row.payload.pixels(10**8)
    written = image.copy()
    cfg = _cfg(tmp_path)
    Anonymizer.from_config(cfg)(row.payload.faces)
    assert compose.apply_faces(written, row.payload.faces, cfg.merge.feather, cfg.anonymizer) is None
    for w in upright_faces:  # every real face is blurred in the upright image
        x0, y0, x1, y1 = (int(v) for v in w.box)
        assert np.abs(written[y0:y1, x0:x1].astype(int) - image[y0:y1, x0:x1].astype(int)).mean() > 8


def test_a_table_made_by_a_detector_on_mirrored_stored_pixels_maps_back(tmp_path, t1_rgb, upright_faces):
    """A labelling tool that read the stored pixels of a mirrored photo (orientation 2) lists each face's points
    image-left first in that frame: mapped upright they must come back in the upright order (dlib on the stored
    pixels here is that tool)."""
    path = tmp_path / "m.jpg"
    stored = store(t1_rgb, 2, path)
    found = build_detector(DetectionConfig(backend="dlib")).detect(stored)
    assert len(found) == 6
    rows = [{"path": "m.jpg", "x0": float(f.box[0]), "y0": float(f.box[1]), "x1": float(f.box[2]),
             "y1": float(f.box[3]), "landmarks": f.landmarks.ravel().tolist()} for f in found]
    row = _process(_cfg(tmp_path, "input.annotations_frame=stored"), {"m.jpg": path}, rows)["m.jpg"]
    faces = sorted(row.payload.faces, key=lambda f: f.box[0])
    for f, w in zip(faces, sorted(upright_faces, key=lambda f: f.box[0]), strict=True):
        assert np.abs(f.landmarks - w.landmarks).mean() < 4.0  # dlib on mirrored pixels: a few px apart at most
