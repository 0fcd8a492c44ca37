"""The destructive methods (blur, pixelate, mask), each on an aligned crop and on a region of the image itself (the
fail-closed path for a face without a crop to paste). One class per method, found by name in ``DESTRUCTIVE``."""

from __future__ import annotations

import cv2
import numpy as np


def _face_side(face_box: np.ndarray) -> float:
    x0, y0, x1, y1 = face_box
    return float(max(x1 - x0, y1 - y0, 1.0))


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of ``sigma`` px, computed where it is cheap.

    A face's blur is wide (sigma ~84 px on a 1024-px crop): a direct kernel of ~500 taps costs ~4 s a face on one
    core. A blur that wide leaves no detail finer than sigma, so it is computed on a copy shrunk to ~4 px per sigma
    and scaled back, within 2 grey levels of the direct one (tests/test_destructive.py) at about a millisecond."""
    step = int(sigma // 4)
    if step < 2:
        return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    h, w = image.shape[:2]
    small_w, small_h = max(1, round(w / step)), max(1, round(h / step))
    small = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
    scale = w / small_w
    # Shrinking (a box of `scale` px) and the linear enlargement blur too: take their variance off the kernel's.
    small_sigma = max(sigma * sigma - scale * scale / 4, 1.0) ** 0.5 / scale
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=small_sigma, sigmaY=small_sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def blur(crop: np.ndarray, face_box: np.ndarray, strength: float) -> np.ndarray:
    return gaussian_blur(crop, max(strength * _face_side(face_box), 1.0))


MIN_CELL_PX = 3  # a pixelation cell narrower than this leaves pixels (a region of 9 px at 10 cells: all of them)


def _cells(blocks: int, side: int) -> int:
    """Cells across ``side`` px: ``blocks``, but never cells under ``MIN_CELL_PX`` (a tiny face would come back
    through a resize to about its own size untouched)."""
    return max(1, min(blocks, side // MIN_CELL_PX))


def pixelate(crop: np.ndarray, face_box: np.ndarray, blocks: int) -> np.ndarray:
    size = crop.shape[0]
    cells = _cells(max(2, round(blocks * size / _face_side(face_box))), size)
    small = cv2.resize(crop, (cells, cells), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST)


def mask(crop: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    out = np.empty_like(crop)
    out[:] = np.asarray(color, np.uint8)
    return out


class Blur:
    name = "blur"

    def crop(self, crop: np.ndarray, face_box: np.ndarray, cfg) -> np.ndarray:
        return blur(crop, face_box, cfg.blur_strength)

    def region(self, region: np.ndarray, cfg) -> np.ndarray:
        h, w = region.shape[:2]
        return blur(region, np.array([0, 0, w, h], np.float32), cfg.blur_strength)


class Pixelate:
    name = "pixelate"

    def crop(self, crop: np.ndarray, face_box: np.ndarray, cfg) -> np.ndarray:
        return pixelate(crop, face_box, cfg.pixelate_blocks)

    def region(self, region: np.ndarray, cfg) -> np.ndarray:
        h, w = region.shape[:2]
        cells = max(2, cfg.pixelate_blocks)
        across, down = _cells(cells, w), _cells(max(2, round(cells * h / max(w, h))), h)
        small = cv2.resize(region, (across, down), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


class Mask:
    name = "mask"

    def crop(self, crop: np.ndarray, face_box: np.ndarray, cfg) -> np.ndarray:
        return mask(crop, cfg.mask_color)

    def region(self, region: np.ndarray, cfg) -> np.ndarray:
        return mask(region, cfg.mask_color)


DESTRUCTIVE = {m.name: m for m in (Blur(), Pixelate(), Mask())}


def _method(name: str):
    try:
        return DESTRUCTIVE[name]
    except KeyError:
        raise ValueError(f"unknown destructive method {name!r}") from None


def destroy(method: str, crop: np.ndarray, face_box: np.ndarray, cfg) -> np.ndarray:
    """Apply the destructive ``method`` to an aligned crop, with an ``AnonymizerConfig``."""
    return _method(method).crop(crop, face_box, cfg)


Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels, exclusive end


def destroyed(image: np.ndarray, box: np.ndarray, method: str, cfg, margin: float) -> tuple[Window, np.ndarray] | None:
    """``method`` applied to the (enlarged) box of ``image``: (window, its new pixels), or None when the box lies
    outside the image. ``image`` is not changed."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = [float(v) for v in box]
    mw, mh = margin * (x1 - x0), margin * (y1 - y0)
    xa, ya = max(int(np.floor(x0 - mw)), 0), max(int(np.floor(y0 - mh)), 0)
    xb, yb = min(int(np.ceil(x1 + mw)), w), min(int(np.ceil(y1 + mh)), h)
    if xa >= xb or ya >= yb:
        return None
    return (xa, ya, xb, yb), _method(method).region(np.ascontiguousarray(image[ya:yb, xa:xb]), cfg)


def destroy_box(image: np.ndarray, box: np.ndarray, method: str, cfg, margin: float = 0.3,
                out: np.ndarray | None = None, writable=None) -> np.ndarray:
    """Fail-closed path: apply ``method`` to the (enlarged) box directly in the image.

    Writes into ``out`` (which may be ``image`` itself) or, when None, into a copy; returns it. ``writable``:
    optional ``window -> bool mask`` of the pixels this face may write (``compose.BoxOwners.writable``)."""
    if out is None:
        out = image.copy()
    elif out is not image:
        out[...] = image
    done = destroyed(out, box, method, cfg, margin)
    if done is None:
        return out
    (xa, ya, xb, yb), pixels = done
    if writable is None:
        out[ya:yb, xa:xb] = pixels
    else:
        keep = writable((xa, ya, xb, yb))
        out[ya:yb, xa:xb][keep] = pixels[keep]
    return out
