"""Alignment to the reference "whole face" framing, for 68- or 5-point landmarks.

Reference (the paper's public code, after DeepFaceLab's ``get_transform_mat``): a similarity (Umeyama)
maps the 68-point brow/eye/nose/mouth-corner landmarks onto a canonical mean face living in the unit
square; the crop is that square grown by ``padding`` (side ``1 + 2*sqrt(2)*padding`` squares), moved up
by ``shift`` of a square side (toward the forehead), warped with Lanczos.

Here the similarity is fitted on five points (eye centres, nose tip, mouth corners) against the same
mean face's five points, so 68-point (dlib, face_alignment) and 5-point (insightface) backends give the
same crop; ``alignment_matrix(..., reference=True)`` uses the reference 33-point fit for 68 points.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import DetectedFace

# DeepFaceLab's mean face (``landmarks_2D_new``): 68-point indices 17..48 and 54, unit-square coordinates.
MEAN_FACE_33 = np.array(
    [
        [0.000213256, 0.106454], [0.0752622, 0.038915], [0.18113, 0.0187482], [0.29077, 0.0344891],
        [0.393397, 0.0773906], [0.586856, 0.0773906], [0.689483, 0.0344891], [0.799124, 0.0187482],
        [0.904991, 0.038915], [0.98004, 0.106454],  # 17-26 brows
        [0.490127, 0.203352], [0.490127, 0.307009], [0.490127, 0.409805], [0.490127, 0.515625],  # 27-30
        [0.36688, 0.587326], [0.426036, 0.609345], [0.490127, 0.628106], [0.554217, 0.609345],
        [0.613373, 0.587326],  # 31-35 nose base
        [0.121737, 0.216423], [0.187122, 0.178758], [0.265825, 0.179852], [0.334606, 0.231733],
        [0.260918, 0.245099], [0.182743, 0.244077],  # 36-41 image-left eye
        [0.645647, 0.231733], [0.714428, 0.179852], [0.793132, 0.178758], [0.858516, 0.216423],
        [0.79751, 0.244077], [0.719335, 0.245099],  # 42-47 image-right eye
        [0.254149, 0.780233],  # 48 mouth corner
        [0.726104, 0.780233],  # 54 mouth corner
    ],
    dtype=np.float64,
)
REFERENCE_INDICES = np.r_[17:49, 54]


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """(5, 2) float32 in insightface order: eye centres (image left, right), nose tip, mouth corners.

    From 68 points: eye centres = means of 36-41 / 42-47, nose tip 30, mouth corners 48 / 54.
    """
    lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if lm.shape[0] == 5:
        return lm.astype(np.float32)
    if lm.shape[0] == 68:
        return np.stack(
            [lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]
        ).astype(np.float32)
    raise ValueError(f"expected 68 or 5 landmarks, got {lm.shape[0]}")


def _mean_face_68_subset(idx: list[int]) -> np.ndarray:
    return MEAN_FACE_33[[int(np.where(REFERENCE_INDICES == i)[0][0]) for i in idx]]


# The canonical 5-point template: the mean face's own five points (unit square, y down).
TEMPLATE_5 = np.stack(
    [
        _mean_face_68_subset(list(range(36, 42))).mean(0),
        _mean_face_68_subset(list(range(42, 48))).mean(0),
        _mean_face_68_subset([30])[0],
        _mean_face_68_subset([48])[0],
        _mean_face_68_subset([54])[0],
    ]
)


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity (rotation, uniform scale, translation; no reflection) src -> dst."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1
    r = u @ np.diag(d) @ vt
    var = (sc**2).sum() / n
    if var <= 0:
        raise ValueError("degenerate landmarks: all points coincide")
    scale = float((s * d).sum() / var)
    m = np.zeros((2, 3))
    m[:, :2] = scale * r
    m[:, 2] = mu_d - scale * r @ mu_s
    return m


def _to_unit_square(landmarks: np.ndarray, reference: bool) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if reference and lm.shape[0] == 68:
        return umeyama(lm[REFERENCE_INDICES], MEAN_FACE_33)
    return umeyama(five_points(lm), TEMPLATE_5)


def crop_side_in_units(padding: float) -> float:
    """Crop side in mean-face unit squares (the reference's ``mod * sqrt(2)``)."""
    return 1.0 + 2.0 * np.sqrt(2.0) * padding


def alignment_matrix(
    landmarks: np.ndarray,
    face_size: int,
    padding: float = 0.40,
    shift: float = 0.07,
    reference: bool = False,
) -> np.ndarray:
    """(2, 3) float32 similarity image -> ``face_size`` crop with the whole-face framing.

    ``landmarks``: (68, 2) or (5, 2) image points. The mean-face unit square is centred, grown so its
    side is ``1 + 2*sqrt(2)*padding`` units, and moved ``shift`` units toward the forehead.
    ``reference=True`` fits 68 points with the reference's 33-point subset instead of five points.
    """
    to_unit = _to_unit_square(landmarks, reference)
    side = crop_side_in_units(padding)
    centre = np.array([0.5, 0.5 - shift])
    k = face_size / side
    unit_to_crop = np.array([[k, 0.0, face_size / 2 - k * centre[0]], [0.0, k, face_size / 2 - k * centre[1]]])
    m = unit_to_crop[:, :2] @ to_unit[:, :2]
    t = unit_to_crop[:, :2] @ to_unit[:, 2] + unit_to_crop[:, 2]
    return np.hstack([m, t[:, None]]).astype(np.float32)


def template_in_crop(face_size: int, padding: float = 0.40, shift: float = 0.07) -> np.ndarray:
    """Where the 5-point template lands in a ``face_size`` crop (eye centres, nose, mouth corners)."""
    side = crop_side_in_units(padding)
    k = face_size / side
    return ((TEMPLATE_5 - [0.5, 0.5 - shift]) * k + face_size / 2).astype(np.float32)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, 2) float32 points mapped by a (2, 3) affine matrix."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    m = np.asarray(matrix, dtype=np.float64)
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def invert_matrix(matrix: np.ndarray) -> np.ndarray:
    """The inverse (2, 3) affine (crop -> image)."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64)).astype(np.float32)


def warp_to_crop(
    image: np.ndarray,
    matrix: np.ndarray,
    size: int,
    border: str = "reflect",
    border_value: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """The ``size`` x ``size`` uint8 crop of ``image`` under ``matrix`` (image -> crop), Lanczos.

    ``border``: "reflect" (mirror the image past its edges) or "constant" (``border_value``; the reference
    uses white).
    """
    mode = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}[border]
    img = np.ascontiguousarray(image)
    out = cv2.warpAffine(
        img,
        np.asarray(matrix, dtype=np.float64),
        (int(size), int(size)),
        flags=cv2.INTER_LANCZOS4,
        borderMode=mode,
        borderValue=tuple(int(v) for v in border_value),
    )
    if out.ndim == 2 and img.ndim == 3:
        out = out[..., None]
    return out.astype(np.uint8, copy=False)


@dataclass
class AlignedFace:
    crop: np.ndarray  # (S, S, 3) uint8
    matrix: np.ndarray  # (2, 3) float32, image -> crop
    kps5: np.ndarray  # (5, 2) float32, crop coordinates
    landmarks: np.ndarray  # (K, 2) float32, crop coordinates (the detector's landmarks)
    face_box: np.ndarray  # (4,) float32, crop coordinates: bounding box of the mapped detection box

    @property
    def size(self) -> int:
        return int(self.crop.shape[0])

    @property
    def inverse(self) -> np.ndarray:
        """(2, 3) crop -> image."""
        return invert_matrix(self.matrix)


def box_through(box: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Axis-aligned bounds of a box's four corners under ``matrix``."""
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).reshape(4)
    corners = transform_points(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), matrix)
    return np.concatenate([corners.min(0), corners.max(0)]).astype(np.float32)


def align(image: np.ndarray, face: DetectedFace, cfg, border: str = "reflect") -> AlignedFace:
    """Warp ``face`` of an RGB ``image`` to a ``cfg.face_size`` whole-face crop (``cfg``: AlignmentConfig)."""
    m = alignment_matrix(face.landmarks, cfg.face_size, cfg.padding, cfg.shift)
    crop = warp_to_crop(image, m, cfg.face_size, border=border)
    return AlignedFace(
        crop=crop,
        matrix=m,
        kps5=transform_points(five_points(face.landmarks), m),
        landmarks=transform_points(face.landmarks, m),
        face_box=box_through(face.box, m),
    )


# --- head pose -------------------------------------------------------------------------------------

# Generic 3D face (camera-style axes: x right, y down, z away from the camera; nose tip at the origin),
# in the insightface 5-point order: eye centres, nose tip, mouth corners. Units ~ mm * 10.
_MODEL_5 = np.array(
    [[-165.0, -170.0, 135.0], [165.0, -170.0, 135.0], [0.0, 0.0, 0.0], [-150.0, 150.0, 125.0], [150.0, 150.0, 125.0]]
)
_MODEL_IOD = 330.0


def head_pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 68 or 5 image points, via PnP on a generic 3D 5-point face.

    Signs (image axes): yaw > 0 when the face turns toward image right (the nose moves right), pitch > 0
    when it tilts down, roll > 0 for a clockwise in-plane rotation (in image view). A frontal face gives
    about (0, 0, 0); a mirrored image negates yaw and roll.
    """
    pts = five_points(landmarks).astype(np.float64)
    iod = float(np.linalg.norm(pts[1] - pts[0]))
    if iod < 1e-6:
        raise ValueError("degenerate landmarks: the eyes coincide")
    centre = pts.mean(0)
    focal = 12.0 * iod  # a normal lens: the face is a few tenths of the frame
    cam = np.array([[focal, 0, centre[0]], [0, focal, centre[1]], [0, 0, 1]], dtype=np.float64)
    rvec = np.zeros((3, 1))
    tvec = np.array([[0.0], [0.0], [focal * _MODEL_IOD / iod]])
    ok, rvec, tvec = cv2.solvePnP(
        _MODEL_5, pts, cam, None, rvec=rvec, tvec=tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE
    )
    if not ok:
        raise ValueError("head pose: solvePnP failed")
    r, _ = cv2.Rodrigues(rvec)
    # r = Rz(roll) @ Ry(yaw) @ Rx(pitch)
    pitch = np.degrees(np.arctan2(r[2, 1], r[2, 2]))
    yaw = np.degrees(np.arctan2(-r[2, 0], np.hypot(r[2, 1], r[2, 2])))
    roll = np.degrees(np.arctan2(r[1, 0], r[0, 0]))
    return float(-yaw), float(pitch), float(roll)


def landmark_displacement(a: np.ndarray, b: np.ndarray, face_size: float | None = None) -> float:
    """Mean distance between corresponding five points of ``a`` and ``b``, in inter-ocular distances of ``a``.

    ``face_size`` (the side of the crop the points live in, or any length) is the normaliser only when
    ``a``'s eyes coincide.
    """
    pa, pb = five_points(a).astype(np.float64), five_points(b).astype(np.float64)
    iod = float(np.linalg.norm(pa[1] - pa[0]))
    norm = iod if iod > 1e-6 else float(face_size or 0.0)
    if norm <= 0:
        raise ValueError("landmark_displacement: degenerate landmarks and no face_size")
    return float(np.linalg.norm(pa - pb, axis=1).mean() / norm)


# --- aligned inputs (input.mode: aligned): the whole image is the crop ------------------------------

def whole_image_crop(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(crop, matrix): the whole ``image`` as a ``size`` x ``size`` crop, and the (2, 3) image -> crop matrix.

    A non-square image is centre-padded to a square first (its edge mirrored, as ``align``'s border), so faces
    keep their proportions; ``crop_to_image`` cuts the padding off again. Shrinking uses area averaging (no
    aliasing), enlarging Lanczos."""
    h, w = image.shape[:2]
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    square = cv2.copyMakeBorder(np.ascontiguousarray(image), top, side - h - top, left, side - w - left,
                                cv2.BORDER_REFLECT_101) if side != min(h, w) else np.ascontiguousarray(image)
    interp = cv2.INTER_AREA if size < side else cv2.INTER_LANCZOS4
    crop = square if size == side else cv2.resize(square, (size, size), interpolation=interp)
    k = size / side
    matrix = np.array([[k, 0.0, left * k], [0.0, k, top * k]], np.float32)
    return crop.astype(np.uint8, copy=False), matrix


def crop_to_image(crop: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``whole_image_crop``: ``crop`` resized back to the square and the padding cut off, an
    image of ``shape[:2]``."""
    h, w = shape[:2]
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    size = crop.shape[0]
    interp = cv2.INTER_AREA if side < size else cv2.INTER_LANCZOS4
    square = crop if side == size else cv2.resize(np.ascontiguousarray(crop), (side, side), interpolation=interp)
    return np.ascontiguousarray(square[top:top + h, left:left + w])


def template_box_in_crop(face_size: int, padding: float = 0.40, shift: float = 0.07) -> np.ndarray:
    """(4,) float32: the mean face's unit square (brows to below the mouth) in a ``face_size`` crop with this
    framing: the face box of an aligned crop whose keypoints are the template's (``template_in_crop``)."""
    k = face_size / crop_side_in_units(padding)
    lo = (np.array([0.0, 0.0]) - [0.5, 0.5 - shift]) * k + face_size / 2
    hi = (np.array([1.0, 1.0]) - [0.5, 0.5 - shift]) * k + face_size / 2
    return np.concatenate([lo, hi]).astype(np.float32)
