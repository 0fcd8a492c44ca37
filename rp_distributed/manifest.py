"""The Parquet manifest: one row per face, plus one row per image that has no face or failed.

Its schema, the one place rows are made (``image_row`` for an image, ``face_row`` for each of its faces: every
manifest row of the job comes from these two), and reading it back. Rows are written by the driver as the
stream arrives (``manifest_writer``), in parts under ``OUTPUT/<manifest_dir>/``; a rerun reads the latest
outcome of each input (``latest_outcomes``) to skip inputs that are done. The README documents every column.
"""

from __future__ import annotations

import enum
import json
import math
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import io
from .pseudonyms import pseudonym_id
from .records import Status

# Image-level outcomes. ``ok``: written with every detected face anonymized; ``no_face``: written, no face
# found; ``withheld``: faces found but not all could be anonymized, so nothing was written (fail closed);
# ``error``: the input could not be read or decoded.
STATUSES = tuple(s.value for s in Status if s is not Status.PENDING)
DONE_STATUSES = (Status.OK.value, Status.NO_FACE.value)

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
    # Added later (older parts read them as null, which means "unknown": resume then trusts key and fingerprint):
    # the content identity of the input as listed and as read, and of the output as written.
    ("input_size", pa.int64()),           # the input's size in the plan's listing
    ("input_version", pa.string()),       # the listing's change marker: "mtime_ns:<n>" (local) or "etag:<e>" (S3)
    ("input_sha256", pa.string()),        # sha256 of the input bytes the detection stage read and decoded
    ("output_sha256", pa.string()),       # sha256 of exactly the bytes written at output_uri (null: nothing written)
    # Added later (older parts read them as null): the face's pseudonym, HMAC(pseudonym key, subject) truncated, and
    # the written face's recognizer descriptor of a linked face (the report's consistency of each subject).
    ("pseudonym_id", pa.string()),        # the same for every face of one subject; null: no subject
    ("anon_descriptor", pa.binary()),     # a linked face's written-face descriptor: 128 float32, little-endian
])


def manifest_uri(output_uri: str, manifest_dir: str) -> str:
    return io.join_uri(output_uri, manifest_dir)


def folder_of(output_uri: str, manifest_dir: str) -> tuple[io.Storage, str]:
    """The output prefix's storage and the manifest folder's key in it."""
    return io.Storage(output_uri), posixpath.normpath(manifest_dir)


def normalize_row(row: dict) -> dict:
    """A row with exactly the schema's columns (missing ones null)."""
    unknown = set(row) - set(SCHEMA.names)
    if unknown:
        raise KeyError(f"manifest row has columns outside the schema: {sorted(unknown)}")
    return {name: _clean(row.get(name)) for name in SCHEMA.names}


def _clean(value):
    """Python scalars for Arrow; NaN (how Ray hands back a missing value) becomes null; an enum its value."""
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def image_row(run_id: str, fingerprint: str | None, input_uri: str, rel_path: str, status, error: str | None = None,
              notes: str | None = None, output_uri: str | None = None, **measures) -> dict:
    """The image-level manifest row: an image with no face or that failed, and the base of its face rows.
    ``measures``: the image's other columns (size, face count, timings, detection cost, audit)."""
    return {"run_id": run_id, "input_uri": input_uri, "rel_path": rel_path, "output_uri": output_uri,
            "status": status, "error": error, "notes": notes or None, "settings_fingerprint": fingerprint, **measures}


def descriptor_bytes(descriptor) -> bytes | None:
    """A recognizer descriptor as the manifest's ``anon_descriptor`` cell (``numpy.frombuffer(cell, "<f4")``)."""
    return None if descriptor is None else np.asarray(descriptor, "<f4").tobytes()


def face_row(image: dict, face, reid_threshold: float) -> dict:
    """The manifest row of one face (a ``records.Face``) of an image whose image-level row is ``image``."""
    row = dict(image)
    box = [float(v) for v in face.box]
    applied = face.method_applied
    generated = applied is not None and applied.generated
    # From the merge stage's re-check of the written pixels (scoring.FaceChecks); nothing written: no export.
    exported = None if image["output_uri"] is None else face.identity_exported
    tries = None if face.tries is None else [t.as_json() for t in face.tries]
    row.update(face_index=face.face_index, box_x0=box[0], box_y0=box[1], box_x1=box[2], box_y1=box[3],
               det_score=face.det_score, face_size_px=max(box[2] - box[0], box[3] - box[1]),
               method=face.method, method_applied=None if applied is None else str(applied),
               face_error=face.face_error, params=face.params, attribute_prompt=face.prompt if generated else None,
               id_keypoints=face.id_keypoints, model=face.model, seed=face.seed, guidance_final=face.guidance_final,
               tries=None if tries is None else len(tries), tries_json=None if tries is None else json.dumps(tries),
               unet_evals=face.unet_evals, reid_distance=face.reid_distance, reidentified=face.reidentified,
               reid_threshold=reid_threshold, identity_exported=exported, score_error=face.score_error,
               report_distance=face.report_distance, report_reidentified=face.report_reidentified,
               face_still_detected=face.face_still_detected, pose_diff_deg=face.pose_diff_deg,
               landmark_displacement=face.landmark_displacement, t_anonymize_s=face.t_anonymize_s,
               found_by=face.found_by, low_confidence=face.low_confidence, audit=face.audit,
               pseudonym_id=pseudonym_id(face.pseudonym),
               anon_descriptor=None if image["output_uri"] is None else descriptor_bytes(face.anon_descriptor))
    if face.audit:
        row["detector"] = "audit"
    return row


def _part_keys(storage: io.Storage, folder: str) -> list[str]:
    return sorted(k for k in storage.list(folder)
                  if posixpath.basename(k).startswith("part-") and k.endswith(".parquet"))


def part_uris(output_uri: str, manifest_dir: str) -> list[str]:
    storage, folder = folder_of(output_uri, manifest_dir)
    return [storage.uri_of(k) for k in _part_keys(storage, folder)]


def read_manifest(output_uri: str, manifest_dir: str) -> pa.Table:
    """All manifest parts under the output prefix as one table (empty with SCHEMA if none)."""
    storage, folder = folder_of(output_uri, manifest_dir)
    tables = []
    for key in _part_keys(storage, folder):
        with storage.open(key) as f:
            tables.append(pq.read_table(f, schema=SCHEMA))
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables)


RESUME_COLUMNS = ["input_uri", "status", "output_uri", "settings_fingerprint", "input_size", "input_version"]
# Columns that hold a handful of distinct values across millions of rows: ``latest_outcomes`` returns them
# dictionary-encoded (compute functions take them as they are).
FEW_VALUES = {"status", "settings_fingerprint"}


def uri_hashes(uris: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """Python's ``hash`` of each URI (SipHash, keyed afresh in each process: a name cannot be chosen to collide
    with another), 8 bytes an input where the URI takes ~60; a chunk at a time, so no Python string lives long."""
    chunks = uris.chunks if isinstance(uris, pa.ChunkedArray) else [uris]
    step = io.LISTING_BATCH
    return pa.chunked_array([pa.array([hash(u) for u in chunk.slice(at, step).to_pylist()], pa.int64())
                             for chunk in chunks for at in range(0, len(chunk), step)], pa.int64())


def _last_per_input(table: pa.Table, key: str = "input_uri") -> pa.Table:
    """The last row of each ``key`` of ``table`` (later rows are later)."""
    import numpy as np

    table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    last = table.group_by(key, use_threads=False).aggregate([("_row", "max")])
    return table.take(last["_row_max"]).drop_columns(["_row"])


def latest_outcomes(output_uri: str, manifest_dir: str, columns: list[str] = RESUME_COLUMNS,
                    hashed: bool = False) -> pa.Table:
    """The latest manifest row of each input, reading only ``columns`` of the parts (in parallel).

    Parts are named ``part-<run_id>-<n>`` with a time-ordered run id, so their sorted order is the
    order they were written in; within a part, later rows are later. Each part is reduced to its last
    row per input as it is read (a face row per face shrinks to one per image), so the driver holds
    a few parts and the result, not the whole manifest. ``FEW_VALUES`` columns come back dictionary-encoded.
    ``hashed``: ``input_uri`` comes back as ``input_hash`` (``uri_hashes``, valid in this process only), which is
    what a resume at 10M inputs can hold: the URIs were the largest part of the result."""
    from concurrent.futures import ThreadPoolExecutor

    storage, folder = folder_of(output_uri, manifest_dir)
    keys = _part_keys(storage, folder)
    key = "input_hash" if hashed else "input_uri"
    if not keys:
        empty = pa.schema([SCHEMA.field(c) for c in columns]).empty_table()
        return _hash_inputs(empty) if hashed else empty

    def read(part_key: str) -> pa.Table:
        with storage.open(part_key) as f:
            part = _last_per_input(pq.read_table(f, columns=columns, schema=SCHEMA, use_threads=False))
        for name in set(columns) & FEW_VALUES:  # one copy of each value per part, not one per input
            at = part.schema.get_field_index(name)
            part = part.set_column(at, name, pc.dictionary_encode(part[name]))
        return _hash_inputs(part) if hashed else part

    with ThreadPoolExecutor(max_workers=8) as pool:  # map keeps the parts' order
        reduced = pa.concat_tables(pool.map(read, keys))
    return _last_per_input(reduced, key)


def _hash_inputs(table: pa.Table) -> pa.Table:
    at = table.schema.get_field_index("input_uri")
    return table.set_column(at, "input_hash", uri_hashes(table["input_uri"]))


def earlier_records(output_uri: str, manifest_dir: str) -> list[str]:
    """Keys of what the manifest folder holds now (parts, run records, the report), leases aside: what an
    ``--overwrite`` run retires once it completes (``retire``)."""
    storage, folder = folder_of(output_uri, manifest_dir)
    return sorted(k for k in storage.list(folder) if not posixpath.basename(k).startswith("lease-"))


def retire(output_uri: str, keys: list[str]) -> None:
    """Delete ``keys`` (``earlier_records`` of this run's plan: nothing this run wrote)."""
    storage = io.Storage(output_uri)
    for key in keys:
        storage.remove(key)


