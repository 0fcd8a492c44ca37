"""Typed records that travel between the pipeline's stages.

One ``ImagePayload`` per input row carries the source image and its ``Face`` records from ``DetectFaces``
through ``AnonymizeFaces`` to ``MergeAndWrite``. Each stage fills its own group of ``Face`` fields and
reads the groups of the stages before it; the manifest (``manifest.face_row``) is written from the record.

What crosses a stage boundary is kept lean (issue 8): the payload carries the image as its encoded source
bytes when they are smaller than the decoded pixels (the merge stage decodes them again, bit for bit the
same pixels), and the aligned crops go to the anonymizer stage only: ``AnonymizeFaces`` drops them once it
has made ``anon_crop``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    method_applied: str | None = None  # what the written image holds for this face ("+mask": masked later)
    face_error: str | None = None  # why the requested method is not what was applied
    params: str | None = None  # JSON of the method's parameters
    model: str | None = None  # JSON of model identifiers
    tries: int | None = None
    tries_json: str | None = None  # [{guidance, reid_distance}] per generation
    guidance_final: float | None = None
    unet_evals: int | None = None
    t_anonymize_s: float | None = None
    # -- MergeAndWrite: checks of the written face ----------------------------------------------------
    reid_distance: float | None = None
    reidentified: bool | None = None
    face_still_detected: bool | None = None
    identity_exported: bool | None = None  # re-identified (or unverifiable) in the written pixels, box not masked
    score_error: str | None = None  # why a check failed (a failed re-ID check masks the face)
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
        """Whether the written face's last applied method is a solid mask (no pixel of the face is left)."""
        return is_masked(self.method_applied)


def is_masked(method_applied: str | None) -> bool:
    if not method_applied:
        return False
    return method_applied.split("+")[-1].split(" ")[0] == "mask"


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
