"""The anonymization job, top to bottom, as one streaming Ray Data pipeline.

    plan (driver, plan.py)                        {input_uri, rel_path, output_uri, stale_output_uri, error, notes}
                                                    [+ annotations, prompts: the side tables' rows, annotations.py]
      -> DetectFaces      CPU actor pool          + status, error, notes, width, height, t_read_s, t_detect_s,
                                                    payload: ImagePayload(source bytes, faces: [Face + crop,
                                                    prompt, id_embedding]); faces by input.mode: detect,
                                                    annotations (the row's table rows) or aligned (the image)
      -> AnonymizeFaces   GPU (or CPU) actor pool   each Face: + anon_crop, method_applied, tries, ...; - crop
      -> MergeAndWrite    CPU actor pool          -> manifest rows (one per face / per faceless image)
    manifest parts (driver)                       OUTPUT/_manifest/part-<run>-<n>.parquet

Each stage is a small callable class built once per actor from the ``JobConfig``; its resources and
pool size come from the config (``detection.resources``, ``anonymizer.resources``,
``merge.resources``). Rows between stages hold scalar columns plus one ``records.ImagePayload`` (the
image, as its encoded source bytes when smaller, and typed ``records.Face`` records), which Ray stores as
one opaque object per row so blocks always share a schema; the driver only ever sees the small manifest
rows. ``benchmarks/bench_boundaries.py`` measures the bytes each boundary carries.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from . import annotations, compose, io, manifest
from .anonymize import Anonymizer, DeviceFault, raise_if_device_fault
from .audit import OutputAudit
from .config import JobConfig, StageResources
from .records import Face, ImagePayload
from .records import join_reasons as _join

# -- helpers for Ray Data batches (dict of columns <-> list of row dicts) ----------------------------------

def _value(v):
    """Ray hands a column that was all ``None`` back as NaN floats: restore ``None``."""
    if isinstance(v, (float, np.floating)) and np.isnan(v):
        return None
    return v


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _value(batch[k][i]) for k in keys} for i in range(n)]


def _columns(rows: list[dict], keys: list[str] | None = None) -> dict:
    keys = keys or (list(rows[0]) if rows else [])
    cols = {}
    for k in keys:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r.get(k) for r in rows]
        cols[k] = col
    return cols


def face_seed(base_seed: int, mode: str, rel_path: str, face_index: int) -> int:
    if mode == "fixed":
        return int(base_seed)
    digest = hashlib.sha256(f"{base_seed}:{rel_path}:{face_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF


# -- stage 1: read, decode, detect, align -----------------------------------------------------------------

@dataclass
class _Found:
    """The faces of one image before alignment, whichever ``input.mode`` found them."""

    faces: list  # faces.DetectedFace, image px, largest first
    source: str  # the detector's name, or "annotations"
    keypoints: str  # where their landmarks came from: detector | annotations
    predict: list[bool] = field(default_factory=list)  # per face: no landmarks given, predict them in the box
    notes: list[str] = field(default_factory=list)
    withheld: str | None = None  # a reason to write nothing for this image


class DetectFaces:
    """Read, decode, find the faces (``input.mode``: detect, annotations, aligned), align them, choose each
    face's prompt (``prompts.table``) and, for reverse personalization, make its ArcFace identity embedding
    here on the CPU, so the GPU actor does not wait for it. ``inputs``: the storage the plan's input URIs lie
    under (``io.input_storage``); without it, the prefix a row's URI and relative path spell."""

    def __init__(self, cfg: JobConfig, inputs: io.Storage | None = None, identities: bool = True):
        # identities: False in estimate (counts faces, loads no ArcFace)
        from .faces import build_detector
        from .faces.align import align

        self.cfg, self.inputs = cfg, inputs
        mode = cfg.input.mode
        needs_detector = (mode == "detect" or (mode == "annotations" and cfg.input.annotations_missing == "detect")
                          or (mode == "aligned" and cfg.input.aligned_keypoints == "detector"))
        self.detector = build_detector(cfg.detection) if needs_detector else None
        self._align = align
        self._box_landmarks = None  # dlib's 68-point predictor, for annotated boxes without landmarks (lazy)
        self.embedder = None
        if identities and cfg.anonymizer.method == "reverse_personalization":  # lazy: blur jobs need no ArcFace
            from .faces.arcface import IdentityEmbedder

            self.embedder = IdentityEmbedder.from_config(cfg.diffusion)

    def __call__(self, batch: dict) -> dict:
        out = []
        for row in _rows(batch):
            try:
                out.append(self.process(row))
            except DeviceFault as exc:
                end_worker(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not drop the row: record it
                row.update(status="error", error=f"detection stage failed: {type(exc).__name__}: {exc}"[:500],
                           payload=ImagePayload())
                out.append({k: row.get(k) for k in KEYS_AFTER_DETECT})
        return _columns(out, KEYS_AFTER_DETECT)

    def process(self, row: dict) -> dict:
        cfg = self.cfg
        payload = ImagePayload()
        plan_error, plan_notes = row.get("error"), row.get("notes")
        row.update(payload=payload, notes=plan_notes or "", error=None, status=None, width=None, height=None,
                   t_read_s=None, t_detect_s=None, detect_passes=None, detect_mpix=None)
        if plan_error:  # refused at plan time (unsafe or colliding key, symlink out of the root)
            row.update(status="error", error=plan_error)
            return row
        t0 = time.perf_counter()
        try:
            inputs = self.inputs or io.listed_storage(row["input_uri"], row["rel_path"])
            data = io.read_bytes(row["input_uri"], cfg.input.max_bytes, inputs)
            decoded = io.decode_image(data, cfg.input.max_pixels)
        except io.InputError as exc:
            row.update(status="error", error=str(exc), t_read_s=time.perf_counter() - t0)
            return row
        except Exception as exc:  # noqa: BLE001 - storage errors: record, go on
            row.update(status="error", error=f"read failed: {type(exc).__name__}: {exc}"[:500],
                       t_read_s=time.perf_counter() - t0)
            return row
        rgb = decoded.rgb
        payload.image, payload.alpha = rgb, decoded.alpha
        row.update(notes=_join(plan_notes, *decoded.notes) or "", height=rgb.shape[0], width=rgb.shape[1],
                   t_read_s=time.perf_counter() - t0)
        t1 = time.perf_counter()
        try:
            if cfg.input.mode == "aligned":
                payload.faces_from, notes = "aligned", []
                faces = [self._aligned_face(row["rel_path"], rgb, notes)]
            else:
                found = self._find(row, rgb, decoded.orientation)
                if found.withheld:  # fail closed: nothing is written for this image, the manifest says why
                    row.update(status="withheld", error=found.withheld, payload=ImagePayload(),
                               notes=_join(row["notes"], *found.notes) or "", t_detect_s=time.perf_counter() - t1)
                    return row
                payload.faces_from, notes = found.source, found.notes
                faces = self._align_faces(row["rel_path"], rgb, found)
        except Exception as exc:  # noqa: BLE001 - cannot know where the faces are: withhold
            raise_if_device_fault(exc)  # a detector on a broken GPU: restart the worker instead
            row.update(status="withheld", error=f"face detection failed: {type(exc).__name__}: {exc}"[:500],
                       payload=ImagePayload(), t_detect_s=time.perf_counter() - t1)
            return row
        notes = notes + self._choose_prompts(row, faces)
        self._embed(faces)
        row["notes"] = _join(row["notes"], *notes) or ""
        payload.faces = faces
        payload.keep_smaller(data)  # lean boundary: the encoded source when it is smaller than the pixels
        row["t_detect_s"] = time.perf_counter() - t1
        return row

    # -- where the faces are -------------------------------------------------------------------------------
    def _find(self, row: dict, rgb: np.ndarray, orientation: int = 1) -> _Found:
        """The faces of ``rgb`` from the detector, or (annotations mode) from the plan row's own table rows."""
        from .orientation import annotated_faces

        cfg = self.cfg
        if cfg.input.mode == "annotations":
            if row.get("annotations") is not None:
                a, unplaced = annotated_faces(row["annotations"], rgb.shape, orientation, cfg.input.annotations_frame)
                if unplaced or a.unlocatable:  # a face we know of and cannot place: nothing may be written
                    return _Found([], "annotations", "annotations", notes=a.notes, withheld=unplaced or _join(
                        *a.unlocatable, "a face the annotations name cannot be located"))
                return _Found(a.faces, "annotations", "annotations", a.needs_landmarks, a.notes)
            missing = cfg.input.annotations_missing
            if missing == "withhold":
                return _Found([], "annotations", "annotations",
                              withheld="no annotation rows for this image (input.annotations_missing=withhold)")
            if missing == "skip":
                return _Found([], "annotations", "annotations",
                              notes=["no annotation rows: no faces (input.annotations_missing=skip)"])
            note = ["no annotation rows: faces detected (input.annotations_missing=detect)"]
        else:
            note = []
        found = self.detector.detect(rgb)
        cost = getattr(self.detector, "cost", None)  # the ensemble's: passes run, megapixels seen
        row.update(detect_passes=getattr(cost, "passes", None), detect_mpix=getattr(cost, "mpix", None))
        return _Found(found, cfg.detection.backend, "detector", [False] * len(found), note)

    def _align_faces(self, rel_path: str, rgb: np.ndarray, found: _Found) -> list[Face]:
        cfg = self.cfg
        faces = []
        for i, face in enumerate(found.faces):
            rec = Face(face_index=i, box=np.asarray(face.box, np.float32), det_score=float(face.score),
                       landmarks=np.asarray(face.landmarks, np.float32),
                       seed=face_seed(cfg.diffusion.seed, cfg.diffusion.seed_mode, rel_path, i),
                       small=face.size < cfg.detection.min_face_size, over_budget=i >= cfg.detection.max_faces,
                       found_by="; ".join(face.found_by) or None, low_confidence=not face.confident)
            faces.append(rec)
            if rec.over_budget:  # no crop: merge applies the fallback on the image box
                continue
            try:
                keypoints = found.keypoints
                if found.predict and found.predict[i]:  # an annotated box without landmarks: predict them
                    if self._box_landmarks is None:
                        from .faces.dlib_backend import BoxLandmarks

                        self._box_landmarks = BoxLandmarks()
                    face.landmarks = rec.landmarks = self._box_landmarks(rgb, face.box)
                    keypoints = "predictor"
                aligned = self._align(rgb, face, cfg.alignment)
                rec.crop, rec.matrix, rec.face_box, rec.kps5 = (aligned.crop, aligned.matrix, aligned.face_box,
                                                                aligned.kps5)
                rec.id_keypoints = keypoints
            except Exception as exc:  # noqa: BLE001 - merge will destroy the box directly
                rec.align_error = f"alignment failed: {type(exc).__name__}: {exc}"[:500]
        return faces

    def _aligned_face(self, rel_path: str, rgb: np.ndarray, notes: list[str]) -> Face:
        """``input.mode: aligned``: the whole image is the one face (centre-padded to a square when it is not
        one, resized to ``alignment.face_size``). Its keypoints and face box come from the alignment template,
        or from the detector run in the image (``input.aligned_keypoints``; none found: the template, noted)."""
        from .faces import align as al

        cfg, a = self.cfg, self.cfg.alignment
        crop, matrix = al.whole_image_crop(rgb, a.face_size)
        kps5, face_box = al.template_in_crop(a.face_size, a.padding, a.shift), al.template_box_in_crop(
            a.face_size, a.padding, a.shift)
        keypoints, score = "template", 1.0
        if cfg.input.aligned_keypoints == "detector":
            try:
                found = self.detector.detect(rgb)
            except Exception as exc:  # noqa: BLE001 - the face is the whole image either way: the template
                raise_if_device_fault(exc)
                found = []
                notes.append(f"aligned input: the detector failed ({type(exc).__name__}: {exc})"[:300])
            if found:
                best = found[0]  # largest first
                kps5 = al.transform_points(al.five_points(best.landmarks), matrix)
                face_box, keypoints, score = al.box_through(best.box, matrix), "detector", float(best.score)
            else:
                notes.append("aligned input: the detector found no face in it: template keypoints")
        inverse = al.invert_matrix(matrix)
        h, w = rgb.shape[:2]
        box = al.box_through(face_box, inverse)
        box = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
        size = float(max(box[2] - box[0], box[3] - box[1]))
        return Face(face_index=0, box=box, det_score=score, landmarks=al.transform_points(kps5, inverse),
                    seed=face_seed(cfg.diffusion.seed, cfg.diffusion.seed_mode, rel_path, 0),
                    small=size < cfg.detection.min_face_size, crop=crop, matrix=matrix, face_box=face_box,
                    kps5=kps5, id_keypoints=keypoints)

    # -- per-face conditioning -----------------------------------------------------------------------------
    def _choose_prompts(self, row: dict, faces: list[Face]) -> list[str]:
        """Each face's attribute prompt (reverse personalization only): its ``prompts.table`` row if one names it
        (``""`` there: no prompt), else ``diffusion.attribute_prompt``. Returns the notes of rows ignored."""
        from . import annotations

        cfg = self.cfg
        if cfg.anonymizer.method != "reverse_personalization":
            return []
        chosen, notes = [annotations.UNSET] * len(faces), []
        if row.get("prompts") is not None:
            chosen, notes = annotations.prompts_for_faces(row["prompts"], [f.box for f in faces], cfg.prompts.box_iou)
        for f, p in zip(faces, chosen):
            f.prompt = cfg.diffusion.attribute_prompt if p is annotations.UNSET else (p or None)
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


KEYS_AFTER_DETECT = ["input_uri", "rel_path", "output_uri", "stale_output_uri", "status", "error", "notes",
                     "width", "height", "t_read_s", "t_detect_s", "detect_passes", "detect_mpix", "payload"]


# -- stage 2: anonymize the crops -------------------------------------------------------------------------

class AnonymizeFaces:
    def __init__(self, cfg: JobConfig):
        self.anonymizer = Anonymizer(cfg)

    def __call__(self, batch: dict) -> dict:
        rows = _rows(batch)
        try:
            self.anonymizer([f for r in rows if r["status"] is None for f in r["payload"].faces])
        except DeviceFault as exc:
            end_worker(exc)
        except Exception as exc:  # noqa: BLE001 - faces not anonymized: withhold their images, say why
            for r in rows:
                if r["status"] is None:
                    r.update(status="withheld", error=f"anonymizer failed: {type(exc).__name__}: {exc}"[:500])
        for r in rows:  # lean boundary: the merge stage needs the anonymized crops, not the inputs
            for f in r["payload"].faces:
                f.crop = None
        return _columns(rows, KEYS_AFTER_DETECT)


DEVICE_FAULT_EXIT_CODE = 75


def end_worker(exc: BaseException) -> None:
    """End this worker process at once: Ray restarts the actor (a fresh CUDA context) and retries its batch
    (``ray.max_task_retries``). Raising instead would fail the batch as a user error, not restart anything."""
    import sys

    print(f"rp-distributed: {exc}; ending this worker so Ray restarts it", file=sys.stderr, flush=True)
    os._exit(DEVICE_FAULT_EXIT_CODE)


# -- stage 3: merge back, score, write --------------------------------------------------------------------

class MergeAndWrite:
    """Paste the anonymized faces back (``compose.apply_faces``; an aligned input is replaced whole,
    ``compose.replace_whole``), check every written face
    (``scoring.FaceChecks``), write the image, and return its manifest rows (``manifest.face_row``).
    ``outputs``: the output prefix's storage, through which every write and delete goes (nothing through a
    symlinked folder below it); without it, each output's own folder."""

    def __init__(self, cfg: JobConfig, run_id: str, detector_name: str, fingerprint: str | None = None,
                 outputs: io.Storage | None = None):
        from .scoring import FaceChecks

        self.cfg, self.outputs = cfg, outputs
        self.run_id = run_id
        self.detector_name = detector_name
        self.fingerprint = fingerprint
        self.checks = FaceChecks(cfg)
        self.audit = OutputAudit(cfg) if cfg.merge.audit.enabled else None

    def __call__(self, batch: dict) -> dict:
        out = []
        for row in _rows(batch):
            try:
                out.extend(self.process(row))
            except Exception as exc:  # noqa: BLE001 - a bug must not drop the row, nor leave an output behind
                base = self._base(row)
                base.update(status="error", error=_join(f"merge stage failed: {type(exc).__name__}: {exc}"[:500],
                                                        remove_stale_outputs(row, True, self.outputs)))
                out.append(base)
        return _columns(out, manifest.SCHEMA.names)

    def _base(self, row: dict) -> dict:
        return {"run_id": self.run_id, "input_uri": row["input_uri"], "rel_path": row["rel_path"],
                "output_uri": None, "status": row["status"], "error": row["error"], "notes": row["notes"] or None,
                "image_width": row["width"], "image_height": row["height"], "num_faces": len(row["payload"].faces),
                "settings_fingerprint": self.fingerprint,
                "t_read_s": row.get("t_read_s"), "t_detect_s": row.get("t_detect_s"),
                "detect_passes": row.get("detect_passes"), "detect_mpix": row.get("detect_mpix")}

    def process(self, row: dict) -> list[dict]:
        if row["status"] is not None:  # error or withheld upstream: one image-level row, no output
            base = self._base(row)
            base["error"] = _join(base["error"], remove_stale_outputs(row, True, self.outputs))
            return [base]
        t0 = time.perf_counter()
        cfg = self.cfg
        payload = row["payload"]
        original, alpha = payload.pixels(cfg.input.max_pixels)
        if original.shape[:2] != (row["height"], row["width"]):  # a decoder that differs from detection's
            raise ValueError(f"decoded {original.shape[1]}x{original.shape[0]} here but "
                             f"{row['width']}x{row['height']} at detection: the face boxes would not match")
        image = original.copy()
        faces = payload.faces
        whole = payload.faces_from == "aligned"  # the image is the face: replaced, not pasted into
        if whole:
            withheld = compose.replace_whole(image, faces, cfg.anonymizer)
        else:
            withheld = compose.apply_faces(image, faces, cfg.merge.feather, cfg.anonymizer)
        audit = None
        if withheld is None and self.audit is not None and not whole:  # (aligned: the image is the face)
            audit = self.audit(image, faces)
            withheld = audit.withheld
            faces.extend(audit.faces)  # rows of their own, gated like the others; num_faces counts them
        status = "withheld" if withheld else ("ok" if faces else "no_face")
        output_uri = None
        if not withheld:
            try:  # the gate judges the pixels as written; a re-identified aligned face is masked whole
                data, withheld = self.checks(original, image, faces, lambda im: io.encode_image(
                    im, alpha, row["output_uri"], cfg.output.jpeg_quality), whole=whole)
                if withheld:
                    status = "withheld"
                else:
                    io.write_atomic(row["output_uri"], data, self.outputs)
                    output_uri = row["output_uri"]
            except Exception as exc:  # noqa: BLE001
                status, withheld = "error", f"write failed: {type(exc).__name__}: {exc}"[:500]
        withheld = _join(withheld, remove_stale_outputs(row, output_uri is None, self.outputs))
        base = self._base(row)
        base.update(status=status, error=withheld, output_uri=output_uri, t_merge_s=time.perf_counter() - t0)
        if audit is not None:
            base.update(audit_faces=len(audit.faces), t_audit_s=audit.seconds)
        if not faces:
            return [base]
        base["detector"] = payload.faces_from or self.detector_name
        return [manifest.face_row(base, f, cfg.privacy.reid_threshold) for f in faces]


def remove_stale_outputs(row: dict, failed: bool, outputs: io.Storage | None = None) -> str | None:
    """Delete what an earlier run wrote for this input and this run does not replace.

    ``stale_output_uri``: an earlier output at another key (the plan sets it from the manifest when the key
    changed). When this run writes nothing (``failed``), the earlier output at this input's own key (the plan
    gave it to this input alone) goes too: a rerun whose outcome is withheld or error leaves no stale file
    behind. Each is deleted through ``outputs`` (a key outside the prefix, holding store syntax or reached
    through a symlinked folder is refused). Returns a reason when a delete failed or was refused.
    """
    stale = [row.get("stale_output_uri")] + ([row.get("output_uri")] if failed else [])
    problems = []
    for uri in filter(None, stale):
        try:
            io.remove(uri, outputs)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"stale output {uri} could not be deleted: {type(exc).__name__}: {exc}"[:300])
    return _join(*problems)


# -- the job ----------------------------------------------------------------------------------------------

def _stage_kwargs(cfg: JobConfig, res: StageResources, isolate: bool = False) -> dict:
    """Ray Data arguments of one actor-pool stage.

    A dead actor is restarted (``ray.max_actor_restarts``, unbounded by default) and its in-flight batch retried up to
    ``ray.max_task_retries`` times, not forever: an input that kills its worker every time (a native
    decoder crash, an OOM kill, a device fault) would otherwise stall the job. ``run_job`` retries the
    inputs of such a batch one by one and records the one that still fails.
    """
    import ray

    # Isolated: one input per batch and one batch in flight per actor, so a crash takes down nothing else.
    lo, hi = res.pool_bounds
    pool = ray.data.ActorPoolStrategy(min_size=lo, max_size=hi,
                                      max_tasks_in_flight_per_actor=1 if isolate else None)
    return dict(compute=pool, num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
                batch_size=1 if isolate else res.batch_size, batch_format="numpy", zero_copy_batch=False,
                max_restarts=cfg.ray.max_actor_restarts, max_task_retries=cfg.ray.max_task_retries)


INPUT_ROWS_PER_BLOCK = 32


def put_blocks(todo: pa.Table, rows_per_block: int = INPUT_ROWS_PER_BLOCK) -> list:
    """The plan's rows as object-store blocks of ``rows_per_block`` rows; the driver keeps only the refs.

    A worker that dies loses its task's whole input block (retried, then redone one by one): small blocks
    keep what one poison input costs small, and give every stage enough blocks to use the whole cluster.
    """
    import ray

    return [ray.put(todo.take(pa.array(range(i, min(i + rows_per_block, todo.num_rows)))))
            for i in range(0, todo.num_rows, rows_per_block)]


def build_dataset(cfg: JobConfig, blocks: list, run_id: str, fingerprint: str | None = None, isolate: bool = False,
                  inputs: io.Storage | None = None, outputs: io.Storage | None = None):
    """The three stages over the plan's ``blocks`` (``put_blocks``); ``isolate``: one input per batch;
    ``inputs``/``outputs``: the storages every read, write and delete goes through."""
    import ray

    ds = ray.data.from_arrow_refs(blocks)
    with warnings.catch_warnings():
        # max_restarts / max_task_retries have no named parameter in Ray 2.60; they still go through
        # ray_remote_args, which warns that the catch-all is deprecated.
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        ds = ds.map_batches(DetectFaces, fn_constructor_args=(cfg, inputs),
                            **_stage_kwargs(cfg, cfg.detection.resources, isolate))
        ds = ds.map_batches(AnonymizeFaces, fn_constructor_args=(cfg,),
                            **_stage_kwargs(cfg, cfg.anonymizer.resources, isolate))
        ds = ds.map_batches(MergeAndWrite,
                            fn_constructor_args=(cfg, run_id, cfg.detection.backend, fingerprint, outputs),
                            **_stage_kwargs(cfg, cfg.merge.resources, isolate))
    return ds


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's console chatter (execution banners, 'progress bars disabled') off unless ``verbose``; its
    log file in the Ray session folder keeps everything."""
    import logging

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = verbose
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.INFO if verbose else logging.ERROR)


@contextlib.contextmanager
def _native_stderr_aside():
    """Send what native code writes on file descriptor 2 to a temporary file for the block, and show it only
    if the block raises (Ray's C++ start-up lines print there, below Python's logging)."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def ensure_ray(cfg: JobConfig, verbose: bool = False) -> None:
    """Join RAY_ADDRESS (or ``ray.address``) if set, else start a local Ray in this process.

    Quiet unless ``verbose``: Ray's Python logging at ERROR, its C++ log lines (the driver prints them on
    stderr) at fatal unless RAY_BACKEND_LOG_LEVEL is set, and what Ray's native code prints while starting
    is shown only if the start fails. ``--verbose`` keeps Ray's defaults and, on a local Ray, forwards the
    workers' output too."""
    import logging

    import ray

    quiet_ray_data(verbose)
    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.ERROR
    if not verbose:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    with contextlib.nullcontext() if verbose else _native_stderr_aside():
        if address:
            ray.init(address=address, log_to_driver=True, logging_level=level)
        else:
            # address="local": a new Ray in this process, never a cluster that `ray start` left on this machine.
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=verbose,
                     logging_level=level)


@dataclass
class JobResult:
    run_id: str
    summary: dict
    skipped: int
    manifest_parts: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    redone_changed: int = 0  # done earlier under other anonymization settings, redone now
    unrecorded: int = 0  # outputs found with no manifest row (an earlier driver killed before its flush), redone
    renamed: int = 0  # inputs given a distinct output key (their natural keys collided)
    isolated: int = 0  # inputs of failed batches retried one by one
    settings_fingerprint: str = ""
    report_uri: str | None = None  # report.html beside the manifest (None: not written, see report_error)
    report_error: str | None = None


def lost_input_row(row: dict, run_id: str, fingerprint: str, retries: int, outputs: io.Storage | None = None) -> dict:
    """The manifest row of an input whose batch failed every time, also alone (a poison input)."""
    reason = (f"its worker died {2 * (retries + 1)} times, with its block and alone (a native crash, an "
              f"out-of-memory kill or a device fault; see the Ray worker logs); retries are bounded by "
              f"ray.max_task_retries={retries}")
    return {"run_id": run_id, "input_uri": row["input_uri"], "rel_path": row["rel_path"], "output_uri": None,
            "status": "error", "error": _join(reason, remove_stale_outputs(row, True, outputs)),
            "notes": row.get("notes"), "settings_fingerprint": fingerprint}


def _finished(seen: array.array) -> np.ndarray:
    """The distinct hashes of finished inputs, sorted."""
    return np.unique(np.frombuffer(seen, dtype=np.int64))


def _unfinished(blocks: list, seen: array.array, total: int) -> pa.Table:
    """The plan rows in ``blocks`` (``total`` rows) whose input produced no manifest row (``seen``: hashes of
    finished inputs), read back from the object store only when some are missing."""
    import ray

    done = _finished(seen)
    if len(done) >= total:
        return pa.table({})
    lost = []
    for ref in blocks:
        block = ray.get(ref)
        hashes = np.fromiter((hash(u) for u in block["input_uri"].to_pylist()), np.int64, block.num_rows)
        at = np.minimum(np.searchsorted(done, hashes), max(len(done) - 1, 0))
        finished = (done[at] == hashes) if len(done) else np.zeros(len(hashes), bool)
        if not finished.all():
            lost.append(block.filter(pa.array(~finished)))
    return pa.concat_tables(lost) if lost else pa.table({})


def _run_info(cfg: JobConfig, run_id: str, input_uri: str, output_uri: str, fingerprint: str, plan) -> dict:
    from .config import config_to_dict

    return {"run_id": run_id, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "input_uri": input_uri,
            "output_uri": output_uri, "settings_fingerprint": fingerprint, "inputs_planned": plan.num_todo,
            "inputs_skipped": plan.skipped, "config": config_to_dict(cfg)}


def _end_of_run(result: JobResult, cfg: JobConfig, output_uri: str, info: dict | None, report: bool) -> None:
    """Record the run's wall time beside its config, then write ``report.html``. A failure to write either is
    kept in ``result.report_error`` and never fails the job: the manifest is what counts."""
    from . import report as report_mod

    try:
        if info is not None:
            info.update(wall_s=round(result.wall_s, 3), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        summary=result.summary)
            report_mod.write_run_info(output_uri, cfg.output.manifest_dir, result.run_id, info)
        if report:  # this run's report.* settings decide (include_originals, gallery), never an earlier run's
            result.report_uri = report_mod.write_report(output_uri, cfg.output.manifest_dir, **cfg.report.model_dump())
    except Exception as exc:  # noqa: BLE001
        result.report_error = f"{type(exc).__name__}: {exc}"[:500]


def run_job(cfg: JobConfig, input_uri: str, output_uri: str, progress: bool = True, verbose: bool = False,
            report: bool = True) -> JobResult:
    """Run the whole job; returns the summary. Manifest parts are written as rows stream in, and at the end
    ``report.html`` beside them (``report``). ``verbose``: Ray's own logging as Ray has it.

    The run holds the output prefix's lease (``lease.py``) from before its plan to its end: a second run into
    the same prefix is refused (``lease.LeaseHeld``). With ``--overwrite`` the earlier manifest is retired only
    once this run completed: a failed overwrite leaves it whole beside the new run's parts."""
    from .config import anonymization_fingerprint
    from .lease import Lease
    from .plan import make_plan

    t0 = time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    output_uri = io.normalize_prefix(output_uri)
    outputs = io.Storage(output_uri)
    fingerprint = anonymization_fingerprint(cfg)
    with Lease(outputs, cfg.output.manifest_dir, run_id) as lease:
        plan = make_plan(cfg, input_uri, output_uri, fingerprint)
        result = JobResult(run_id=run_id, summary=manifest.summarize([]), skipped=plan.skipped,
                           redone_changed=plan.redone_changed, unrecorded=plan.unrecorded, renamed=plan.renamed,
                           settings_fingerprint=fingerprint)
        info = None
        if plan.num_todo or plan.orphans:
            from .report import write_run_info

            info = _run_info(cfg, run_id, input_uri, output_uri, fingerprint, plan)
            write_run_info(output_uri, cfg.output.manifest_dir, run_id, info)  # the report shows the run's config
            if plan.num_todo:
                ensure_ray(cfg, verbose)
            _execute(cfg, plan, result, io.input_storage(input_uri), outputs, input_uri, lease, progress)
        lease.check()
        manifest.retire(output_uri, plan.retire)  # --overwrite: the earlier manifest, now that this run completed
        result.wall_s = time.perf_counter() - t0
        if info is not None or (report and manifest.part_uris(output_uri, cfg.output.manifest_dir)):
            _end_of_run(result, cfg, output_uri, info, report)
    return result


def _execute(cfg: JobConfig, plan, result: JobResult, inputs: io.Storage, outputs: io.Storage, input_uri: str,
             lease, progress: bool) -> None:
    """Stream the plan through the stages into the manifest; fills ``result``'s summary, parts and counts."""
    import ray

    from . import progress as progress_mod

    run_id, fingerprint = result.run_id, result.settings_fingerprint
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our bar (Progress) shows each stage's state
    progress_mod.register(ctx)
    ctx.max_errored_blocks = -1  # a batch that failed all its retries is redone below, input by input
    # The driver keeps no rows: a streaming summary, the manifest buffer, and one 64-bit hash per finished
    # input (to find the inputs of failed blocks), 8 bytes an input instead of its rows.
    summary, seen = manifest.Summary(), array.array("q")
    total = plan.num_todo
    orphans = plan.orphans  # side-table rows naming images that are not in the input: one error row per path
    blocks = put_blocks(plan.table)  # the plan's rows now live in the object store, not on the driver
    del plan
    bar = progress_mod.ACTIVE = progress_mod.Progress(total, enabled=progress)
    out_cfg = cfg.output
    writer = manifest.PartWriter(output_uri=outputs.uri, manifest_dir=out_cfg.manifest_dir, run_id=run_id,
                                 rows_per_file=out_cfg.manifest_rows_per_file,
                                 bytes_per_file=out_cfg.manifest_bytes_per_file, flush_s=out_cfg.manifest_flush_s)

    def take(row: dict) -> None:
        lease.check()  # another run took the prefix over: stop here
        summary.add(row)
        writer.add(row)
        first = row.get("face_index") in (None, 0)  # an input's first row
        if first:
            seen.append(hash(row["input_uri"]))
        bar.add(images=int(first), faces=int(row.get("face_index") is not None))

    def stream(ds) -> None:
        for row in ds.iter_rows():
            take({k: _value(v.item() if isinstance(v, np.generic) else v) for k, v in row.items()})

    try:
        for orphan in orphans:  # not take(): they are no plan input, so not counted as finished inputs
            row = annotations.orphan_row(orphan, input_uri, run_id, fingerprint)
            summary.add(row)
            writer.add(row)
        if blocks:
            stream(build_dataset(cfg, blocks, run_id, fingerprint, inputs=inputs, outputs=outputs))
        lost = _unfinished(blocks, seen, total)
        del blocks
        if lost.num_rows > cfg.ray.max_isolated_inputs:
            raise RuntimeError(f"{lost.num_rows} inputs were lost to failed batches (more than "
                               f"ray.max_isolated_inputs={cfg.ray.max_isolated_inputs}): a systemic failure, see "
                               "the Ray logs. What finished is in the manifest; rerun to resume.")
        if lost.num_rows:
            result.isolated = lost.num_rows
            alone = put_blocks(lost, rows_per_block=1)
            finished_before = len(_finished(seen))
            stream(build_dataset(cfg, alone, run_id, fingerprint, isolate=True, inputs=inputs, outputs=outputs))
            for r in _unfinished(alone, seen, finished_before + lost.num_rows).to_pylist():
                take(lost_input_row(r, run_id, fingerprint, cfg.ray.max_task_retries, outputs))
    finally:
        bar.close()
        progress_mod.ACTIVE = None
        writer.close()
        result.manifest_parts = writer.parts
    result.summary = summary.result()
