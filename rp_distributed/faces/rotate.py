"""Rotated copies of an image for detectors that only see upright faces, and the way back.

``rotated(image, angle)`` turns the image ``angle`` degrees counter-clockwise (as displayed) on a canvas grown
to hold all of it, and returns the (2, 3) matrix image -> copy. A face found in the copy comes back with
``face_back``: landmarks through the inverse matrix exactly; the box as the axis-aligned bounds of the ellipse
inscribed in the copy's box, turned back (a face is an oval: the bounds of the box's four corners would be
up to 41% wider than the face at 45 degrees).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .types import DetectedFace


def rotation_matrix(height: int, width: int, angle: float) -> tuple[np.ndarray, tuple[int, int]]:
    """(2, 3) float64 matrix image -> rotated copy, and the copy's (width, height): ``angle`` degrees
    counter-clockwise about the centre, translated so the whole image lands inside the copy."""
    m = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), float(angle), 1.0)
    c, s = abs(m[0, 0]), abs(m[0, 1])
    out_w = int(math.ceil(height * s + width * c - 1e-6))
    out_h = int(math.ceil(height * c + width * s - 1e-6))
    m[0, 2] += out_w / 2.0 - width / 2.0
    m[1, 2] += out_h / 2.0 - height / 2.0
    return m, (out_w, out_h)


def rotated(image: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(copy, matrix image -> copy). Right angles are exact pixel transposes; others are bilinear, with the
    corners outside the image mirrored (a black wedge would be an edge a detector could key on)."""
    h, w = image.shape[:2]
    m, (out_w, out_h) = rotation_matrix(h, w, angle)
    quarter = round(float(angle) / 90.0)
    if abs(float(angle) - 90.0 * quarter) < 1e-9:
        copy = np.ascontiguousarray(np.rot90(image, quarter % 4))
        # rot90's pixel grid: pixel centres map exactly; fix the matrix to the array's own convention.
        m = _right_angle_matrix(h, w, quarter % 4)
        return copy, m
    copy = cv2.warpAffine(image, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return copy, m


def _right_angle_matrix(h: int, w: int, quarter: int) -> np.ndarray:
    """The matrix of ``np.rot90(image, quarter)`` on pixel-edge coordinates (a box's x1 is exclusive)."""
    if quarter == 0:
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    if quarter == 1:  # counter-clockwise: (x, y) -> (y, w - x)
        return np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, float(w)]])
    if quarter == 2:
        return np.array([[-1.0, 0.0, float(w)], [0.0, -1.0, float(h)]])
    return np.array([[0.0, -1.0, float(h)], [1.0, 0.0, 0.0]])  # clockwise: (x, y) -> (h - y, x)


def ellipse_bounds(centre: np.ndarray, half_w: float, half_h: float, angle: float) -> np.ndarray:
    """(4,) axis-aligned bounds of an ellipse with semi-axes ``half_w``, ``half_h`` turned ``angle`` degrees."""
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    ex = math.sqrt((half_w * c) ** 2 + (half_h * s) ** 2)
    ey = math.sqrt((half_w * s) ** 2 + (half_h * c) ** 2)
    return np.array([centre[0] - ex, centre[1] - ey, centre[0] + ex, centre[1] + ey], np.float32)


def box_back(box: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """A box of the rotated copy, as the bounds of its inscribed ellipse in the image (``matrix``: image ->
    copy, a rotation)."""
    inv = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    x0, y0, x1, y1 = (float(v) for v in box)
    centre = inv[:, :2] @ np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + inv[:, 2]
    angle = math.degrees(math.atan2(inv[1, 0], inv[0, 0]))
    return ellipse_bounds(centre, (x1 - x0) / 2, (y1 - y0) / 2, angle)


def face_back(face: DetectedFace, matrix: np.ndarray, image_shape: tuple[int, ...]) -> DetectedFace:
    """``face`` found in the rotated copy, in image pixels (box clipped to the image)."""
    inv = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    lm = np.asarray(face.landmarks, np.float64).reshape(-1, 2)
    landmarks = (lm @ inv[:, :2].T + inv[:, 2]).astype(np.float32)
    box = box_back(face.box, matrix)
    h, w = image_shape[:2]
    box[[0, 2]] = np.clip(box[[0, 2]], 0, w)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, h)
    return DetectedFace(box=box, score=face.score, landmarks=landmarks, found_by=face.found_by)
