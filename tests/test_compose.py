import cv2
import numpy as np
import pytest

from rp_distributed import compose, destructive
from rp_distributed.config import AnonymizerConfig


def _similarity(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]],
                    np.float32)


def test_paste_back_changes_only_the_face_region(t1_rgb):
    m = _similarity(12, 1.7, -300, -40)  # image -> crop
    size = 256
    crop = cv2.warpAffine(t1_rgb, m, (size, size), flags=cv2.INTER_LANCZOS4)
    face_box = np.array([80, 70, 176, 190], np.float32)
    new_crop = 255 - crop
    out = compose.paste_back(t1_rgb, new_crop, m, face_box, feather=0.1)
    changed = np.any(out != t1_rgb, axis=2)
    assert changed.sum() > 3000
    # Every changed pixel maps inside the crop's feathered face mask; everything else is byte-identical.
    inv = cv2.invertAffineTransform(m.astype(np.float64))
    mask = compose.face_mask(size, face_box, 0.1)
    support = cv2.warpAffine((mask > 0).astype(np.uint8), inv, (t1_rgb.shape[1], t1_rgb.shape[0]),
                             flags=cv2.INTER_NEAREST)
    support = cv2.dilate(support, np.ones((5, 5), np.uint8))
    assert not np.any(changed & (support == 0))
    # The face centre took the new crop's pixels.
    cx, cy = (face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2
    ix, iy = (inv @ np.array([cx, cy, 1.0])).round().astype(int)
    expected = cv2.warpAffine(new_crop, m, (t1_rgb.shape[1], t1_rgb.shape[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    assert np.abs(out[iy, ix].astype(int) - expected[iy, ix].astype(int)).max() <= 2


def test_face_mask_covers_the_detected_box_fully():
    box = np.array([40, 50, 120, 150], np.float32)
    m = compose.face_mask(200, box, 0.08)
    x0, y0, x1, y1 = box.astype(int)
    assert m[y0:y1, x0:x1].min() == 1.0
    assert m[0, 0] == 0.0 and 0 < m.mean() < 1


def test_feather_is_smooth():
    m = compose.face_mask(256, np.array([64, 64, 192, 192], np.float32), 0.15)
    row = m[128]
    assert np.abs(np.diff(row)).max() < 0.1  # no hard edge


@pytest.mark.parametrize("method", ["blur", "pixelate", "mask"])
def test_destructive_methods_remove_detail(t1_rgb, method):
    crop = np.ascontiguousarray(t1_rgb[40:168, 300:428])
    box = np.array([20, 20, 108, 108], np.float32)
    out = destructive.destroy(method, crop, box, AnonymizerConfig())
    assert out.shape == crop.shape and out.dtype == np.uint8
    face_in, face_out = crop[20:108, 20:108], out[20:108, 20:108]
    if method == "pixelate":  # a few flat blocks across the face
        cells = AnonymizerConfig().pixelate_blocks
        assert len(np.unique(face_out.reshape(-1, 3), axis=0)) <= (cells + 2) ** 2
        assert len(np.unique(face_in.reshape(-1, 3), axis=0)) > 10 * (cells + 2) ** 2
    else:
        lap = lambda im: cv2.Laplacian(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
        assert lap(face_out) < 0.2 * lap(face_in)


def test_destroy_box_touches_only_the_enlarged_box(t1_rgb):
    box = np.array([100, 50, 160, 130], np.float32)
    out = destructive.destroy_box(t1_rgb, box, "mask", AnonymizerConfig())
    changed = np.argwhere(np.any(out != t1_rgb, axis=2))
    assert changed[:, 1].min() >= 100 - 18 and changed[:, 1].max() < 160 + 18
    assert changed[:, 0].min() >= 50 - 24 and changed[:, 0].max() < 130 + 24
    assert np.all(out[60:120, 110:150] == 0)
