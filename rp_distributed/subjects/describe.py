"""Every face of one input and its recognizer descriptor: the job's own detection stage (``stages.detect.DetectFaces``:
read, decode, the configured detectors, the job's face numbering, largest first) and then a recognizer from
``RECOGNIZERS``:

- ``dlib``: dlib's 128-d ResNet descriptor on dlib's 5-point shape inside the face's box, as the re-ID gate makes
  it (``scoring.ReidScorer``, ``privacy.model_dir``); same person below ``privacy.reid_threshold`` (0.6) euclidean;
- ``arcface``: the 512-d unit ArcFace embedding of the face's aligned crop (``diffusion.arcface``); same person
  below ``privacy.report_threshold`` in 1 - cosine, which is sqrt(2 t) euclidean on unit vectors.

``DescribeFaces`` is the Ray stage (one row out per face, and one per input with its outcome); ``describe`` is the
one-input entry point, usable without Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..faults import DeviceFault, describe as describe_exc, end_worker, raise_if_device_fault
from ..records import Face, ImageRow, Status
from ..stages.batch import rows
from ..stages.detect import DetectFaces, DetectSettings


class DlibRecognizer:
    name, dim = "dlib", 128

    def __init__(self, cfg):
        from ..model_sources import local_folder
        from ..scoring import ReidScorer

        p = cfg.privacy
        folder = local_folder(p.model_dir, p.lock_file, cfg.detection.cache_dir, "privacy.model_dir")
        self.scorer = ReidScorer(p, model_dir=folder)

    @staticmethod
    def threshold(cfg) -> float:
        return float(cfg.privacy.reid_threshold)

    def __call__(self, rgb: np.ndarray, faces: list[Face]) -> list[np.ndarray | None]:
        return [self.scorer.descriptor(rgb, f.box) for f in faces]


class ArcFaceRecognizer:
    name, dim = "arcface", 512

    def __init__(self, cfg):
        from ..faces.arcface import IdentityEmbedder

        self.embedder = IdentityEmbedder.from_config(cfg.diffusion)

    @staticmethod
    def threshold(cfg) -> float:
        return math.sqrt(2.0 * float(cfg.privacy.report_threshold))

    def __call__(self, rgb: np.ndarray, faces: list[Face]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(faces)
        todo = [i for i, f in enumerate(faces) if f.crop is not None and f.kps5 is not None]
        if todo:
            embs = self.embedder.embed_many([faces[i].crop for i in todo], [faces[i].kps5 for i in todo])
            for i, e in zip(todo, embs):
                out[i] = e
        return out


# The recognizers by name (``rp-anonymize subjects --recognizer``).
RECOGNIZERS = {"dlib": DlibRecognizer, "arcface": ArcFaceRecognizer}


@dataclass(frozen=True)
class SubjectSettings:
    """What the stage is built from: the detection stage's sections, and the recognizer's (privacy: dlib's files and
    thresholds; diffusion: the ArcFace model; detection: the node's model cache)."""

    detect: DetectSettings
    privacy: object
    detection: object
    diffusion: object

    @classmethod
    def of(cls, cfg) -> "SubjectSettings":
        return cls(DetectSettings.of(cfg), cfg.privacy, cfg.detection, cfg.diffusion)


@dataclass
class DescribedFace:
    face_index: int
    box: np.ndarray  # float32[4] x0, y0, x1, y1, image px
    descriptor: np.ndarray  # float32[dim]


@dataclass
class DescribedImage:
    rel_path: str
    status: Status  # ok (faces found), no_face, withheld (faces that could not be placed), error
    error: str | None = None
    faces: list[DescribedFace] = field(default_factory=list)
    undescribed: int = 0  # faces found that got no descriptor (an empty box, no crop, a recognizer failure)


def _finite(d) -> bool:
    return d is not None and bool(np.isfinite(d).all())


class DescribeFaces:
    """The Ray stage: batches of plan rows in, one row per described face and one per input out
    (``OUTPUT_COLUMNS``: the input's row has ``face_index`` -1 and its outcome)."""

    def __init__(self, settings: SubjectSettings, inputs=None, recognizer: str = "dlib"):
        self.detect = DetectFaces(settings.detect, inputs, identities=False)
        self.recognizer = RECOGNIZERS[recognizer](settings)
        self.max_pixels = settings.detect.input.max_pixels

    def describe(self, row: ImageRow) -> DescribedImage:
        """The faces of one plan row and their descriptors."""
        out = self.detect.process(row)
        if out.status is Status.ERROR or out.status is Status.WITHHELD:
            return DescribedImage(row.rel_path, out.status, out.error)
        faces = out.payload.faces
        if not faces:
            return DescribedImage(row.rel_path, Status.NO_FACE)
        rgb, _ = out.payload.pixels(self.max_pixels)  # decoded again when the payload kept the smaller source
        try:
            descriptors = self.recognizer(rgb, faces)
        except Exception as exc:  # noqa: BLE001 - one by one, so one bad face cannot cost the others theirs
            raise_if_device_fault(exc)
            descriptors = [self._one(rgb, f) for f in faces]
        image = DescribedImage(row.rel_path, Status.OK)
        for f, d in zip(faces, descriptors):
            if _finite(d):
                image.faces.append(DescribedFace(f.face_index, np.asarray(f.box, np.float32).reshape(4),
                                                 np.asarray(d, np.float32).reshape(-1)))
            else:
                image.undescribed += 1
        return image

    def _one(self, rgb: np.ndarray, face: Face):
        try:
            return self.recognizer(rgb, [face])[0]
        except Exception as exc:  # noqa: BLE001 - this face gets no subject (a fresh pseudonym in the job)
            raise_if_device_fault(exc)
            return None

    def __call__(self, batch: dict) -> dict:
        images = []
        for row in rows(batch):
            try:
                images.append(self.describe(row))
            except DeviceFault as exc:
                end_worker(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not drop the input: report it
                images.append(DescribedImage(row.rel_path, Status.ERROR, f"subjects stage failed: {describe_exc(exc)}"))
        return to_columns(images, self.recognizer.dim)


OUTPUT_COLUMNS = ("path", "face_index", "x0", "y0", "x1", "y1", "status", "error", "faces", "undescribed",
                  "descriptor")


def to_columns(images: list[DescribedImage], dim: int) -> dict:
    """A batch (numpy columns): per input one row (``face_index`` -1, its status, error and face counts), then a
    row per described face (its box and descriptor). Descriptors travel as one float32 N x dim array."""
    n = sum(1 + len(im.faces) for im in images)
    path, status, error = (np.empty(n, dtype=object) for _ in range(3))
    face_index, faces, undescribed = (np.full(n, -1, np.int64) for _ in range(3))
    boxes = np.full((n, 4), np.nan, np.float64)
    descriptor = np.zeros((n, dim), np.float32)
    i = 0
    for im in images:
        path[i], status[i], error[i] = im.rel_path, str(im.status), im.error or ""
        faces[i], undescribed[i] = len(im.faces), im.undescribed
        i += 1
        for f in im.faces:
            path[i], status[i], error[i], face_index[i] = im.rel_path, str(Status.OK), "", f.face_index
            boxes[i], descriptor[i] = f.box, f.descriptor
            i += 1
    return {"path": path, "face_index": face_index, "x0": boxes[:, 0], "y0": boxes[:, 1], "x1": boxes[:, 2],
            "y1": boxes[:, 3], "status": status, "error": error, "faces": faces, "undescribed": undescribed,
            "descriptor": descriptor}
