"""Where an image's faces come from (``input.mode``), for one decoded image in memory, with no I/O: the detector
(``detect``), the image's rows of the annotations table (``annotations``), or the image itself as one aligned face
(``aligned``); each face aligned to the reference framing and given its seed. ``FaceFinder.find`` is the
one-image entry point the detection stage wraps, usable without Ray:

    finder = FaceFinder(cfg.input, cfg.detection, cfg.alignment, cfg.diffusion)
    found = finder.find(rgb, "photo.jpg")      # found.faces: records.Face with crop, matrix, keypoints
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..faults import describe, raise_if_device_fault
from ..records import Face, join_reasons
from . import align as al


def face_seed(base_seed: int, mode: str, rel_path: str, face_index: int) -> int:
    """``diffusion.seed_mode``: fixed (every face ``seed``, as the reference) or per face (from the seed, the input's
    path and the face's index)."""
    if mode == "fixed":
        return int(base_seed)
    digest = hashlib.sha256(f"{base_seed}:{rel_path}:{face_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF


@dataclass
class FoundFaces:
    faces: list[Face] = field(default_factory=list)  # largest first, aligned where they could be
    faces_from: str | None = None  # the detector's name, "annotations" or "aligned" (the image is the face)
    notes: list[str] = field(default_factory=list)  # what the manifest's notes say of them
    withheld: str | None = None  # a reason to write nothing for this image (a face we cannot place)
    passes: int | None = None  # detector passes run (an ensemble's cost)
    mpix: float | None = None  # megapixels its passes saw


@dataclass
class _Located:
    """Faces of one image before alignment."""

    faces: list  # faces.DetectedFace, image px, largest first
    source: str
    keypoints: str  # where their landmarks came from: detector | annotations
    predict: list[bool] = field(default_factory=list)  # per face: no landmarks given, predict them in the box
    notes: list[str] = field(default_factory=list)
    withheld: str | None = None


class FaceFinder:
    """Built once per actor from the ``input``, ``detection``, ``alignment`` and ``diffusion`` (seeds) sections."""

    def __init__(self, input_cfg, detection, alignment, diffusion):
        from . import build_detector

        self.input, self.detection, self.alignment, self.diffusion = input_cfg, detection, alignment, diffusion
        mode = input_cfg.mode
        needs_detector = (mode == "detect" or (mode == "annotations" and input_cfg.annotations_missing == "detect")
                          or (mode == "aligned" and input_cfg.aligned_keypoints == "detector"))
        self.detector = build_detector(detection) if needs_detector else None
        self._box_landmarks = None  # dlib's 68-point predictor, for annotated boxes without landmarks (lazy)

    def find(self, rgb: np.ndarray, rel_path: str, annotation_rows=None, orientation: int = 1) -> FoundFaces:
        """The faces of one decoded image (RGB, EXIF orientation applied; ``orientation``: the tag it had)."""
        if self.input.mode == "aligned":
            notes: list[str] = []
            return FoundFaces([self._aligned_face(rel_path, rgb, notes)], "aligned", notes)
        found = FoundFaces()
        located = self._locate(rgb, annotation_rows, orientation, found)
        found.notes, found.faces_from = located.notes, located.source
        if located.withheld:  # fail closed: nothing is written for this image
            found.withheld = located.withheld
            return found
        found.faces = self._align_faces(rel_path, rgb, located)
        return found

    def _locate(self, rgb: np.ndarray, rows, orientation: int, found: FoundFaces) -> _Located:
        """The faces from the detector, or (annotations mode) from the image's own table rows."""
        from .orientation import annotated_faces

        inp = self.input
        note = []
        if inp.mode == "annotations":
            if rows is not None:
                a, unplaced = annotated_faces(rows, rgb.shape, orientation, inp.annotations_frame)
                if unplaced or a.unlocatable:  # a face we know of and cannot place: nothing may be written
                    return _Located([], "annotations", "annotations", notes=a.notes, withheld=unplaced or join_reasons(
                        *a.unlocatable, "a face the annotations name cannot be located"))
                return _Located(a.faces, "annotations", "annotations", a.needs_landmarks, a.notes)
            if inp.annotations_missing == "withhold":
                return _Located([], "annotations", "annotations",
                                withheld="no annotation rows for this image (input.annotations_missing=withhold)")
            if inp.annotations_missing == "skip":
                return _Located([], "annotations", "annotations",
                                notes=["no annotation rows: no faces (input.annotations_missing=skip)"])
            note = ["no annotation rows: faces detected (input.annotations_missing=detect)"]
        faces = self.detector.detect(rgb)
        cost = getattr(self.detector, "cost", None)  # the ensemble's: passes run, megapixels seen
        found.passes, found.mpix = getattr(cost, "passes", None), getattr(cost, "mpix", None)
        return _Located(faces, self.detection.backend, "detector", [False] * len(faces), note)

    def _align_faces(self, rel_path: str, rgb: np.ndarray, located: _Located) -> list[Face]:
        det, d = self.detection, self.diffusion
        faces = []
        for i, face in enumerate(located.faces):
            rec = Face(face_index=i, box=np.asarray(face.box, np.float32), det_score=float(face.score),
                       landmarks=np.asarray(face.landmarks, np.float32), seed=face_seed(d.seed, d.seed_mode, rel_path, i),
                       small=face.size < det.min_face_size, over_budget=i >= det.max_faces,
                       found_by="; ".join(face.found_by) or None, low_confidence=not face.confident)
            faces.append(rec)
            if rec.over_budget:  # no crop: merge applies the fallback on the image box
                continue
            try:
                keypoints = located.keypoints
                if located.predict and located.predict[i]:  # an annotated box without landmarks: predict them
                    face.landmarks = rec.landmarks = self._predict_landmarks(rgb, face.box)
                    keypoints = "predictor"
                aligned = al.align(rgb, face, self.alignment)
                rec.crop, rec.matrix, rec.face_box, rec.kps5 = (aligned.crop, aligned.matrix, aligned.face_box,
                                                                aligned.kps5)
                rec.id_keypoints = keypoints
            except Exception as exc:  # noqa: BLE001 - merge will destroy the box directly
                rec.align_error = f"alignment failed: {describe(exc)}"[:500]
        return faces

    def _predict_landmarks(self, rgb: np.ndarray, box) -> np.ndarray:
        if self._box_landmarks is None:
            from .dlib_backend import BoxLandmarks

            self._box_landmarks = BoxLandmarks()
        return self._box_landmarks(rgb, box)

    def _aligned_face(self, rel_path: str, rgb: np.ndarray, notes: list[str]) -> Face:
        """``input.mode: aligned``: the whole image is the one face (centre-padded to a square when it is not
        one, resized to ``alignment.face_size``). Its keypoints and face box come from the alignment template,
        or from the detector run in the image (``input.aligned_keypoints``; none found: the template, noted)."""
        a, d = self.alignment, self.diffusion
        crop, matrix = al.whole_image_crop(rgb, a.face_size)
        kps5, face_box = al.template_in_crop(a.face_size, a.padding, a.shift), al.template_box_in_crop(
            a.face_size, a.padding, a.shift)
        keypoints, score = "template", 1.0
        if self.input.aligned_keypoints == "detector":
            try:
                found = self.detector.detect(rgb)
            except Exception as exc:  # noqa: BLE001 - the face is the whole image either way: the template
                raise_if_device_fault(exc)
                found = []
                notes.append(f"aligned input: the detector failed ({describe(exc)})"[:300])
            if found:
                best = found[0]  # largest first
                kps5 = al.transform_points(al.five_points(best.landmarks), matrix)
                face_box, keypoints, score = al.box_through(best.box, matrix), "detector", float(best.score)
            else:
                notes.append("aligned input: the detector found no face in it: template keypoints")
        inverse = al.invert_matrix(matrix)
        h, w = rgb.shape[:2]
        box = np.clip(al.box_through(face_box, inverse), 0, [w, h, w, h]).astype(np.float32)
        size = float(max(box[2] - box[0], box[3] - box[1]))
        return Face(face_index=0, box=box, det_score=score, landmarks=al.transform_points(kps5, inverse),
                    seed=face_seed(d.seed, d.seed_mode, rel_path, 0), small=size < self.detection.min_face_size,
                    crop=crop, matrix=matrix, face_box=face_box, kps5=kps5, id_keypoints=keypoints)
