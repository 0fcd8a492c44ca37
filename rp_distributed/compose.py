"""Merge anonymized face crops back into the full image.

The crop was cut from the image with a similarity transform ``M`` (image -> crop). We warp the new crop
back with ``M``'s inverse and blend it through a feathered ellipse around the face: 1 over the face, a
smooth ramp to 0 outside it. Pixels where the mask is 0 are never written, so everything away from the
faces stays byte-identical.

Two guarantees on the detected boxes (``apply_faces``): every pixel of every box is anonymized, the crop's
wholly or, where a tight framing (``alignment.padding``) left part of the box outside the crop, the face's
destructive method on the image; and no face writes in another face's box (``BoxOwners``).
"""

from __future__ import annotations

import cv2
import numpy as np

from .destructive import DESTRUCTIVE, Window, destroy_box, destroyed
from .faults import describe
from .records import Applied, Where

# Semi-axes of the blend ellipse as fractions of the detected face box's width and height. At these
# sizes the whole detected box (corners included) lies inside the part of the mask that is exactly 1.
ELLIPSE_AXES = (0.72, 0.80)


def face_mask(size: int, face_box: np.ndarray, feather: float) -> np.ndarray:
    """Float32 SxS mask in crop coordinates: 1 on the face ellipse, ramping to 0 over ``feather``·face."""
    x0, y0, x1, y1 = [float(v) for v in face_box]
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    core = np.zeros((size, size), np.uint8)
    cv2.ellipse(core, (round(cx), round(cy)), (round(ELLIPSE_AXES[0] * w), round(ELLIPSE_AXES[1] * h)),
                0, 0, 360, 1, thickness=-1)
    ramp_px = feather * max(w, h)
    if ramp_px < 1:
        return core.astype(np.float32)
    dist = cv2.distanceTransform((1 - core).astype(np.uint8), cv2.DIST_L2, 5)
    t = np.clip(1.0 - dist / ramp_px, 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep: no visible seam


def _window(mask: np.ndarray, inv: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Image-space bounding window (x0, y0, x1, y1) of the mask's support, clipped to the image."""
    ys, xs = np.nonzero(mask > 0)
    if xs.size == 0:
        return None
    corners = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1],
                        [xs.max() + 1, ys.max() + 1]], np.float64)
    pts = corners @ inv[:, :2].T + inv[:, 2]
    h, w = shape
    x0, y0 = np.floor(pts.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    return int(x0), int(y0), int(x1), int(y1)


# A blend weight this close to 1 leaves less than half a level of the image under the crop: after rounding the pixel
# is the crop's exactly. Such weights are set to 1 (bilinear warping of a mask of ones gives 0.99999994).
FULL_ALPHA = 1.0 - 1.0 / 512



def paste_back(image: np.ndarray, crop: np.ndarray, matrix: np.ndarray, face_box: np.ndarray,
               feather: float, out: np.ndarray | None = None, writable=None) -> np.ndarray:
    """Blend ``crop`` (the anonymized aligned crop) into ``image`` through the face mask.

    Writes into ``out`` (which may be ``image`` itself) or, when None, into a copy; returns it. ``writable``:
    optional ``window -> bool mask`` of the pixels this face may write (``BoxOwners.writable``)."""
    if out is None:
        out = image.copy()
    elif out is not image:
        out[...] = image
    _paste(out, crop, matrix, face_box, feather, writable)
    return out


def _paste(out: np.ndarray, crop: np.ndarray, matrix: np.ndarray, face_box: np.ndarray, feather: float,
           writable=None) -> tuple[Window, np.ndarray] | None:
    """``paste_back`` in place; returns (window, bool mask of the window's pixels that are now the crop's exactly),
    or None when the crop reaches no pixel of the image."""
    size = crop.shape[0]
    mask = face_mask(size, face_box, feather)
    inv = cv2.invertAffineTransform(matrix.astype(np.float64))
    win = _window(mask, inv, out.shape[:2])
    if win is None:
        return None
    x0, y0, x1, y1 = win
    # dst(x, y) = src(M · (x + x0, y + y0)): shift M's translation into the window.
    m = matrix.astype(np.float64).copy()
    m[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)
    dsize = (x1 - x0, y1 - y0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(crop, m, dsize, flags=flags, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    alpha = cv2.warpAffine(mask, m, dsize, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = np.clip(alpha, 0.0, 1.0)
    alpha[alpha >= FULL_ALPHA] = 1.0
    if writable is not None:
        alpha *= writable(win)
    region = out[y0:y1, x0:x1].astype(np.float32)
    a3 = alpha[:, :, None]
    blended = np.rint(region * (1 - a3) + warped * a3).clip(0, 255).astype(np.uint8)
    touched = np.broadcast_to(a3 > 0, blended.shape)
    out[y0:y1, x0:x1] = np.where(touched, blended, out[y0:y1, x0:x1])
    return win, alpha == 1.0


# --- who writes where --------------------------------------------------------------------------------------

def box_pixels(box: np.ndarray, shape: tuple[int, ...]) -> Window:
    """The image pixels a face box touches (columns floor(x0) to ceil(x1), rows likewise), clipped to the image:
    the pixels the coverage guarantee is about."""
    h, w = shape[:2]
    x0, y0, x1, y1 = [float(v) for v in box]
    xa, ya = min(max(int(np.floor(x0)), 0), w), min(max(int(np.floor(y0)), 0), h)
    return xa, ya, max(min(int(np.ceil(x1)), w), xa), max(min(int(np.ceil(y1)), h), ya)


def _local(rect: Window, win: Window) -> tuple[slice, slice] | None:
    """``rect`` as slices of ``win``'s array, or None when they do not meet."""
    x0, y0, x1, y1 = max(rect[0], win[0]), max(rect[1], win[1]), min(rect[2], win[2]), min(rect[3], win[3])
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0 - win[1], y1 - win[1]), slice(x0 - win[0], x1 - win[0])


class BoxOwners:
    """Which face holds each pixel of the faces' boxes, so that no face's paste lands in another face's box.

    Each face's crop was cut from the original image and anonymized at that face's own scale: pasted over a
    neighbour's box it would bring the neighbour's original pixels back under a weaker treatment (a small face's
    light blur, or background regenerated as it was). So a face writes (its paste, its fallback) outside every
    other face's box, and inside its own box where no earlier face's box is; where boxes overlap, the first face
    (faces come largest first: the strongest destructive treatment) holds the overlap."""

    def __init__(self, boxes: list, shape: tuple[int, ...]):
        self.rects = [box_pixels(b, shape) for b in boxes]
        self._array = np.array(self.rects, np.int64).reshape(-1, 4)

    def writable(self, i: int, win: Window) -> np.ndarray:
        """Bool mask over ``win``: where face ``i`` may write."""
        shape = (win[3] - win[1], win[2] - win[0])
        earlier, later = np.zeros(shape, bool), np.zeros(shape, bool)
        r = self._array  # only the boxes that meet the window (a crowd has many faces, each meets few)
        near = np.flatnonzero((r[:, 0] < win[2]) & (r[:, 2] > win[0]) & (r[:, 1] < win[3]) & (r[:, 3] > win[1]))
        for j in near[near != i]:
            loc = _local(self.rects[j], win)
            if loc is not None:
                (earlier if j < i else later)[loc] = True
        own = _local(self.rects[i], win)
        if own is not None:
            later[own] = False
        return ~(earlier | later)

    def held(self, i: int) -> tuple[Window, np.ndarray]:
        """Face ``i``'s box pixels, and the bool mask over them of those it holds (no earlier face's box)."""
        rect = self.rects[i]
        return rect, self.writable(i, rect)


def apply_faces(image: np.ndarray, faces: list, feather: float, anon_cfg) -> str | None:
    """Put every face's anonymized crop into ``image`` (in place), fail closed.

    Each face writes only where ``BoxOwners`` lets it (never in another face's box). A face with no anonymized
    crop, or whose paste-back fails, gets ``anon_cfg.fallback`` on its box in the image itself. Then every box
    pixel a face holds that its crop did not reach wholly (a framing, ``alignment.padding``, too tight for the
    box) gets the face's destructive method there (``_fill_unreached``): the whole of every box is anonymized.
    Returns a reason when some face could not be anonymized: the image must then be withheld.
    """
    owners = BoxOwners([f.box for f in faces], image.shape)
    reached: dict[int, tuple[Window, np.ndarray] | None] = {}
    withheld = None
    for k, f in enumerate(faces):
        writable = lambda win, k=k: owners.writable(k, win)  # noqa: E731
        if f.anon_crop is not None:
            try:
                reached[k] = _paste(image, f.anon_crop, f.matrix, f.face_box, feather, writable)
                continue
            except Exception as exc:  # noqa: BLE001 - fail closed: destroy the box in the image itself
                f.add_error(f"merge failed: {describe(exc)}")
        if not f.face_error:
            f.add_error("no anonymized crop")
        try:
            destroy_box(image, f.box, anon_cfg.fallback, anon_cfg, out=image, writable=writable)
            f.method_applied = Applied(anon_cfg.fallback, Where.IMAGE_BOX)
        except Exception as exc:  # noqa: BLE001
            withheld = f"face {f.face_index} could not be anonymized: {describe(exc)}"[:500]
            f.method_applied = None
    for k, reach in reached.items():  # after every paste: the fill reads the anonymized canvas, not the original
        f = faces[k]
        try:
            _fill_unreached(image, f, owners.held(k), reach, anon_cfg)
        except Exception as exc:  # noqa: BLE001
            withheld = f"face {f.face_index}: its box could not be covered: {describe(exc)}"[:500]
    return withheld


def _fill_unreached(image: np.ndarray, f, held: tuple[Window, np.ndarray], reach, anon_cfg) -> None:
    """The pixels of face ``f``'s box that it holds and that its paste did not make the crop's exactly get the
    face's destructive method (its own: blur, pixelate or mask; reverse personalization's: the fallback), applied
    to the enlarged box of the image as it is now. Says so in the face's ``face_error``."""
    rect, need = held
    need = need.copy()
    if reach is not None:
        win, full = reach
        inner, outer = _local(win, rect), _local(rect, win)
        if inner is not None:
            need[inner] &= ~full[outer]
    if not need.any():
        return
    own = f.method_applied
    method = own.method if own is not None and own.method in DESTRUCTIVE and own.where is Where.CROP else anon_cfg.fallback
    done = destroyed(image, f.box, method, anon_cfg, 0.3)
    (xa, ya, xb, yb), pixels = done  # the enlarged box holds the box: never None when a box pixel is needed
    region = image[rect[1]:rect[3], rect[0]:rect[2]]
    region[need] = pixels[_local(rect, (xa, ya, xb, yb))][need]
    f.add_error(f"{need.mean():.1%} of its box lay beyond its aligned crop (alignment.padding too small for "
                f"this face): {method} on those pixels")


def replace_whole(image: np.ndarray, faces: list, anon_cfg) -> str | None:
    """``input.mode: aligned``: the image is the face. Its anonymized crop, brought back to the image's size
    (``faces.align.crop_to_image``: the centre padding cut off), replaces every pixel, in place; a face with no
    anonymized crop, or whose crop cannot be brought back, gets ``anon_cfg.fallback`` on the whole image.
    Returns a reason when even that failed: the image must then be withheld."""
    from .faces.align import crop_to_image

    h, w = image.shape[:2]
    withheld = None
    for f in faces:
        if f.anon_crop is not None:
            try:
                image[...] = crop_to_image(f.anon_crop, image.shape)
                continue
            except Exception as exc:  # noqa: BLE001 - fail closed: destroy the whole image
                f.add_error(f"merge failed: {describe(exc)}")
        if not f.face_error:
            f.add_error("no anonymized crop")
        try:
            destroy_box(image, np.array([0, 0, w, h], np.float32), anon_cfg.fallback, anon_cfg, margin=0.0, out=image)
            f.method_applied = Applied(anon_cfg.fallback, Where.WHOLE_IMAGE)
        except Exception as exc:  # noqa: BLE001
            withheld = f"face {f.face_index} could not be anonymized: {describe(exc)}"[:500]
            f.method_applied = None
    return withheld
