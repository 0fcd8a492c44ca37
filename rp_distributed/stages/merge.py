"""The merge stage (CPU actor pool): paste the anonymized faces back (``compose.apply_faces``; an aligned input is
replaced whole, ``compose.replace_whole``), look once more for faces the first pass missed (``audit.OutputAudit``),
gate every face on the pixels as they will be written (``scoring.FaceChecks``), write the image, delete what an
earlier run left that this one does not replace, and return the image's manifest rows."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from .. import compose, io, manifest
from ..audit import OutputAudit
from ..config import AnonymizerConfig, DetectionConfig, DiffusionConfig, InputConfig, MergeConfig, OutputConfig, PrivacyConfig
from ..faults import describe
from ..records import ImageRow, Status, join_reasons
from .batch import columns, rows


@dataclass(frozen=True)
class MergeSettings:
    """The config sections the merge stage is built from."""

    input: InputConfig  # the pixel cap when the source is decoded again
    output: OutputConfig  # the encoding
    detection: DetectionConfig  # the audit's detector and the model cache
    anonymizer: AnonymizerConfig  # the fallback and mask colour
    privacy: PrivacyConfig  # the re-ID gate
    merge: MergeConfig
    diffusion: DiffusionConfig  # the model cache of the report recognizer

    @classmethod
    def of(cls, cfg) -> "MergeSettings":
        return cls(cfg.input, cfg.output, cfg.detection, cfg.anonymizer, cfg.privacy, cfg.merge, cfg.diffusion)


def remove_stale_outputs(row: ImageRow, failed: bool, outputs: io.Storage | None = None) -> str | None:
    """Delete what an earlier run wrote for this input and this run does not replace.

    ``stale_output_uri``: an earlier output at another key (the plan sets it from the manifest when the key
    changed). When this run writes nothing (``failed``), the earlier output at this input's own key (the plan
    gave it to this input alone) goes too: a rerun whose outcome is withheld or error leaves no stale file
    behind. Each is deleted through ``outputs`` (a key outside the prefix, holding store syntax or reached
    through a symlinked folder is refused). Returns a reason when a delete failed or was refused.
    """
    stale = [row.stale_output_uri] + ([row.output_uri] if failed else [])
    problems = []
    for uri in filter(None, stale):
        try:
            io.remove(uri, outputs)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"stale output {uri} could not be deleted: {describe(exc)}"[:300])
    return join_reasons(*problems)


class MergeAndWrite:
    """``outputs``: the output prefix's storage, through which every write and delete goes (nothing through a
    symlinked folder below it); without it, each output's own folder."""

    def __init__(self, settings: MergeSettings, run_id: str, fingerprint: str | None = None,
                 outputs: io.Storage | None = None):
        from ..scoring import FaceChecks

        self.settings, self.run_id, self.fingerprint, self.outputs = settings, run_id, fingerprint, outputs
        self.checks = FaceChecks(settings)
        self.audit = OutputAudit(settings) if settings.merge.audit.enabled else None

    @classmethod
    def from_config(cls, cfg, run_id: str, fingerprint: str | None = None,
                    outputs: io.Storage | None = None) -> "MergeAndWrite":
        return cls(MergeSettings.of(cfg), run_id, fingerprint, outputs)

    def __call__(self, batch: dict) -> dict:
        out = []
        for row in rows(batch):
            try:
                out.extend(self.process(row))
            except Exception as exc:  # noqa: BLE001 - a bug must not drop the row, nor leave an output behind
                out.append(self.image_row(row, Status.ERROR, join_reasons(
                    f"merge stage failed: {describe(exc)}", remove_stale_outputs(row, True, self.outputs))))
        return columns(out, manifest.SCHEMA.names)

    def image_row(self, row: ImageRow, status: Status, error: str | None, **measures) -> dict:
        return manifest.image_row(self.run_id, self.fingerprint, row.input_uri, row.rel_path, status, error, row.notes,
                                  image_width=row.width, image_height=row.height, num_faces=len(row.payload.faces),
                                  t_read_s=row.t_read_s, t_detect_s=row.t_detect_s, detect_passes=row.detect_passes,
                                  detect_mpix=row.detect_mpix, input_size=row.input_size,
                                  input_version=row.input_version, input_sha256=row.input_sha256, **measures)

    def process(self, row: ImageRow) -> list[dict]:
        if not row.pending:  # error or withheld upstream: one image-level row, no output
            return [self.image_row(row, row.status, join_reasons(row.error, remove_stale_outputs(row, True, self.outputs)))]
        t0 = time.perf_counter()
        s, payload = self.settings, row.payload
        original, alpha = payload.pixels(s.input.max_pixels)
        if original.shape[:2] != (row.height, row.width):  # a decoder that differs from detection's
            raise ValueError(f"decoded {original.shape[1]}x{original.shape[0]} here but {row.width}x{row.height} at "
                             "detection: the face boxes would not match")
        image = original.copy()
        faces = payload.faces
        whole = payload.faces_from == "aligned"  # the image is the face: replaced, not pasted into
        if whole:
            withheld = compose.replace_whole(image, faces, s.anonymizer)
        else:
            withheld = compose.apply_faces(image, faces, s.merge.feather, s.anonymizer)
        audit = None
        if withheld is None and self.audit is not None and not whole:  # (aligned: the image is the face)
            audit = self.audit(image, faces)
            withheld = audit.withheld
            faces.extend(audit.faces)  # rows of their own, gated like the others; num_faces counts them
        status = Status.WITHHELD if withheld else Status.OK if faces else Status.NO_FACE
        output_uri, written = None, None  # where and what was written (its sha256)
        if not withheld:
            try:  # the gate judges the pixels as written; a re-identified aligned face is masked whole
                data, withheld = self.checks(original, image, faces, lambda im: io.encode_image(
                    im, alpha, row.output_uri, s.output.jpeg_quality), whole=whole)
                if withheld:
                    status = Status.WITHHELD
                else:
                    io.write_atomic(row.output_uri, data, self.outputs)
                    output_uri, written = row.output_uri, hashlib.sha256(data).hexdigest()  # the bytes written
            except Exception as exc:  # noqa: BLE001
                status, withheld = Status.ERROR, f"write failed: {describe(exc)}"
        withheld = join_reasons(withheld, remove_stale_outputs(row, output_uri is None, self.outputs))
        audited = {} if audit is None else {"audit_faces": len(audit.faces), "t_audit_s": audit.seconds}
        base = self.image_row(row, status, withheld, output_uri=output_uri, output_sha256=written,
                              t_merge_s=time.perf_counter() - t0, **audited)
        if not faces:
            return [base]
        base["detector"] = payload.faces_from or s.detection.backend
        return [manifest.face_row(base, f, s.privacy.reid_threshold) for f in faces]
