"""The anonymization job, top to bottom, as one streaming Ray Data pipeline.

    list inputs (driver)                          {input_uri, rel_path, output_uri}
      -> DetectFaces      CPU actor pool          + status, error, notes, width, height, timings,
                                                    payload: ImagePayload(image, alpha, faces[...])
      -> AnonymizeFaces   GPU (or CPU) actor pool   payload.faces[i] + anon_crop, method_applied, tries, ...
      -> MergeAndWrite    CPU actor pool          -> manifest rows (one per face / per faceless image)
    manifest parts (driver)                       OUTPUT/_manifest/part-<run>-<n>.parquet

Each stage is a small callable class built once per actor from the ``JobConfig``; its resources and
pool size come from the config (``detection.resources``, ``anonymizer.resources``,
``merge.resources``). Rows between stages hold scalar columns plus one ``ImagePayload`` object (pixels
and face records, documented in ``FACE_RECORD``), which Ray stores as one opaque object per row so blocks
always share a schema; the driver only ever sees the small manifest rows.
"""

from __future__ import annotations

import array
import hashlib
import math
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import compose, io, manifest
from .anonymize import Anonymizer, DeviceFault, raise_if_device_fault
from .config import JobConfig, StageResources

FACE_RECORD = {
    "face_index": "int, order in the image (largest face first)",
    "box": "float32[4] x0,y0,x1,y1 image px", "det_score": "float", "landmarks": "float32[K,2] image px",
    "small": "bool, below detection.min_face_size", "seed": "int, diffusion seed of this face",
    "over_budget": "bool, beyond detection.max_faces: no crop, the fallback is applied on the image box",
    "crop": "uint8[S,S,3] aligned crop", "matrix": "float32[2,3] image->crop", "face_box": "float32[4] crop px",
    "kps5": "float32[5,2] crop px", "align_error": "str | None",
    "anon_crop": "uint8[S,S,3] | None (set by AnonymizeFaces)", "method_applied": "str", "face_error": "str | None",
    "tries / tries_json / guidance_final / unet_evals / t_anonymize_s": "reverse personalization bookkeeping",
}


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


@dataclass
class ImagePayload:
    """The pixels and faces of one image as they travel between stages."""

    image: np.ndarray | None = None  # HxWx3 uint8 RGB, EXIF orientation applied
    alpha: np.ndarray | None = None  # HxW uint8, when the source had transparency
    faces: list[dict] = field(default_factory=list)  # FACE_RECORD dicts


def face_seed(base_seed: int, mode: str, rel_path: str, face_index: int) -> int:
    if mode == "fixed":
        return int(base_seed)
    digest = hashlib.sha256(f"{base_seed}:{rel_path}:{face_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF


# -- stage 1: read, decode, detect, align -----------------------------------------------------------------

class DetectFaces:
    def __init__(self, cfg: JobConfig):
        from .faces import build_detector
        from .faces.align import align

        self.cfg = cfg
        self.detector = build_detector(cfg.detection)
        self._align = align

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
                   t_read_s=None, t_detect_s=None)
        if plan_error:  # refused at plan time (unsafe or colliding key, symlink out of the root)
            row.update(status="error", error=plan_error)
            return row
        t0 = time.perf_counter()
        try:
            data = io.read_bytes(row["input_uri"], cfg.input.max_bytes)
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
            found = self.detector.detect(rgb)
        except Exception as exc:  # noqa: BLE001 - cannot know where the faces are: withhold
            raise_if_device_fault(exc)  # a detector on a broken GPU: restart the worker instead
            row.update(status="withheld", error=f"face detection failed: {type(exc).__name__}: {exc}"[:500],
                       payload=ImagePayload(), t_detect_s=time.perf_counter() - t1)
            return row
        faces = []
        for i, face in enumerate(found):
            rec = {"face_index": i, "box": np.asarray(face.box, np.float32), "det_score": float(face.score),
                   "landmarks": np.asarray(face.landmarks, np.float32),
                   "small": face.size < cfg.detection.min_face_size,
                   "over_budget": i >= cfg.detection.max_faces,
                   "seed": face_seed(cfg.diffusion.seed, cfg.diffusion.seed_mode, row["rel_path"], i),
                   "align_error": None}
            faces.append(rec)
            if rec["over_budget"]:  # no crop: merge applies the fallback on the image box
                continue
            try:
                aligned = self._align(rgb, face, cfg.alignment)
                rec.update(crop=aligned.crop, matrix=aligned.matrix, face_box=aligned.face_box, kps5=aligned.kps5)
            except Exception as exc:  # noqa: BLE001 - merge will destroy the box directly
                rec["align_error"] = f"alignment failed: {type(exc).__name__}: {exc}"[:500]
        payload.faces = faces
        row["t_detect_s"] = time.perf_counter() - t1
        return row


KEYS_AFTER_DETECT = ["input_uri", "rel_path", "output_uri", "stale_output_uri", "status", "error", "notes",
                     "width", "height", "t_read_s", "t_detect_s", "payload"]


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
    def __init__(self, cfg: JobConfig, run_id: str, detector_name: str, fingerprint: str | None = None):
        import dlib

        from .faces.dlib_backend import SHAPE68_FILE, resolve_model_files
        from .scoring import ReidScorer

        self.cfg = cfg
        self.run_id = run_id
        self.detector_name = detector_name
        self.fingerprint = fingerprint
        self.scorer = ReidScorer(cfg.privacy)
        self.reporter = None
        if cfg.privacy.report_recognizer:  # a second recognizer, for the report only
            from .diffusion.identity import IdentityEmbedder
            from .diffusion.loading import resolve_arcface

            self.reporter = IdentityEmbedder(resolve_arcface(cfg.privacy.report_recognizer, cfg.diffusion.cache_dir),
                                             cfg.privacy.report_providers)
        shape68 = resolve_model_files(None, [SHAPE68_FILE], backend="merge/landmarks")[SHAPE68_FILE]
        self._landmarks68 = dlib.shape_predictor(str(shape68))
        self._dlib = dlib

    def __call__(self, batch: dict) -> dict:
        out = []
        for row in _rows(batch):
            try:
                out.extend(self.process(row))
            except Exception as exc:  # noqa: BLE001 - a bug must not drop the row, nor leave an output behind
                base = self._base(row)
                base.update(status="error", error=_join(f"merge stage failed: {type(exc).__name__}: {exc}"[:500],
                                                        remove_stale_outputs(row, failed=True)))
                out.append(base)
        return _columns(out, manifest.SCHEMA.names)

    def _base(self, row: dict) -> dict:
        return {"run_id": self.run_id, "input_uri": row["input_uri"], "rel_path": row["rel_path"],
                "output_uri": None, "status": row["status"], "error": row["error"], "notes": row["notes"] or None,
                "image_width": row["width"], "image_height": row["height"], "num_faces": len(row["payload"].faces),
                "settings_fingerprint": self.fingerprint,
                "t_read_s": row.get("t_read_s"), "t_detect_s": row.get("t_detect_s")}

    def process(self, row: dict) -> list[dict]:
        if row["status"] is not None:  # error or withheld upstream: one image-level row, no output
            base = self._base(row)
            base["error"] = _join(base["error"], remove_stale_outputs(row, failed=True))
            return [base]
        t0 = time.perf_counter()
        cfg = self.cfg
        payload = row["payload"]
        original = payload.image
        image = original.copy()
        faces = payload.faces
        withheld = None
        for f in faces:
            if f.get("anon_crop") is not None:
                try:
                    compose.paste_back(image, f["anon_crop"], f["matrix"], f["face_box"], cfg.merge.feather, out=image)
                    continue
                except Exception as exc:  # noqa: BLE001 - fail closed: destroy the box in the image itself
                    f["face_error"] = _join(f.get("face_error"), f"merge failed: {type(exc).__name__}: {exc}"[:500])
            f["face_error"] = f.get("face_error") or "no anonymized crop"
            try:
                compose.destroy_box(image, f["box"], cfg.anonymizer.fallback, cfg.anonymizer, out=image)
                f["method_applied"] = f"{cfg.anonymizer.fallback} (image box)"
            except Exception as exc:  # noqa: BLE001
                withheld = f"face {f['face_index']} could not be anonymized: {type(exc).__name__}: {exc}"[:500]
                f["method_applied"] = None
        if withheld is None:
            self._score(original, image, faces)
        status = "withheld" if withheld else ("ok" if faces else "no_face")
        output_uri = None
        if not withheld:
            try:
                data = io.encode_image(image, payload.alpha, row["output_uri"], cfg.output.jpeg_quality)
                io.write_atomic(row["output_uri"], data)
                output_uri = row["output_uri"]
            except Exception as exc:  # noqa: BLE001
                status, withheld = "error", f"write failed: {type(exc).__name__}: {exc}"[:500]
        withheld = _join(withheld, remove_stale_outputs(row, failed=output_uri is None))
        t_merge = time.perf_counter() - t0
        base = self._base(row)
        base.update(status=status, error=withheld, output_uri=output_uri, t_merge_s=t_merge)
        if not faces:
            return [base]
        return [self._face_row(base, f) for f in faces]

    def _utility(self, original: np.ndarray, image: np.ndarray, box: np.ndarray) -> dict:
        """Head-pose change and landmark drift between the original and the written face (same box)."""
        from .faces.align import head_pose, landmark_displacement

        x0, y0, x1, y1 = [int(round(float(v))) for v in box]
        rect = self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)
        pts = [np.array([(p.x, p.y) for p in self._landmarks68(im, rect).parts()], np.float32)
               for im in (original, image)]
        pose = np.subtract(head_pose(pts[1]), head_pose(pts[0]))
        return {"pose_diff_deg": float(np.abs(pose).max()), "landmark_displacement": landmark_displacement(*pts)}

    def _report(self, original: np.ndarray, image: np.ndarray, f: dict) -> dict:
        """Second recognizer's distance (1 - cosine) between the original and the written face, both
        aligned on the detected face's 5 points (the method keeps the face where it was)."""
        from .faces.align import five_points

        kps = five_points(f["landmarks"])
        before, after = self.reporter.embed_many([original, image], [kps, kps])
        distance = float(1.0 - np.dot(before, after))
        return {"report_distance": distance, "report_reidentified": distance < self.cfg.privacy.report_threshold}

    def _mask(self, image: np.ndarray, f: dict, reason: str) -> None:
        """Mask the face's box in ``image`` (in place) and say why in the face record."""
        compose.destroy_box(image, f["box"], "mask", self.cfg.anonymizer, out=image)
        f["face_error"] = _join(f.get("face_error"), reason)
        f["method_applied"] = f"{f.get('method_applied')}+mask"

    def _score(self, original: np.ndarray, image: np.ndarray, faces: list[dict]) -> None:
        """Re-ID each written face with the independent recognizer, in ``image`` in place.

        A face still re-identified is masked (``privacy.fallback_if_reidentified``). A face whose check
        fails is masked too (fail closed): a face we could not verify is not exported as it is.
        """
        privacy = self.cfg.privacy
        for f in faces:
            try:
                res = self.scorer.compare(original, image, f["box"])
                if res.reidentified and privacy.fallback_if_reidentified and not is_masked(f.get("method_applied")):
                    self._mask(image, f, "re-identified in the output: masked")
                    res = self.scorer.compare(original, image, f["box"])
                f.update(reid_distance=res.distance, reidentified=res.reidentified,
                         face_still_detected=res.face_still_detected)
            except Exception as exc:  # noqa: BLE001 - fail closed: a face we cannot check is masked
                reason = f"re-ID check failed: {type(exc).__name__}: {exc}"[:300]
                f["score_error"] = reason
                if not is_masked(f.get("method_applied")):
                    self._mask(image, f, f"{reason}: masked")
            if self.reporter is not None:
                try:
                    f.update(self._report(original, image, f))
                except Exception as exc:  # noqa: BLE001 - reporting only: record, never gate
                    f["score_error"] = _join(f.get("score_error"), f"report recognizer failed: {type(exc).__name__}: {exc}"[:200])
            try:
                f.update(self._utility(original, image, f["box"]))
            except Exception as exc:  # noqa: BLE001 - utility signals are informative only
                f["score_error"] = _join(f.get("score_error"), f"utility signals failed: {type(exc).__name__}: {exc}"[:200])

    def _face_row(self, base: dict, f: dict) -> dict:
        row = dict(base)
        box = [float(v) for v in f["box"]]
        reidentified = f.get("reidentified")
        row.update(face_index=f["face_index"], box_x0=box[0], box_y0=box[1], box_x1=box[2], box_y1=box[3],
                   det_score=f["det_score"], face_size_px=max(box[2] - box[0], box[3] - box[1]),
                   detector=self.detector_name, method=f.get("method"), method_applied=f.get("method_applied"),
                   face_error=f.get("face_error") or None, params=f.get("params"), model=f.get("model"),
                   seed=f.get("seed"), guidance_final=f.get("guidance_final"), tries=f.get("tries"),
                   tries_json=f.get("tries_json"), unet_evals=f.get("unet_evals"),
                   reid_distance=f.get("reid_distance"), reidentified=reidentified,
                   reid_threshold=self.cfg.privacy.reid_threshold,
                   identity_exported=(None if reidentified is None or base["output_uri"] is None
                                      else bool(reidentified) and not is_masked(f.get("method_applied"))),
                   score_error=f.get("score_error"), report_distance=f.get("report_distance"),
                   report_reidentified=f.get("report_reidentified"),
                   face_still_detected=f.get("face_still_detected"), pose_diff_deg=f.get("pose_diff_deg"),
                   landmark_displacement=f.get("landmark_displacement"), t_anonymize_s=f.get("t_anonymize_s"))
        return row


def is_masked(method_applied: str | None) -> bool:
    """Whether the written face's last applied method is a solid mask (no pixel of the face is left)."""
    if not method_applied:
        return False
    return method_applied.split("+")[-1].split(" ")[0] == "mask"


def _join(*reasons: str | None) -> str | None:
    return "; ".join(r for r in reasons if r) or None


def remove_stale_outputs(row: dict, failed: bool) -> str | None:
    """Delete what an earlier run wrote for this input and this run does not replace.

    ``stale_output_uri``: an earlier output at another key (the plan sets it when the key changed). When
    this run writes nothing (``failed``), the earlier output at this input's own key goes too: a rerun
    whose outcome is withheld or error leaves no stale file behind. Returns a reason when a delete failed.
    """
    stale = [row.get("stale_output_uri")] + ([row.get("output_uri")] if failed else [])
    problems = []
    for uri in filter(None, stale):
        try:
            io.remove(uri)
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


def build_dataset(cfg: JobConfig, todo: list[dict], run_id: str, fingerprint: str | None = None,
                  isolate: bool = False):
    """The three stages over ``todo``; ``isolate``: one input per block and per batch."""
    import ray

    # A worker that dies loses its task's whole input block (retried, then redone one by one): keep blocks
    # small so one poison input costs few retries.
    blocks = len(todo) if isolate else math.ceil(len(todo) / INPUT_ROWS_PER_BLOCK)
    ds = ray.data.from_items(todo, override_num_blocks=max(1, blocks))
    with warnings.catch_warnings():
        # max_restarts / max_task_retries have no named parameter in Ray 2.60; they still go through
        # ray_remote_args, which warns that the catch-all is deprecated.
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        ds = ds.map_batches(DetectFaces, fn_constructor_args=(cfg,),
                            **_stage_kwargs(cfg, cfg.detection.resources, isolate))
        ds = ds.map_batches(AnonymizeFaces, fn_constructor_args=(cfg,),
                            **_stage_kwargs(cfg, cfg.anonymizer.resources, isolate))
        ds = ds.map_batches(MergeAndWrite, fn_constructor_args=(cfg, run_id, cfg.detection.backend, fingerprint),
                            **_stage_kwargs(cfg, cfg.merge.resources, isolate))
    return ds


def ensure_ray(cfg: JobConfig) -> None:
    """Join RAY_ADDRESS (or ``ray.address``) if set, else start a local Ray in this process."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": a new Ray in this process, never a cluster that `ray start` left on this machine.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False)


@dataclass
class JobResult:
    run_id: str
    summary: dict
    skipped: int
    manifest_parts: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    redone_changed: int = 0  # done earlier under other anonymization settings, redone now
    renamed: int = 0  # inputs given a distinct output key (their natural keys collided)
    isolated: int = 0  # inputs of failed batches retried one by one
    settings_fingerprint: str = ""


def lost_input_row(row: dict, run_id: str, fingerprint: str, retries: int) -> dict:
    """The manifest row of an input whose batch failed every time, also alone (a poison input)."""
    reason = (f"its worker died {2 * (retries + 1)} times, with its block and alone (a native crash, an "
              f"out-of-memory kill or a device fault; see the Ray worker logs); retries are bounded by "
              f"ray.max_task_retries={retries}")
    return {"run_id": run_id, "input_uri": row["input_uri"], "rel_path": row["rel_path"], "output_uri": None,
            "status": "error", "error": _join(reason, remove_stale_outputs(row, failed=True)),
            "notes": row.get("notes"), "settings_fingerprint": fingerprint}


def _unfinished(todo: list[dict], seen: array.array) -> list[dict]:
    """The rows of ``todo`` whose input produced no manifest row (``seen``: hashes of finished inputs)."""
    done = np.frombuffer(seen, dtype=np.int64) if len(seen) else np.zeros(0, np.int64)
    mask = np.isin(np.fromiter((hash(r["input_uri"]) for r in todo), np.int64, len(todo)), done)
    return [r for r, finished in zip(todo, mask) if not finished]


def run_job(cfg: JobConfig, input_uri: str, output_uri: str, progress: bool = True) -> JobResult:
    """Run the whole job; returns the summary. Manifest parts are written as rows stream in."""
    import ray
    from tqdm import tqdm

    from .config import anonymization_fingerprint
    from .plan import make_plan

    t0 = time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    output_uri = io.normalize_prefix(output_uri)
    fingerprint = anonymization_fingerprint(cfg)
    plan = make_plan(cfg, input_uri, output_uri, fingerprint)
    result = JobResult(run_id=run_id, summary=manifest.summarize([]), skipped=plan.skipped,
                       redone_changed=plan.redone_changed, renamed=plan.renamed, settings_fingerprint=fingerprint)
    if not plan.todo:
        result.wall_s = time.perf_counter() - t0
        return result
    ensure_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.max_errored_blocks = -1  # a batch that failed all its retries is redone below, input by input
    # The driver keeps no rows: a streaming summary, the manifest buffer, and one 64-bit hash per finished
    # input (to find the inputs of failed blocks), 8 bytes an input instead of its rows.
    summary, buffer, seen = manifest.Summary(), [], array.array("q")
    bar = tqdm(total=len(plan.todo), unit="img", desc="anonymizing", disable=not progress)

    out_cfg = cfg.output
    buffered = {"bytes": 0, "since": time.monotonic()}

    def flush() -> None:
        nonlocal buffer
        if buffer:
            result.manifest_parts.append(manifest.write_part(
                output_uri, out_cfg.manifest_dir, run_id, len(result.manifest_parts), buffer))
        buffer = []
        buffered.update(bytes=0, since=time.monotonic())

    def take(row: dict) -> None:
        summary.add(row)
        if not buffer:
            buffered["since"] = time.monotonic()
        buffer.append(row)
        buffered["bytes"] += sum(len(v) if isinstance(v, str) else 8 for v in row.values())
        if row.get("face_index") in (None, 0):  # an input's first row
            seen.append(hash(row["input_uri"]))
            bar.update(1)
        if (len(buffer) >= out_cfg.manifest_rows_per_file or buffered["bytes"] >= out_cfg.manifest_bytes_per_file
                or time.monotonic() - buffered["since"] >= out_cfg.manifest_flush_s):
            flush()

    def stream(ds) -> None:
        for row in ds.iter_rows():
            take({k: _value(v.item() if isinstance(v, np.generic) else v) for k, v in row.items()})

    try:
        stream(build_dataset(cfg, plan.todo, run_id, fingerprint))
        lost = _unfinished(plan.todo, seen)
        if len(lost) > cfg.ray.max_isolated_inputs:
            raise RuntimeError(f"{len(lost)} inputs were lost to failed batches (more than "
                               f"ray.max_isolated_inputs={cfg.ray.max_isolated_inputs}): a systemic failure, see "
                               "the Ray logs. What finished is in the manifest; rerun to resume.")
        if lost:
            result.isolated = len(lost)
            stream(build_dataset(cfg, lost, run_id, fingerprint, isolate=True))
            for r in _unfinished(lost, seen):
                take(lost_input_row(r, run_id, fingerprint, cfg.ray.max_task_retries))
    finally:
        bar.close()
        flush()
    result.summary = summary.result()
    result.wall_s = time.perf_counter() - t0
    return result
