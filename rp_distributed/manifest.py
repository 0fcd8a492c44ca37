"""The Parquet manifest: one row per face, plus one row per image that has no face or failed.

Rows are written by the driver as the stream arrives, in parts under ``OUTPUT/<manifest_dir>/``
(``part-<run_id>-<n>.parquet``), always with ``SCHEMA`` so any set of parts reads as one table. A
rerun reads the latest outcome of each input (``latest_outcomes``) to skip inputs that are done. The
README documents every column.
"""

from __future__ import annotations

import io as _io
import json
import math
import posixpath
import time
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from . import io

# Image-level outcomes. ``ok``: written with every detected face anonymized; ``no_face``: written, no face
# found; ``withheld``: faces found but not all could be anonymized, so nothing was written (fail closed);
# ``error``: the input could not be read or decoded.
STATUSES = ("ok", "no_face", "withheld", "error")
DONE_STATUSES = ("ok", "no_face")

SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("input_uri", pa.string()),
    ("rel_path", pa.string()),
    ("output_uri", pa.string()),          # null when nothing was written
    ("status", pa.string()),              # image-level: ok | no_face | withheld | error
    ("error", pa.string()),               # image-level reason (error / withheld)
    ("notes", pa.string()),               # conversions applied on decode, "; "-joined
    ("settings_fingerprint", pa.string()),  # digest of the settings that decide anonymization (resume)
    ("image_width", pa.int32()),
    ("image_height", pa.int32()),
    ("num_faces", pa.int32()),
    ("face_index", pa.int32()),           # null on an image-level row (no face / error)
    ("box_x0", pa.float32()), ("box_y0", pa.float32()), ("box_x1", pa.float32()), ("box_y1", pa.float32()),
    ("det_score", pa.float32()),
    ("face_size_px", pa.float32()),
    ("detector", pa.string()),
    ("method", pa.string()),              # requested method
    ("method_applied", pa.string()),      # what was applied to this face in the written image
    ("face_error", pa.string()),          # why the requested method was not the one applied
    ("params", pa.string()),              # JSON of the method's parameters
    ("attribute_prompt", pa.string()),    # the text prompt this face was generated with (null: none)
    ("id_keypoints", pa.string()),        # where the face's 5 keypoints came from: detector | template | ...
    ("model", pa.string()),               # JSON of model identifiers (diffusion)
    ("seed", pa.int64()),
    ("guidance_final", pa.float32()),
    ("tries", pa.int32()),                # generations run for this face (escalation)
    ("tries_json", pa.string()),          # JSON list of {guidance, reid_distance} per try
    ("unet_evals", pa.int64()),
    ("reid_distance", pa.float32()),      # recognizer distance original vs written face
    ("reidentified", pa.bool_()),         # reid_distance < privacy.reid_threshold
    ("reid_threshold", pa.float32()),
    ("identity_exported", pa.bool_()),    # re-identified (or unverifiable) in the written pixels, not masked: False
    ("score_error", pa.string()),         # why the re-ID check or the utility signals failed (box masked)
    ("report_distance", pa.float32()),    # second recognizer (privacy.report_recognizer, reporting only)
    ("report_reidentified", pa.bool_()),  # report_distance < privacy.report_threshold
    ("face_still_detected", pa.bool_()),
    ("pose_diff_deg", pa.float32()),      # max |Δyaw|, |Δpitch|, |Δroll| original vs written
    ("landmark_displacement", pa.float32()),
    ("t_read_s", pa.float32()), ("t_detect_s", pa.float32()),
    ("t_anonymize_s", pa.float32()), ("t_merge_s", pa.float32()),
    # Added later (older parts read them as null): detection cost, the passes that found each face, and the output
    # audit (faces the first pass missed, found on the image about to be written and anonymized there).
    ("found_by", pa.string()),            # detector passes that found the face; "audit: ..." on an audit row
    ("low_confidence", pa.bool_()),       # an ensemble's low-confidence detection: fallback, never generation
    ("audit", pa.bool_()),                # this face was missed by the first pass and found by the audit
    ("audit_faces", pa.int32()),          # image-level: faces the audit found outside every anonymized box
    ("detect_passes", pa.int32()),        # image-level: detector runs (passes x rotations x tiles) on this image
    ("detect_mpix", pa.float32()),        # image-level: megapixels the detector saw (magnified, rotated copies)
    ("t_audit_s", pa.float32()),          # image-level: seconds of the output audit
])


def manifest_uri(output_uri: str, manifest_dir: str) -> str:
    return io.join_uri(output_uri, manifest_dir)


def _folder(output_uri: str, manifest_dir: str) -> tuple[io.Storage, str]:
    """The output prefix's storage and the manifest folder's key in it."""
    return io.Storage(output_uri), posixpath.normpath(manifest_dir)


def normalize_row(row: dict) -> dict:
    """A row with exactly the schema's columns (missing ones null)."""
    unknown = set(row) - set(SCHEMA.names)
    if unknown:
        raise KeyError(f"manifest row has columns outside the schema: {sorted(unknown)}")
    return {name: _clean(row.get(name)) for name in SCHEMA.names}


def _clean(value):
    """Python scalars for Arrow; NaN (how Ray hands back a missing value) becomes null."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def face_row(image_row: dict, face, reid_threshold: float) -> dict:
    """The manifest row of one face (a ``records.Face``) of an image whose image-level fields are
    ``image_row``."""
    row = dict(image_row)
    box = [float(v) for v in face.box]
    generated = face.method_applied is not None and face.method_applied.startswith("reverse_personalization")
    # From the merge stage's re-check of the written pixels (scoring.FaceChecks); nothing written: no export.
    exported = None if image_row["output_uri"] is None else face.identity_exported
    row.update(face_index=face.face_index, box_x0=box[0], box_y0=box[1], box_x1=box[2], box_y1=box[3],
               det_score=face.det_score, face_size_px=max(box[2] - box[0], box[3] - box[1]),
               method=face.method, method_applied=face.method_applied, face_error=face.face_error,
               params=face.params, attribute_prompt=face.prompt if generated else None,
               id_keypoints=face.id_keypoints, model=face.model,
               seed=face.seed, guidance_final=face.guidance_final, tries=face.tries, tries_json=face.tries_json,
               unet_evals=face.unet_evals, reid_distance=face.reid_distance, reidentified=face.reidentified,
               reid_threshold=reid_threshold, identity_exported=exported, score_error=face.score_error,
               report_distance=face.report_distance, report_reidentified=face.report_reidentified,
               face_still_detected=face.face_still_detected, pose_diff_deg=face.pose_diff_deg,
               landmark_displacement=face.landmark_displacement, t_anonymize_s=face.t_anonymize_s,
               found_by=face.found_by, low_confidence=face.low_confidence, audit=face.audit)
    if face.audit:
        row["detector"] = "audit"
    return row


def write_part(output_uri: str, manifest_dir: str, run_id: str, part: int, rows: list[dict]) -> str:
    table = pa.Table.from_pylist([normalize_row(r) for r in rows], schema=SCHEMA)
    buf = _io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage, folder = _folder(output_uri, manifest_dir)
    key = f"{folder}/part-{run_id}-{part:05d}.parquet"
    storage.write(key, buf.getvalue())
    return storage.uri_of(key)


def _row_bytes(row: dict) -> int:
    """A manifest row's size as PartWriter counts it: its strings' lengths, 8 bytes for anything else."""
    return sum(len(v) if isinstance(v, str) else 8 for v in row.values())


class PartWriter:
    """Buffers manifest rows on the driver and writes them as parts: at ``rows_per_file`` rows, at
    ``bytes_per_file`` bytes of row text, or once the oldest buffered row is ``flush_s`` old. The age is
    checked on every row and by a timer thread, so a slow tail of the job cannot hold rows back (a driver
    killed then loses at most ``flush_s`` of rows; the rerun redoes those inputs). Thread-safe.

    A part never ends inside an image: the face rows of one image (``num_faces`` of them, which arrive
    together) are held until the last one is in. A part cut between them, followed by a killed driver,
    would leave an image whose latest rows are an ``ok`` with faces missing, which resume would skip."""

    def __init__(self, output_uri: str, manifest_dir: str, run_id: str, rows_per_file: int, bytes_per_file: int,
                 flush_s: float):
        import threading

        self.output_uri, self.manifest_dir, self.run_id = output_uri, manifest_dir, run_id
        self.rows_per_file, self.bytes_per_file, self.flush_s = rows_per_file, bytes_per_file, flush_s
        self.parts: list[str] = []
        self._rows: list[dict] = []  # complete images only
        self.dropped = 0  # face rows of an incomplete image left out at close
        self._image: list[dict] = []  # the face rows of the image still arriving
        self._bytes = 0
        self._since = 0.0
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="manifest-flush", daemon=True)
        self._timer.start()

    def add(self, row: dict) -> None:
        with self._lock:
            if not self._rows and not self._image:
                self._since = time.monotonic()
            self._bytes += _row_bytes(row)
            if row.get("face_index") is None:  # an image-level row is a whole image
                self._rows.append(row)
            else:
                if self._image and self._image[0]["input_uri"] != row["input_uri"]:
                    self._image = []  # cannot happen (an image's rows arrive together): never write it partial
                self._image.append(row)
                if len(self._image) >= (row.get("num_faces") or 1):
                    self._rows.extend(self._image)
                    self._image = []
            if self._rows and (len(self._rows) >= self.rows_per_file or self._bytes >= self.bytes_per_file
                               or time.monotonic() - self._since >= self.flush_s):
                self._flush()
            self._raise()  # a failed timer flush: its rows are still buffered, and so is this one

    def close(self) -> None:
        """Stop the timer and write the whole images buffered."""
        self._stop.set()
        self._timer.join()
        with self._lock:
            # An image whose face rows did not all arrive (the job was interrupted) is not written: rows saying
            # "ok" with faces missing would make resume skip it. Its output, if any, has no row: the rerun
            # redoes it (plan.unrecorded).
            self.dropped = len(self._image)
            self._image = []
            self._flush()
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _flush(self) -> None:
        if self._rows:
            self.parts.append(write_part(self.output_uri, self.manifest_dir, self.run_id, len(self.parts), self._rows))
        self._rows, self._bytes = [], sum(_row_bytes(r) for r in self._image)
        if self._image:  # the image still arriving starts the next part's clock
            self._since = time.monotonic()

    def _tick(self) -> None:
        while not self._stop.wait(min(self.flush_s / 4, 5.0)):
            with self._lock:
                if self._rows and time.monotonic() - self._since >= self.flush_s:  # whole images only
                    try:
                        self._flush()
                    except Exception as exc:  # noqa: BLE001 - surfaces on the next add / close
                        self._error = exc


def _part_keys(storage: io.Storage, folder: str) -> list[str]:
    return sorted(k for k in storage.list(folder)
                  if posixpath.basename(k).startswith("part-") and k.endswith(".parquet"))


def part_uris(output_uri: str, manifest_dir: str) -> list[str]:
    storage, folder = _folder(output_uri, manifest_dir)
    return [storage.uri_of(k) for k in _part_keys(storage, folder)]


def read_manifest(output_uri: str, manifest_dir: str) -> pa.Table:
    """All manifest parts under the output prefix as one table (empty with SCHEMA if none)."""
    storage, folder = _folder(output_uri, manifest_dir)
    tables = []
    for key in _part_keys(storage, folder):
        with storage.open(key) as f:
            tables.append(pq.read_table(f, schema=SCHEMA))
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables)


RESUME_COLUMNS = ["input_uri", "status", "output_uri", "settings_fingerprint"]


def _last_per_input(table: pa.Table) -> pa.Table:
    """The last row of each ``input_uri`` of ``table`` (later rows are later)."""
    import numpy as np

    table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    last = table.group_by("input_uri", use_threads=False).aggregate([("_row", "max")])
    return table.take(last["_row_max"]).drop_columns(["_row"])


def latest_outcomes(output_uri: str, manifest_dir: str, columns: list[str] = RESUME_COLUMNS) -> pa.Table:
    """The latest manifest row of each input, reading only ``columns`` of the parts (in parallel).

    Parts are named ``part-<run_id>-<n>`` with a time-ordered run id, so their sorted order is the
    order they were written in; within a part, later rows are later. Each part is reduced to its last
    row per input as it is read (a face row per face shrinks to one per image), so the driver holds
    a few parts and the result, not the whole manifest."""
    from concurrent.futures import ThreadPoolExecutor

    storage, folder = _folder(output_uri, manifest_dir)
    keys = _part_keys(storage, folder)
    if not keys:
        return pa.schema([SCHEMA.field(c) for c in columns]).empty_table()

    def read(key: str) -> pa.Table:
        with storage.open(key) as f:
            return _last_per_input(pq.read_table(f, columns=columns, schema=SCHEMA, use_threads=False))

    with ThreadPoolExecutor(max_workers=8) as pool:  # map keeps the parts' order
        reduced = pa.concat_tables(pool.map(read, keys))
    return _last_per_input(reduced)


def earlier_records(output_uri: str, manifest_dir: str) -> list[str]:
    """Keys of what the manifest folder holds now (parts, run records, the report), leases aside: what an
    ``--overwrite`` run retires once it completes (``retire``)."""
    storage, folder = _folder(output_uri, manifest_dir)
    return sorted(k for k in storage.list(folder) if not posixpath.basename(k).startswith("lease-"))


def retire(output_uri: str, keys: list[str]) -> None:
    """Delete ``keys`` (``earlier_records`` of this run's plan: nothing this run wrote)."""
    storage = io.Storage(output_uri)
    for key in keys:
        storage.remove(key)


class _Histogram:
    """Fixed-bin counts for a streaming median (values clipped to ``[0, top]``)."""

    def __init__(self, top: float, bins: int):
        self.top, self.counts = top, [0] * bins

    def add(self, value: float) -> None:
        i = int(min(max(value, 0.0), self.top) / self.top * (len(self.counts) - 1))
        self.counts[i] += 1

    def median(self) -> float | None:
        n = sum(self.counts)
        if not n:
            return None
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen > n // 2:
                return i * self.top / (len(self.counts) - 1)
        return self.top  # pragma: no cover


class Summary:
    """The end-of-job summary, accumulated row by row: the driver keeps counters, not rows.

    An image is counted on its first row: its image-level row (``face_index`` null) or its face 0.
    Medians come from fixed bins (0.1 degree, 0.001 inter-ocular distance)."""

    def __init__(self):
        self.by_status = dict.fromkeys(STATUSES, 0)
        self.faces = self.exported = self.masked_matches = self.scored = self.fallbacks = 0
        self.first_scored = self.first_reid = self.escalated = 0
        self.report_scored = self.report_reid = 0
        self.audit_found = self.low_confidence = 0
        self.pose = _Histogram(180.0, 1801)
        self.drift = _Histogram(10.0, 10001)

    def add(self, r: dict) -> None:
        if r.get("face_index") in (None, 0):
            self.by_status[r["status"]] = self.by_status.get(r["status"], 0) + 1
        if r.get("face_index") is None:
            return
        self.faces += 1
        self.fallbacks += bool(r.get("face_error"))
        self.audit_found += bool(r.get("audit"))
        self.low_confidence += bool(r.get("low_confidence"))
        # Counted whether or not the check produced a distance: an unverifiable face that was not masked is exported.
        leaked = r.get("identity_exported")
        self.exported += bool(leaked)
        if r.get("reidentified") is not None:
            self.scored += 1
            # A recognizer match on a box masked in the written pixels is no identity left (often a false detection).
            self.masked_matches += bool(r["reidentified"]) and leaked is False
        if r.get("report_reidentified") is not None:
            self.report_scored += 1
            self.report_reid += bool(r["report_reidentified"])
        tries = json.loads(r["tries_json"]) if r.get("tries_json") else []
        if tries and tries[0].get("reid_distance") is not None and r.get("reid_threshold") is not None:
            self.first_scored += 1
            self.first_reid += tries[0]["reid_distance"] < r["reid_threshold"]
            self.escalated += len(tries) > 1
        if r.get("pose_diff_deg") is not None:
            self.pose.add(r["pose_diff_deg"])
        if r.get("landmark_displacement") is not None:
            self.drift.add(r["landmark_displacement"])

    def result(self) -> dict:
        def rate(k: int, n: int) -> float | None:
            return k / n if n else None

        return {"images": sum(self.by_status.values()), "faces": self.faces,
                "failures": self.by_status["error"] + self.by_status["withheld"], "by_status": dict(self.by_status),
                "fallbacks": self.fallbacks, "reid_scored": self.scored,
                # Faces written with identity information: re-identified by the recognizer and not masked (must
                # be 0 with privacy.fallback_if_reidentified); their rate among the scored faces.
                "identity_exported": self.exported, "reid_rate": rate(self.exported, self.scored),
                "matched_masked": self.masked_matches,
                # Faces the first detection pass missed: found on the output by the audit, anonymized there (their
                # rows have audit=true). Low-confidence detections got the fallback, not generation.
                "missed_by_first_pass": self.audit_found, "low_confidence": self.low_confidence,
                # The second recognizer's rate (reporting only), masked boxes included.
                "report_reid_rate": rate(self.report_reid, self.report_scored),
                # Re-ID rate of the first generation, before the escalation ladder (reverse personalization).
                "reid_rate_first_try": rate(self.first_reid, self.first_scored),
                "escalated": self.escalated,
                "pose_diff_deg_median": self.pose.median(),
                "landmark_displacement_median": self.drift.median()}


def summarize(rows: Iterable[dict]) -> dict:
    """The summary of a list of manifest rows (``Summary`` fed one row at a time)."""
    summary = Summary()
    for r in rows:
        summary.add(r)
    return summary.result()
