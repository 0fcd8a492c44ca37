"""The config sections of input, prompts, output, alignment, the anonymizer, the privacy gate, merging, Ray and the
report. Each field that cannot change an exported face says so (``outside_fingerprint``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import PATH_BY_DIGEST, RESOURCES, WHEN_SET, StageResources, _Section, outside_fingerprint
from .detection import AuditConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class InputConfig(_Section):
    extensions: list[str] = Field(list(IMAGE_EXTENSIONS), json_schema_extra=outside_fingerprint(
        "which files are listed; a listed file is anonymized the same way"))
    max_pixels: int = Field(64_000_000, gt=0, description="decompression-bomb cap on decoded pixels",
                            json_schema_extra=outside_fingerprint("refuses an input (an error row, redone on every "
                                                                  "rerun), never changes a processed one"))
    max_bytes: int = Field(200 * 1024 * 1024, gt=0, description="largest file read",
                           json_schema_extra=outside_fingerprint("as max_pixels"))
    # Input modes (rp_distributed/annotations.py).
    mode: Literal["detect", "aligned", "annotations"] = Field(
        "detect", description="detect: find faces with detection.backend; aligned: every image is one aligned face "
        "(CelebA-HQ, FFHQ): no detection, no paste-back, the output has the input's size; annotations: faces "
        "(boxes, optional 5 or 68 landmarks) come from the `annotations` table, no detection")
    annotations: str | None = Field(
        None, description="annotations mode: Parquet, CSV or JSON-lines table (file or URI) with columns "
        "path, x0, y0, x1, y1 and optional score, landmarks (10 or 136 numbers: 5 or 68 x,y points)")
    annotations_path_column: str = Field("path", description="the annotations table's key: the input's path "
                                         "relative to the input prefix, or its full URI")
    annotations_missing: Literal["detect", "skip", "withhold"] = Field(
        "detect", description="an image with no annotation rows: detect (run the detector on it), skip (the table "
        "is authoritative: no rows, no faces; written as no_face), withhold (nothing written, status withheld)")
    annotations_frame: Literal["stored", "upright"] | None = Field(
        None, description="the frame of the annotations' coordinates for photos stored turned or mirrored (EXIF "
        "orientation 2-8): stored (the pixels as stored in the file: mapped upright) or upright (as displayed). No "
        "default: an annotated image with such an orientation is withheld while this is unset", json_schema_extra=WHEN_SET)
    aligned_keypoints: Literal["template", "detector"] = Field(
        "template", description="aligned mode: the face's 5 keypoints (identity embedding, face box) from the "
        "alignment template's canonical positions, or from detection.backend run inside the image (largest "
        "face; none found: the template, noted)")

    @field_validator("extensions")
    @classmethod
    def _lower_dotted(cls, v: list[str]) -> list[str]:
        out = [e.lower() if e.startswith(".") else "." + e.lower() for e in v]
        if not out:
            raise ValueError("at least one extension is required")
        unsupported = [e for e in out if e not in IMAGE_EXTENSIONS]
        if unsupported:  # the decoder refuses other formats (io.ACCEPTED_FORMATS): say so at start-up
            raise ValueError(f"unsupported extension(s) {unsupported}; supported: {', '.join(IMAGE_EXTENSIONS)}")
        return out

    @model_validator(mode="after")
    def _annotations_named(self) -> "InputConfig":
        if self.mode == "annotations" and not self.annotations:
            raise ValueError("input.mode=annotations needs input.annotations (the table's file or URI)")
        return self


class PromptsConfig(_Section):
    """Attribute prompts per image or per face from a side table (rp_distributed/annotations.py).

    Each row names an image (``path_column``) and optionally one face of it, by ``face_index`` (this job's
    numbering: largest first) or by a box ``x0, y0, x1, y1`` (the detected face overlapping it most, IoU at
    least ``box_iou``); a row naming neither applies to every face of the image. The prompt is the
    ``prompt_column``, or ``template`` filled from the row's columns (``"a photo of {age_group} {sex}"``).
    Faces without a row use ``diffusion.attribute_prompt``. Reverse personalization only."""

    table: str | None = Field(None, description="Parquet, CSV or JSON-lines table (file or URI); null: no table")
    path_column: str = "path"
    prompt_column: str = "prompt"
    template: str | None = Field(None, description="str.format template over the row's columns; null: the "
                                 "prompt_column as it is")
    box_iou: float = Field(0.5, gt=0, le=1, description="least IoU between a row's box and the face it names")

    @field_validator("template")
    @classmethod
    def _fields(cls, v: str | None) -> str | None:
        if v is not None:
            import string

            try:
                names = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
            except ValueError as exc:
                raise ValueError(f"not a valid template: {exc}") from None
            if not names or any(not n or not n.isidentifier() for n in names):
                raise ValueError("needs named fields only, e.g. 'a photo of {age_group} {sex}'")
        return v


class OutputConfig(_Section):
    format: Literal["same", "png", "jpeg", "webp"] = Field("same", json_schema_extra=outside_fingerprint(
        "output encoding (a changed format changes the output key, which is redone anyway)"))
    jpeg_quality: int = Field(95, ge=1, le=100, json_schema_extra=outside_fingerprint(
        "output encoding: codec rounding after anonymization and the check of the written file"))
    overwrite: bool = Field(False, json_schema_extra=outside_fingerprint("redoes everything regardless of the fingerprint"))
    manifest_dir: str = Field("_manifest", json_schema_extra=outside_fingerprint("where the manifest lies"))
    manifest_rows_per_file: int = Field(100_000, ge=1, description="a manifest part is written at this many rows",
                                        json_schema_extra=outside_fingerprint("manifest part size"))
    manifest_bytes_per_file: int = Field(64 * 1024 * 1024, ge=1024,
                                         description="... or when its rows' text reaches this many bytes",
                                         json_schema_extra=outside_fingerprint("manifest part size"))
    manifest_flush_s: float = Field(300.0, gt=0, description="... or when its oldest row is this old. A driver "
                                    "that dies loses the rows of this long, plus those Ray had not yet handed it "
                                    "(up to about two blocks); a rerun redoes those inputs",
                                    json_schema_extra=outside_fingerprint("manifest part age"))

    @field_validator("manifest_dir")
    @classmethod
    def _relative(cls, v: str) -> str:
        if not v or v.startswith("/") or ".." in Path(v).parts or "\\" in v:
            raise ValueError("must be a relative folder name inside the output prefix")
        return v


class AlignmentConfig(_Section):
    face_size: int = Field(1024, ge=32, le=4096, description="aligned crop side, px (SDXL native: 1024)")
    padding: float = Field(0.40, ge=0, le=2.0, description="whole-face framing padding")
    shift: float = Field(0.07, ge=-0.5, le=0.5, description="framing shift toward the forehead")


def _auto_or_range(v, lo: int, hi: int):
    """A batch size: "auto" or an int in [lo, hi]."""
    if v != "auto" and not lo <= int(v) <= hi:
        raise ValueError(f"must be 'auto' or in [{lo}, {hi}], got {v}")
    return v


Method = Literal["blur", "pixelate", "mask", "reverse_personalization"]
Fallback = Literal["blur", "pixelate", "mask"]


class AnonymizerConfig(_Section):
    method: Method = "blur"
    fallback: Fallback = Field("blur", description="destructive method when the primary one fails")
    blur_strength: float = Field(0.12, gt=0, le=1, description="Gaussian sigma as a fraction of face size")
    pixelate_blocks: int = Field(10, ge=2, le=256)
    mask_color: tuple[int, int, int] = (0, 0, 0)
    face_batch_size: int | Literal["auto"] = Field(
        4, description="faces per diffusion chunk (a generation UNet call carries 2x); auto: on CUDA the UNet "
        "batch size the memory probe chose (diffusion.unet_batch_size), on CPU 4",
        json_schema_extra=outside_fingerprint("batching: batched equals one by one (tests/test_anonymize.py)"))
    # 8 images a batch: fewer per-batch block conversions, and their faces fill face_batch_size chunks.
    resources: StageResources = Field(StageResources(concurrency=1, num_cpus=0.5, batch_size=8),
                                      json_schema_extra=outside_fingerprint(RESOURCES))

    @field_validator("face_batch_size")
    @classmethod
    def _batch_range(cls, v):
        return _auto_or_range(v, 1, 64)

    @property
    def generative(self) -> bool:
        """Whether the method generates new faces (reverse personalization) rather than destroying them."""
        return self.method == "reverse_personalization"


class PrivacyConfig(_Section):
    """Re-identification check and adaptive escalation."""

    reid_threshold: float = Field(0.6, gt=0, description="recognizer distance below which a face counts as re-identified")
    escalate: bool = True
    guidance_ladder: list[float] = [-15.0, -20.0]
    max_tries: int = Field(3, ge=1, description="generation tries per face, the first included")
    fallback_if_reidentified: bool = True
    # A second recognizer, for reporting only: the gate above (escalation, masking) and the reported
    # identity_exported both use dlib's recognizer, so that rate is measured by the model the gate optimised
    # against. An independent ArcFace-type ONNX model (e.g. antelopev2's glintr100) gives a second opinion.
    report_recognizer: str | None = Field(
        None, description="ArcFace-type ONNX file or URI used for reporting only (report_distance); never gates",
        json_schema_extra=outside_fingerprint("the second recognizer reports only, never gates"))
    report_threshold: float = Field(0.7, gt=0, lt=2, description="report recognizer: same identity when "
                                    "1 - cosine similarity is below this (0.7: cosine 0.3)",
                                    json_schema_extra=outside_fingerprint("reporting only"))
    report_providers: list[str] = Field(["CPUExecutionProvider"], json_schema_extra=outside_fingerprint("reporting only"))
    model_dir: str | None = Field(None, description="folder or URI with the re-ID gate's dlib files (shape_predictor_5"
                                  "_face_landmarks.dat, dlib_face_recognition_resnet_model_v1.dat); null: the package's",
                                  json_schema_extra=outside_fingerprint(PATH_BY_DIGEST))
    lock_file: str | None = Field(None, description="models.lock.json of a `models pull` tree holding model_dir (checked)",
                                  json_schema_extra=outside_fingerprint(PATH_BY_DIGEST))


class MergeConfig(_Section):
    feather: float = Field(0.08, ge=0, le=0.5, description="blend-mask feather, fraction of face size")
    audit: AuditConfig = AuditConfig()
    resources: StageResources = Field(StageResources(concurrency=1, num_cpus=0.25, batch_size=16),  # see detection's
                                      json_schema_extra=outside_fingerprint(RESOURCES))


class RayConfig(_Section):
    address: str | None = Field(None, description="cluster address; RAY_ADDRESS wins; none starts a local Ray",
                                json_schema_extra=outside_fingerprint("which cluster"))
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: all)",
                                 json_schema_extra=outside_fingerprint(RESOURCES))
    max_task_retries: int = Field(
        3, ge=0, description="retries of a batch whose worker died (crash, OOM kill, device fault); its inputs "
        "are then retried one by one, and one that still fails is recorded as an error",
        json_schema_extra=outside_fingerprint("retries of a dead worker"))
    max_actor_restarts: int = Field(
        -1, ge=-1, description="restarts of one stage actor that died (-1: unbounded; each restart reloads its "
        "models). A batch's retries are bounded by max_task_retries either way",
        json_schema_extra=outside_fingerprint("restarts of a dead actor"))
    max_isolated_inputs: int = Field(
        1000, ge=0, description="most inputs of failed batches retried one by one; more means a systemic "
        "failure: the job stops (resumable) instead", json_schema_extra=outside_fingerprint("when a job stops"))


class ReportConfig(_Section):
    """``report.html`` beside the manifest (``rp-anonymize report``). Not an anonymization setting."""

    include_originals: bool = Field(
        False, description="also embed each gallery face's ORIGINAL crop (identifiable!) next to the anonymized one",
        json_schema_extra=outside_fingerprint("report.html only"))
    gallery_size: int = Field(24, ge=0, le=1000, description="anonymized faces shown as thumbnails",
                              json_schema_extra=outside_fingerprint("report.html only"))
    thumbnail_px: int = Field(112, ge=32, le=512, description="gallery thumbnail side, px",
                              json_schema_extra=outside_fingerprint("report.html only"))


