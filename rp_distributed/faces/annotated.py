"""An image's own rows of the side tables, on the worker (the plan joined them into its row; ``annotations``
reads and joins the tables on the driver): the faces its annotation rows give, checked against the decoded image,
and the attribute prompt each face gets from its prompt rows. A bad row is reported in the image's notes, or, when
it names a face that cannot be located, withholds the image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends import box_iou as iou
from .types import DetectedFace

BOX = ("x0", "y0", "x1", "y1")


def _absent(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and np.isnan(v))


def table_rows(value) -> list[dict]:
    """A plan cell as Ray hands it (an array of dicts, a list, or None) as a list of dicts, a null field as None
    (however the conversion spelled it: None or NaN)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [{k: None if _absent(v) else v for k, v in dict(r).items()} for r in list(value)]


@dataclass
class AnnotatedFaces:
    faces: list[DetectedFace]  # in image px, largest first (as detectors give them)
    needs_landmarks: list[bool]  # per face: the row had no usable landmarks (predict them in the box)
    notes: list[str]  # rows reported and ignored, one reason per row
    unlocatable: list[str]  # rows naming a face we cannot place: the image must be withheld


def faces_from_rows(value, shape: tuple[int, ...]) -> AnnotatedFaces:
    """The faces an image's annotation rows give, checked against its decoded ``shape``.

    A box wholly outside the image is reported and ignored (no face of this image is there); one partly outside
    is clipped; landmarks that are not 5 or 68 points are reported and the face aligned from its box. A row whose
    box is missing or not a box is a face we know of and cannot locate: ``unlocatable`` (withhold the image)."""
    h, w = shape[:2]
    faces, needs, notes, bad = [], [], [], []
    for r in table_rows(value):
        row = int(r["row"])
        problems = r["error"].split("; ") if r.get("error") else []
        if any(p.split("=", 1)[0] in BOX for p in problems):  # a box cell that is not a number
            bad.append(f"annotations row {row}: {r['error']}")
            continue
        box = np.array([r.get(k) if r.get(k) is not None else np.nan for k in BOX], np.float64)
        if not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
            bad.append(f"annotations row {row}: box {box.tolist()} is not a box (x0 < x1, y0 < y1)")
            continue
        if box[2] <= 0 or box[3] <= 0 or box[0] >= w or box[1] >= h:
            notes.append(f"annotations row {row}: box {_fmt(box)} lies outside the {w}x{h} image: ignored")
            continue
        clipped = np.array([max(box[0], 0), max(box[1], 0), min(box[2], w), min(box[3], h)])
        if not np.array_equal(clipped, box):
            notes.append(f"annotations row {row}: box {_fmt(box)} clipped to the {w}x{h} image")
        lm = r.get("landmarks")
        lm = None if lm is None else np.asarray(list(lm), np.float64)
        need = lm is None
        if lm is not None and (lm.size not in (10, 136) or not np.isfinite(lm).all()):
            notes.append(f"annotations row {row}: landmarks have {lm.size} values (need 10 or 136 finite "
                         "numbers: 5 or 68 x,y points): aligned from the box")
            lm, need = None, True
        if r.get("error"):
            notes.append(f"annotations row {row}: {r['error']}")
        score = r.get("score")
        score = 1.0 if score is None or not np.isfinite(score) else float(score)
        faces.append(DetectedFace(box=clipped.astype(np.float32), score=score,
                                  landmarks=(lm.reshape(-1, 2) if lm is not None else np.zeros((0, 2))).astype(np.float32)))
        needs.append(need)
    order = sorted(range(len(faces)), key=lambda i: (-faces[i].size, -faces[i].score))  # as detectors sort
    return AnnotatedFaces([faces[i] for i in order], [needs[i] for i in order], notes, bad)


def _fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


UNSET = object()  # no table row names this face


def prompts_for_faces(value, boxes: list[np.ndarray], box_iou: float) -> tuple[list, list[str]]:
    """Per face (``boxes`` in image px, in face order): the table's prompt, or ``UNSET`` when no row names it;
    and the notes of rows reported (an error in the row, a face index or box that names no face).

    A row with ``face_index`` names that face; one with a box names the face it overlaps most (IoU at least
    ``box_iou``); one with neither names every face of the image. The most specific row wins."""
    return values_for_faces(value, boxes, box_iou, "prompt", "prompts")


def values_for_faces(value, boxes: list[np.ndarray], box_iou: float, column: str, table: str) -> tuple[list, list[str]]:
    """``prompts_for_faces`` for any side table: each face's ``column`` value; ``table`` names it in notes."""
    n = len(boxes)
    by_index: dict[int, str] = {}
    by_box: dict[int, tuple[float, str]] = {}
    whole: str | object = UNSET
    notes = []
    for r in table_rows(value):
        row = int(r["row"])
        if r.get("error"):
            notes.append(f"{table} row {row}: {r['error']}: ignored")
            continue
        prompt = r[column]
        if r.get("face_index") is not None:
            i = int(r["face_index"])
            if 0 <= i < n:
                by_index[i] = prompt
            else:
                notes.append(f"{table} row {row}: face_index {i} names no face (the image has {n}): ignored")
            continue
        box = [r.get(k) for k in BOX]
        if all(v is not None for v in box):
            scores = [iou(np.asarray(box, np.float32), b) for b in boxes]
            best = int(np.argmax(scores)) if scores else -1
            if best < 0 or scores[best] < box_iou:
                notes.append(f"{table} row {row}: box {_fmt(box)} overlaps no face (IoU >= {box_iou:g}): ignored")
            elif best not in by_box or scores[best] > by_box[best][0]:
                by_box[best] = (scores[best], prompt)
            continue
        whole = prompt
    out = []
    for i in range(n):
        if i in by_index:
            out.append(by_index[i])
        elif i in by_box:
            out.append(by_box[i][1])
        else:
            out.append(whole)
    return out, notes
