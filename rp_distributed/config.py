"""Job configuration: YAML files loaded into typed, validated objects.

Configs are plain data (as in diffusers): every stage object takes its section and is built once per
actor. Unknown keys and bad values are errors that name the key; ``--set a.b=value`` overrides a key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .config_base import StageResources, _Section  # noqa: F401 - re-exported
from .detection_config import AuditConfig, DetectionConfig, PassConfig  # noqa: F401 - re-exported

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class InputConfig(_Section):
    extensions: list[str] = list(IMAGE_EXTENSIONS)
    max_pixels: int = Field(64_000_000, gt=0, description="decompression-bomb cap on decoded pixels")
    max_bytes: int = Field(200 * 1024 * 1024, gt=0, description="largest file read")
    # Input modes (issue 10; rp_distributed/annotations.py).
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
        "default: an annotated image with such an orientation is withheld while this is unset")
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
    """Attribute prompts per image or per face from a side table (issue 10; rp_distributed/annotations.py).

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
    format: Literal["same", "png", "jpeg", "webp"] = "same"
    jpeg_quality: int = Field(95, ge=1, le=100)
    overwrite: bool = False
    manifest_dir: str = "_manifest"
    manifest_rows_per_file: int = Field(100_000, ge=1, description="a manifest part is written at this many rows")
    manifest_bytes_per_file: int = Field(64 * 1024 * 1024, ge=1024,
                                         description="... or when its rows' text reaches this many bytes")
    manifest_flush_s: float = Field(300.0, gt=0, description="... or when its oldest row is this old. A driver "
                                    "that dies loses the rows of this long, plus those Ray had not yet handed it "
                                    "(up to about two blocks); a rerun redoes those inputs")

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
        "batch size the memory probe chose (diffusion.unet_batch_size), on CPU 4")

    @field_validator("face_batch_size")
    @classmethod
    def _batch_range(cls, v):
        return _auto_or_range(v, 1, 64)
    resources: StageResources = StageResources(concurrency=1, num_cpus=0.5, batch_size=2)


class DiffusionConfig(_Section):
    """Reverse personalization (ALGORITHM.md); defaults are the paper's reference settings."""

    model: str = Field("stabilityai/stable-diffusion-xl-base-1.0", description="hub id, local folder or fsspec URI")
    model_revision: str | None = Field(None, description="hub revision of `model` (a commit pins it; `models pull` "
                                       "records the commit); with lock_file, must be the lock's")
    variant: str | None = Field(None, description="diffusers weights variant: fp16 loads *.fp16.safetensors (half the "
                                "bytes of the float32 files); null: the plain files")
    ip_adapter: str = Field("h94/IP-Adapter-FaceID", description="hub id, local folder or fsspec URI")
    ip_adapter_revision: str | None = Field(None, description="hub revision of `ip_adapter`; with lock_file, must be "
                                            "the lock's")
    ip_adapter_weight_name: str = "ip-adapter-faceid_sdxl.bin"
    arcface: str = Field("~/.insightface/models/buffalo_l/w600k_r50.onnx", description="ArcFace ONNX file or URI")
    lock_file: str | None = Field(None, description="models.lock.json of a tree written by `rp-anonymize models pull`: "
                                  "model, ip_adapter and arcface must lie in it; each node copies it once into "
                                  "cache_dir, keyed by the lock's content, and checks size and sha256 of every file")
    cache_dir: str = Field("~/.cache/rp_distributed", description="local cache for models synced from URIs")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    skip: float = Field(0.7, gt=0, lt=1)
    num_inversion_steps: int = Field(100, ge=2, le=1000)
    # g >= 0, a zero adapter scale or a zero identity make the generation conditioning equal (or, for g = 1,
    # as good as) the inversion conditioning: the output would be the input. Refused (issue 7).
    guidance_scale: float = Field(-10.0, allow_inf_nan=False, description="must be < 0 (negative identity guidance)")
    ip_adapter_scale: float = Field(1.0, le=10, description="must be > 0")
    id_emb_scale: float = Field(1.0, le=10, description="must be > 0")
    attribute_prompt: str | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    seed_mode: Literal["fixed", "per_face"] = Field(
        "per_face", description="fixed: every face uses `seed` (reference); per_face: derived from seed, input and face index"
    )
    arcface_providers: list[str] = ["CPUExecutionProvider"]
    # The hot loop (issue 13).
    unet_batch_size: int | Literal["auto"] = Field(
        "auto", description="(timestep, face) samples per UNet call, each carried by both guidance branches; "
        "inversion packs its 100 independent calls per face into calls of this size. auto: on CUDA the largest "
        "size a peak-memory probe at start-up fits into 85% of free memory (at most 64); on CPU 8")
    compile: bool = Field(False, description="torch.compile the UNet (channels_last, every call padded to "
                          "unet_batch_size so escalation tails never recompile)")
    compile_backend: str = Field("inductor", description="torch.compile backend (inductor; aot_eager traces "
                                 "without generating code, for checking graph capture)")
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = Field(
        "auto", description="scaled-dot-product attention kernel; auto: torch's choice")

    allow_bfloat16: bool = Field(False, description="run dtype bfloat16 anyway (logged as a warning): its error is "
                                 "not closed, see README 'Reduced precision'")

    @model_validator(mode="after")
    def _bfloat16_refused(self):
        if self.dtype == "bfloat16" and not self.allow_bfloat16:
            raise ValueError(
                "dtype=bfloat16 is refused: the negative guidance (x10 per step, 200 steps) amplifies its rounding "
                "to 2.7e-1 relative on the final latent of the shared fidelity case (float16: 3.4e-2); use float16 "
                "or float32, or set diffusion.allow_bfloat16=true to run it anyway (README, 'Reduced precision')")
        return self

    @field_validator("unet_batch_size")
    @classmethod
    def _positive_batch(cls, v):
        return _auto_or_range(v, 1, 256)

    @field_validator("guidance_scale")
    @classmethod
    def _negative_guidance(cls, v: float) -> float:
        if not v < 0:
            raise ValueError(f"must be negative (reference: -10); guidance_scale={v} >= 0 makes generation "
                             "reproduce the input face instead of anonymizing it")
        return v

    @field_validator("ip_adapter_scale", "id_emb_scale")
    @classmethod
    def _identity_present(cls, v: float, info) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0 (reference: 1.0); {info.field_name}={v} removes the identity from "
                             "generation, which then reproduces the input face instead of anonymizing it")
        return v


class PrivacyConfig(_Section):
    """Re-identification check and adaptive escalation (issue 4)."""

    reid_threshold: float = Field(0.6, gt=0, description="recognizer distance below which a face counts as re-identified")
    escalate: bool = True
    guidance_ladder: list[float] = [-15.0, -20.0]
    max_tries: int = Field(3, ge=1, description="generation tries per face, the first included")
    fallback_if_reidentified: bool = True
    # A second recognizer, for reporting only: the gate above (escalation, masking) and the reported
    # identity_exported both use dlib's recognizer, so that rate is measured by the model the gate optimised
    # against. An independent ArcFace-type ONNX model (e.g. antelopev2's glintr100) gives a second opinion.
    report_recognizer: str | None = Field(
        None, description="ArcFace-type ONNX file or URI used for reporting only (report_distance); never gates")
    report_threshold: float = Field(0.7, gt=0, lt=2, description="report recognizer: same identity when "
                                    "1 - cosine similarity is below this (0.7: cosine 0.3)")
    report_providers: list[str] = ["CPUExecutionProvider"]
    model_dir: str | None = Field(None, description="folder or URI with the re-ID gate's dlib files (shape_predictor_5"
                                  "_face_landmarks.dat, dlib_face_recognition_resnet_model_v1.dat); null: the package's")
    lock_file: str | None = Field(None, description="models.lock.json of a `models pull` tree holding model_dir (checked)")


class MergeConfig(_Section):
    feather: float = Field(0.08, ge=0, le=0.5, description="blend-mask feather, fraction of face size")
    audit: AuditConfig = AuditConfig()
    resources: StageResources = StageResources(concurrency=1, num_cpus=0.25, batch_size=4)


class RayConfig(_Section):
    address: str | None = Field(None, description="cluster address; RAY_ADDRESS wins; none starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: all)")
    max_task_retries: int = Field(
        3, ge=0, description="retries of a batch whose worker died (crash, OOM kill, device fault); its inputs "
        "are then retried one by one, and one that still fails is recorded as an error")
    max_actor_restarts: int = Field(
        -1, ge=-1, description="restarts of one stage actor that died (-1: unbounded; each restart reloads its "
        "models). A batch's retries are bounded by max_task_retries either way")
    max_isolated_inputs: int = Field(
        1000, ge=0, description="most inputs of failed batches retried one by one; more means a systemic "
        "failure: the job stops (resumable) instead")


class ReportConfig(_Section):
    """``report.html`` beside the manifest (``rp-anonymize report``). Not an anonymization setting."""

    include_originals: bool = Field(
        False, description="also embed each gallery face's ORIGINAL crop (identifiable!) next to the anonymized one")
    gallery_size: int = Field(24, ge=0, le=1000, description="anonymized faces shown as thumbnails")
    thumbnail_px: int = Field(112, ge=32, le=512, description="gallery thumbnail side, px")


class JobConfig(_Section):
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    detection: DetectionConfig = DetectionConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    anonymizer: AnonymizerConfig = AnonymizerConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    merge: MergeConfig = MergeConfig()
    ray: RayConfig = RayConfig()
    report: ReportConfig = ReportConfig()
    prompts: PromptsConfig = PromptsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        if self.privacy.max_tries > 1 + len(self.privacy.guidance_ladder):
            raise ValueError(
                f"privacy.max_tries={self.privacy.max_tries} needs {self.privacy.max_tries - 1} rungs in "
                f"privacy.guidance_ladder, which has {len(self.privacy.guidance_ladder)}"
            )
        # Each escalation rung must be stronger (more negative) than the one before it, starting from
        # diffusion.guidance_scale: a weaker or non-negative rung would retry with less anonymization.
        ladder, g = self.privacy.guidance_ladder, self.diffusion.guidance_scale
        prev = g
        for i, rung in enumerate(ladder):
            if not math.isfinite(rung) or rung >= prev:
                what = "diffusion.guidance_scale" if i == 0 else f"rung {i - 1} ({ladder[i - 1]})"
                raise ValueError(
                    f"privacy.guidance_ladder={ladder} must grow strictly more negative, starting below "
                    f"diffusion.guidance_scale={g}: rung {i} ({rung}) is not below {what}"
                )
            prev = rung
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    if overrides:
        data = apply_overrides(data, list(overrides))
        source += " + overrides"
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def config_to_dict(cfg: JobConfig) -> dict:
    return cfg.model_dump(mode="json")


def anonymization_settings(cfg: JobConfig) -> dict:
    """The settings that decide what an exported face looks like (detection, alignment, the method and its
    parameters, the privacy gate, blending). Resources, paths of the run and output encoding are not in it."""
    det = cfg.detection.model_dump(mode="json", exclude={"resources", "providers", "model_dir", "lock_file",
                                                         "cache_dir"})
    anon = cfg.anonymizer.model_dump(mode="json", exclude={"resources", "face_batch_size"})
    settings = {"detection": det, "alignment": cfg.alignment.model_dump(mode="json"), "anonymizer": anon,
                "privacy": cfg.privacy.model_dump(mode="json", exclude={"report_recognizer", "report_threshold",
                                                                         "report_providers", "model_dir", "lock_file"}),
                "merge": {"feather": cfg.merge.feather,  # the audit decides which missed faces are destroyed
                          "audit": cfg.merge.audit.model_dump(mode="json", exclude={"providers"})}}
    from .modelfiles import identity  # the detector's and the gate's weights by content digest, not their paths

    if models := identity(cfg):  # none when they are the shipped dlib files: earlier fingerprints stay valid
        settings["models"] = models
    if cfg.anonymizer.method == "reverse_personalization":
        # How the loop is executed (batching, compilation, attention kernel) is left out: it changes results by
        # rounding only (tests/test_diffusion.py), like the device.
        diff = cfg.diffusion.model_dump(mode="json", exclude={"cache_dir", "device", "arcface_providers",
                                                              "unet_batch_size", "compile", "compile_backend",
                                                              "sdpa_backend", "allow_bfloat16"})
        # Revisions and the variant decide the weights, so they are in; unset, they are left out, which keeps the
        # fingerprints of configs written before these keys existed.
        for k in ("model_revision", "variant", "ip_adapter_revision", "lock_file"):
            if diff.get(k) is None:
                diff.pop(k, None)
        settings["diffusion"] = diff
        if cfg.prompts.table:  # the table's URI, not its content: a table rewritten in place is not noticed
            settings["prompts"] = cfg.prompts.model_dump(mode="json")
    if cfg.input.mode != "detect":  # left out in detect mode: fingerprints of earlier configs are kept
        settings["input"] = cfg.input.model_dump(mode="json", include={
            "mode", "annotations", "annotations_path_column", "annotations_missing", "aligned_keypoints"})
        if cfg.input.annotations_frame is not None:  # in only when set: earlier fingerprints are kept
            settings["input"]["annotations_frame"] = cfg.input.annotations_frame
    return settings


def anonymization_fingerprint(cfg: JobConfig) -> str:
    """A short digest of ``anonymization_settings``: recorded per manifest row, compared on resume."""
    import hashlib
    import json

    blob = json.dumps(anonymization_settings(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
