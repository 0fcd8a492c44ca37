"""The detection stage (CPU actor pool): read and decode each input, find its faces (``faces.sources.FaceFinder``),
choose each face's attribute prompt (``prompts.table``) and, for reverse personalization, make its ArcFace identity
embedding here on the CPU, so the GPU actor does not wait for it."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from .. import io
from ..config import (AlignmentConfig, AnonymizerConfig, DetectionConfig, DiffusionConfig, InputConfig, PromptsConfig,
                      PseudonymsConfig)
from ..faces.annotated import UNSET, prompts_for_faces, values_for_faces
from ..faces.sources import FaceFinder
from ..faults import DeviceFault, describe, end_worker, raise_if_device_fault
from ..records import Face, ImagePayload, ImageRow, Status, join_reasons
from .batch import columns, rows


@dataclass(frozen=True)
class DetectSettings:
    """The config sections the detection stage is built from."""

    input: InputConfig
    detection: DetectionConfig
    alignment: AlignmentConfig
    diffusion: DiffusionConfig  # seeds, the default prompt, the ArcFace model
    prompts: PromptsConfig
    anonymizer: AnonymizerConfig  # whether the method generates (prompts and identities matter then)
    pseudonyms: PseudonymsConfig = field(default_factory=PseudonymsConfig)  # how a subject row names its face

    @classmethod
    def of(cls, cfg) -> "DetectSettings":
        return cls(cfg.input, cfg.detection, cfg.alignment, cfg.diffusion, cfg.prompts, cfg.anonymizer, cfg.pseudonyms)


class DetectFaces:
    """``inputs``: the storage the plan's input URIs lie under (``io.input_storage``); without it, the prefix a row's
    URI and relative path spell. ``identities``: False where faces are only counted (``estimate``: no ArcFace)."""

    def __init__(self, settings: DetectSettings, inputs: io.Storage | None = None, identities: bool = True):
        self.settings, self.inputs = settings, inputs
        self.finder = FaceFinder(settings.input, settings.detection, settings.alignment, settings.diffusion)
        self.embedder = None
        if identities and settings.anonymizer.generative:  # blur jobs need no ArcFace
            from ..faces.arcface import IdentityEmbedder

            self.embedder = IdentityEmbedder.from_config(settings.diffusion)

    @classmethod
    def from_config(cls, cfg, inputs: io.Storage | None = None, identities: bool = True) -> "DetectFaces":
        return cls(DetectSettings.of(cfg), inputs, identities)

    def __call__(self, batch: dict) -> dict:
        out = []
        for row in rows(batch):
            try:
                out.append(self.process(row))
            except DeviceFault as exc:
                end_worker(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not drop the row: record it
                out.append(row.finish(Status.ERROR, f"detection stage failed: {describe(exc)}"))
        return columns(out)

    def process(self, row: ImageRow) -> ImageRow:
        try:
            return self._process(row)
        finally:
            row.annotations = row.prompts = row.subjects = None  # used here: the stages after this one do not carry them

    def _process(self, row: ImageRow) -> ImageRow:
        if row.error:  # refused at plan time (unsafe or colliding key, symlink out of the root)
            return row.finish(Status.ERROR, row.error)
        t0 = time.perf_counter()
        try:
            inputs = self.inputs or io.listed_storage(row.input_uri, row.rel_path)
            data = io.read_bytes(row.input_uri, self.settings.input.max_bytes, inputs)
            row.input_sha256 = hashlib.sha256(data).hexdigest()  # the bytes in hand: no second read
            decoded = io.decode_image(data, self.settings.input.max_pixels)
        except io.InputError as exc:
            row.t_read_s = time.perf_counter() - t0
            return row.finish(Status.ERROR, str(exc))
        except Exception as exc:  # noqa: BLE001 - storage errors: record, go on
            row.t_read_s = time.perf_counter() - t0
            return row.finish(Status.ERROR, f"read failed: {describe(exc)}")
        rgb = decoded.rgb
        row.payload = ImagePayload(image=rgb, alpha=decoded.alpha)
        row.notes = join_reasons(row.notes, *decoded.notes)
        row.height, row.width, row.t_read_s = rgb.shape[0], rgb.shape[1], time.perf_counter() - t0
        t1 = time.perf_counter()
        try:
            found = self.finder.find(rgb, row.rel_path, row.annotations, decoded.orientation)
        except Exception as exc:  # noqa: BLE001 - cannot know where the faces are: withhold
            raise_if_device_fault(exc)  # a detector on a broken GPU: restart the worker instead
            row.t_detect_s = time.perf_counter() - t1
            return row.finish(Status.WITHHELD, f"face detection failed: {describe(exc)}")
        row.detect_passes, row.detect_mpix = found.passes, found.mpix
        if found.withheld:  # fail closed: nothing is written for this image, the manifest says why
            row.notes, row.t_detect_s = join_reasons(row.notes, *found.notes), time.perf_counter() - t1
            return row.finish(Status.WITHHELD, found.withheld)
        notes = found.notes + self._choose_prompts(row, found.faces) + self._choose_subjects(row, found.faces)
        self._embed(found.faces)
        row.notes = join_reasons(row.notes, *notes)
        row.payload.faces, row.payload.faces_from = found.faces, found.faces_from
        row.payload.keep_smaller(data)  # lean boundary: the encoded source when it is smaller than the pixels
        row.t_detect_s = time.perf_counter() - t1
        return row

    def _choose_prompts(self, row: ImageRow, faces: list[Face]) -> list[str]:
        """Each face's attribute prompt (generative methods only): its ``prompts.table`` row if one names it (``""``
        there: no prompt), else ``diffusion.attribute_prompt``. Returns the notes of rows ignored."""
        s = self.settings
        if not s.anonymizer.generative:
            return []
        chosen, notes = [UNSET] * len(faces), []
        if row.prompts is not None:
            chosen, notes = prompts_for_faces(row.prompts, [f.box for f in faces], s.prompts.box_iou)
        for f, p in zip(faces, chosen):
            f.prompt = s.diffusion.attribute_prompt if p is UNSET else (p or None)
        return notes

    def _choose_subjects(self, row: ImageRow, faces: list[Face]) -> list[str]:
        """Each face's subject digest from its ``pseudonyms.table`` row (any method: destructive ones record
        pseudonym_id too); faces no row names have none. Returns the notes of rows ignored."""
        if row.subjects is None:
            return []
        chosen, notes = values_for_faces(row.subjects, [f.box for f in faces], self.settings.pseudonyms.box_iou,
                                         "pseudonym", "subjects")
        for f, digest in zip(faces, chosen):
            f.pseudonym = None if digest is UNSET else digest
        return notes

    def _embed(self, faces: list[Face]) -> None:
        """ArcFace identity embeddings of the faces that have a crop and keypoints. A failure sets nothing: the
        anonymizer then embeds the face itself, and falls back to the destructive method if that fails too."""
        if self.embedder is None:
            return
        todo = [f for f in faces if f.crop is not None and f.kps5 is not None]
        if not todo:
            return
        try:
            embs = self.embedder.embed_many([f.crop for f in todo], [f.kps5 for f in todo])
        except Exception as exc:  # noqa: BLE001 - one by one, so one bad face cannot cost the others theirs
            raise_if_device_fault(exc)
            embs = []
            for f in todo:
                try:
                    embs.append(self.embedder.embed(f.crop, f.kps5))
                except Exception as exc1:  # noqa: BLE001
                    raise_if_device_fault(exc1)
                    embs.append(None)
        for f, e in zip(todo, embs):
            if e is not None and np.isfinite(e).all():
                f.id_embedding = np.asarray(e, np.float32)
