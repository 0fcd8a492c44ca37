"""Typed records that travel between the pipeline's stages.

One ``ImageRow`` per input carries the plan's columns, the image's outcome so far (``Status``) and an
``ImagePayload``: the source image and its ``Face`` records, from ``DetectFaces`` through ``AnonymizeFaces`` to
``MergeAndWrite``. Each stage fills its own group of ``Face`` fields and reads the groups of the stages before
it; the manifest rows are written from the records (``manifest.image_row``, ``manifest.face_row``), which is
where ``Applied`` and ``Try`` become the manifest's strings.

What crosses a stage boundary is kept lean: the payload carries the image as its encoded source
bytes when they are smaller than the decoded pixels (the merge stage decodes them again, bit for bit the
same pixels), and the aligned crops go to the anonymizer stage only: ``AnonymizeFaces`` drops them once it
has made ``anon_crop``.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

import numpy as np

REVERSE_PERSONALIZATION = "reverse_personalization"


class Status(str, enum.Enum):
    """An image's outcome. ``PENDING`` while the stages still work on it; the manifest holds the other four:
    ``ok`` (written, every face anonymized), ``no_face`` (written, no face found), ``withheld`` (faces present that
    could not all be anonymized: nothing written), ``error`` (the input could not be used)."""

    PENDING = "pending"
    OK = "ok"
    NO_FACE = "no_face"
    WITHHELD = "withheld"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


class Where(str, enum.Enum):
    """Where a face's method was applied: on its aligned crop (pasted back), or destroyed on the image itself."""

    CROP = ""
    IMAGE_BOX = "image box"  # no crop to paste (beyond max_faces, alignment or paste-back failed)
    WHOLE_IMAGE = "whole image"  # aligned input: the image is the face
    AUDIT = "audit"  # a face the first pass missed, found on the output by the audit


@dataclass(frozen=True)
class Applied:
    """What the written image holds for a face: ``method`` applied ``where``, and whether the re-ID gate masked it
    afterwards. Written to the manifest as ``blur``, ``blur (image box)``, ``reverse_personalization+mask``..."""

    method: str  # blur | pixelate | mask | reverse_personalization
    where: Where = Where.CROP
    masked: bool = False

    def __str__(self) -> str:
        place = f" ({self.where.value})" if self.where is not Where.CROP else ""
        return f"{self.method}{place}{'+mask' if self.masked else ''}"

    @property
    def generated(self) -> bool:
        return self.method == REVERSE_PERSONALIZATION

    @property
    def solid_mask(self) -> bool:
        """Whether no pixel of the face is left: masked by the gate, or the mask method itself."""
        return self.masked or self.method == "mask"

    def with_mask(self) -> "Applied":
        return Applied(self.method, self.where, True)


@dataclass(frozen=True)
class Try:
    """One generation of a face (a rung of the escalation ladder) and what the re-ID check said of it."""

    guidance: float
    reid_distance: float | None  # None: not checked, or the check could not run

    def as_json(self) -> dict:
        return asdict(self)


def join_reasons(*reasons: str | None) -> str | None:
    """``"; "``-joined non-empty reasons, or None."""
    return "; ".join(r for r in reasons if r) or None


@dataclass
class Face:
    # -- DetectFaces: detection ------------------------------------------------------------------------
    face_index: int  # order in the image, largest face first
    box: np.ndarray  # float32[4] x0, y0, x1, y1 in image px
    det_score: float
    landmarks: np.ndarray  # float32[K, 2] image px (5 or 68 points, per detector)
    seed: int  # diffusion seed of this face
    small: bool = False  # below detection.min_face_size: the fallback method, never generation
    over_budget: bool = False  # beyond detection.max_faces: no crop; the fallback goes on the image box
    prompt: str | None = None  # attribute prompt this face is generated with (None: identity guidance only)
    pseudonym: str | None = None  # HMAC-SHA256(pseudonym key, its subject), hex (None: no subject). Never the
    #   subject: it seeds the face's pseudonym embedding and gives the manifest's pseudonym_id
    found_by: str | None = None  # the detector passes that found it ("; "-joined), or "audit: ..." (audit faces)
    low_confidence: bool = False  # an ensemble's low-confidence detection: the fallback method, never generation
    audit: bool = False  # missed by the first pass, found on the output by the merge stage's audit
    # -- DetectFaces: alignment (absent for over-budget faces and when alignment failed) ----------------
    crop: np.ndarray | None = None  # uint8[S, S, 3] aligned crop; dropped after AnonymizeFaces
    matrix: np.ndarray | None = None  # float32[2, 3] image -> crop
    face_box: np.ndarray | None = None  # float32[4] the face in crop px
    kps5: np.ndarray | None = None  # float32[5, 2] crop px
    align_error: str | None = None
    id_embedding: np.ndarray | None = None  # float32[512] unit ArcFace embedding of the crop (reverse
    #   personalization only; made here on the CPU so the GPU actor does not wait for it)
    id_keypoints: str | None = None  # where the 5 keypoints (crop, embedding) came from: detector | template
    #   (aligned mode) | annotations (the table's landmarks) | predictor (dlib's 68 points in an annotated box)
    # -- AnonymizeFaces ----------------------------------------------------------------------------------
    anon_crop: np.ndarray | None = None  # uint8[S, S, 3]; None: merge destroys the image box instead
    method: str | None = None  # requested
    method_applied: Applied | None = None  # what the written image holds for this face
    face_error: str | None = None  # why the requested method is not what was applied
    params: str | None = None  # JSON of the method's parameters
    model: str | None = None  # JSON of model identifiers
    tries: list[Try] | None = None  # the generations run (None: the method generates nothing)
    guidance_final: float | None = None
    unet_evals: int | None = None
    t_anonymize_s: float | None = None
    # -- MergeAndWrite: checks of the written face ----------------------------------------------------
    reid_distance: float | None = None
    reidentified: bool | None = None
    face_still_detected: bool | None = None
    identity_exported: bool | None = None  # re-identified (or unverifiable) in the written pixels, box not masked
    score_error: str | None = None  # why a check failed (a failed re-ID check masks the face)
    anon_descriptor: np.ndarray | None = None  # float32[128] dlib descriptor of the written face (faces with a
    #   pseudonym only, not masked): the report measures a subject's consistency from it
    report_distance: float | None = None
    report_reidentified: bool | None = None
    pose_diff_deg: float | None = None
    landmark_displacement: float | None = None

    def add_error(self, reason: str | None) -> None:
        self.face_error = join_reasons(self.face_error, reason)

    def add_score_error(self, reason: str | None) -> None:
        self.score_error = join_reasons(self.score_error, reason)

    @property
    def masked(self) -> bool:
        """Whether no pixel of the written face is left (the gate's mask, or the mask method)."""
        return self.method_applied is not None and self.method_applied.solid_mask


@dataclass
class ImagePayload:
    """The pixels and faces of one image as they travel between stages.

    Exactly one of ``source`` (the encoded file as read, when smaller) and ``image`` holds the pixels once
    ``DetectFaces`` is done; ``pixels()`` gives the decoded image either way.
    """

    source: bytes | None = None
    image: np.ndarray | None = None  # HxWx3 uint8 RGB, EXIF orientation applied
    alpha: np.ndarray | None = None  # HxW uint8, when the source had transparency (with ``image`` only)
    faces: list[Face] = field(default_factory=list)
    # Where the faces came from: the detector's name, "annotations" (input.mode: annotations) or "aligned"
    # (input.mode: aligned: the whole image is the one face; merge replaces it instead of pasting back).
    faces_from: str | None = None

    def keep_smaller(self, data: bytes) -> None:
        """Ship ``data`` (the encoded source) instead of the decoded pixels when it is smaller."""
        decoded = self.image.nbytes + (self.alpha.nbytes if self.alpha is not None else 0)
        if len(data) < decoded:
            self.source, self.image, self.alpha = data, None, None

    def pixels(self, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(rgb, alpha), decoding ``source`` when the pixels travelled encoded."""
        if self.image is not None:
            return self.image, self.alpha
        if self.source is None:
            raise ValueError("the payload holds no image")
        from .io import decode_image

        decoded = decode_image(self.source, max_pixels)
        return decoded.rgb, decoded.alpha


@dataclass
class ImageRow:
    """One input as it travels between the stages: the plan's columns, the outcome so far and the payload. A stage
    that decides the outcome early (an unreadable input, a face it cannot place) sets ``status`` and ``error``;
    the stages after it pass the row on untouched, and the merge stage writes its manifest row."""

    input_uri: str
    rel_path: str
    output_uri: str | None = None  # the key this input writes (None: refused at plan time, see error)
    stale_output_uri: str | None = None  # an earlier run's output at another key, to delete
    status: Status = Status.PENDING
    error: str | None = None
    notes: str | None = None
    input_size: int | None = None  # the input's content identity in the plan's listing (resume: replaced inputs)
    input_version: str | None = None
    input_sha256: str | None = None  # of the bytes the detection stage read
    width: int | None = None
    height: int | None = None
    t_read_s: float | None = None
    t_detect_s: float | None = None
    detect_passes: int | None = None
    detect_mpix: float | None = None
    payload: ImagePayload = field(default_factory=ImagePayload)
    annotations: object = None  # the plan's rows of input.annotations for this image (detection stage only)
    prompts: object = None  # its rows of prompts.table (detection stage only)
    subjects: object = None  # its rows of pseudonyms.table, subjects as digests (detection stage only)

    @classmethod
    def of(cls, columns: dict) -> "ImageRow":
        """A row from a mapping of column values (a plan row, a batch row); columns it does not hold are ignored."""
        row = cls(**{k: v for k, v in columns.items() if k in cls.__dataclass_fields__})
        row.status = Status(row.status or Status.PENDING)  # a string once Ray's blocks have been through Arrow
        return row

    @property
    def pending(self) -> bool:
        return self.status is Status.PENDING

    def finish(self, status: Status, error: str | None, payload: ImagePayload | None = None) -> "ImageRow":
        """Decide the outcome early: nothing of this image is written (its payload is dropped)."""
        self.status, self.error, self.payload = status, error, payload or ImagePayload()
        return self


# The columns a batch carries between the stages (the detection stage empties the side tables' rows).
STAGE_COLUMNS = list(ImageRow.__dataclass_fields__)
