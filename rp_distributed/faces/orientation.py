"""EXIF orientation: the frame a side table's coordinates are given in.

A JPEG from a phone is often stored sideways with an EXIF orientation tag (2-8) saying how to turn it for display.
The pipeline decodes every image upright (``io.decode_image`` applies the tag), so the faces it writes are found
and pasted in the upright frame. A face annotation table made by a tool that read the stored pixels (PIL without
``exif_transpose``, many labelling exports) gives its boxes in the stored frame; one made on the displayed image
gives them upright. The two cannot be told apart from the numbers, and a box in the wrong frame lands beside the
face, which is then written untouched. So the table's frame must be stated (``input.annotations_frame``) as soon
as an annotated input carries an orientation other than 1; an image that needs it and lacks it is withheld.
"""

from __future__ import annotations

import numpy as np

from .align import box_through, transform_points
from .annotated import AnnotatedFaces, faces_from_rows
from .types import DetectedFace

TRANSPOSED = (5, 6, 7, 8)  # orientations whose stored image is the upright one with width and height swapped
MIRRORING = (2, 4, 5, 7)  # orientations that mirror the stored image (left and right swap sides)
# Landmarks are listed image-left first (5 points: eye centres, nose tip, mouth corners; 68: dlib's order). In a
# mirrored frame the same face's points are listed from its other side: re-listed after mapping.
MIRROR_5 = [1, 0, 2, 4, 3]
MIRROR_68 = (list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
             + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40] + list(range(54, 47, -1))
             + [59, 58, 57, 56, 55] + list(range(64, 59, -1)) + [67, 66, 65])


def stored_to_upright(orientation: int, stored_w: int, stored_h: int) -> np.ndarray:
    """(2, 3) affine matrix taking stored-frame coordinates (pixel edges: 0 to width) to the upright frame that
    ``PIL.ImageOps.exif_transpose`` produces for EXIF ``orientation`` (1-8)."""
    w, h = float(stored_w), float(stored_h)
    return np.array({
        1: [[1, 0, 0], [0, 1, 0]],
        2: [[-1, 0, w], [0, 1, 0]],  # mirrored left-right
        3: [[-1, 0, w], [0, -1, h]],  # turned 180 degrees
        4: [[1, 0, 0], [0, -1, h]],  # mirrored top-bottom
        5: [[0, 1, 0], [1, 0, 0]],  # transposed
        6: [[0, -1, h], [1, 0, 0]],  # turned 90 degrees clockwise for display
        7: [[0, -1, h], [-1, 0, w]],  # transversed
        8: [[0, 1, 0], [-1, 0, w]],  # turned 90 degrees counter-clockwise for display
    }[int(orientation)], np.float64)


def annotated_faces(value, shape: tuple[int, ...], orientation: int, frame: str | None) -> tuple[AnnotatedFaces,
                                                                                              str | None]:
    """The faces an image's annotation rows give, in the upright frame of its decoded ``shape``, and a reason to
    withhold the image (None when there is none).

    ``orientation``: the EXIF orientation its stored pixels had; ``frame``: ``input.annotations_frame`` (stored,
    upright, or None: not stated). With ``stored`` the rows are checked against the stored image's size and their
    boxes and landmarks mapped upright; with ``upright`` (or orientation 1) they are taken as they are."""
    if orientation == 1 or frame == "upright":
        return faces_from_rows(value, shape), None
    if frame is None:
        return AnnotatedFaces([], [], [], []), (
            f"EXIF orientation {orientation}: the image is stored turned or mirrored and input.annotations_frame is "
            "not set: state whether the table's boxes are in the stored pixel frame (stored) or in the frame as "
            "displayed (upright)")
    h, w = shape[:2]
    stored_w, stored_h = (h, w) if orientation in TRANSPOSED else (w, h)
    found = faces_from_rows(value, (stored_h, stored_w))
    m = stored_to_upright(orientation, stored_w, stored_h)
    found.faces = [DetectedFace(box=box_through(f.box, m), score=f.score,
                                landmarks=_upright_points(f.landmarks, m, orientation)) for f in found.faces]
    found.notes = found.notes + [f"annotations in the stored frame of EXIF orientation {orientation}: mapped upright"]
    return found, None


def _upright_points(points: np.ndarray, m: np.ndarray, orientation: int) -> np.ndarray:
    """Landmarks (none, 5 or 68) mapped by ``m``, re-listed image-left first when the orientation mirrors."""
    if not len(points):
        return points
    moved = transform_points(points, m)
    if orientation in MIRRORING:
        moved = moved[MIRROR_5 if len(moved) == 5 else MIRROR_68]
    return moved
