"""The export checked as a whole: its manifest's latest view against one listing of what the prefix holds.

1. The manifest: every part read once (its sha256 for the record, its schema checked: another tool's table or a
   damaged part is a ``CannotVerify``), and each run's recorded output prefix (``config-<run_id>.json``), so an
   export copied elsewhere is checked by its keys.
2. The latest view (``report.latest``, a batch at a time), manifest columns only: every row's identity flag and
   every face's method are checked as they stream by; each written output's key is kept as 128 bits of a keyed hash
   with the first 128 bits of its recorded sha256 (34 bytes an output with its flags; 340 MB at 10M outputs).
3. One listing of the prefix: an object outside the manifest folder that no row wrote is ``extra``; one that a row
   wrote is read once, hashed and its metadata walked (a pool of readers, a batch of keys at a time); the files of
   the manifest folder are checked for embedded originals.
4. Outputs never listed are ``missing``: named by a second pass over the view (only when some are).
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import posixpath
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import io, manifest
from ..anonymizer.methods import METHODS
from ..faults import describe
from ..report.latest import KeyHash, LatestView
from ..report.runinfo import RUN_INFO_PREFIX
from .findings import CannotVerify, Findings, Kind
from .metadata import metadata_found

# Columns every manifest part of this tool holds; a table without them is another tool's (or not a manifest).
REQUIRED_COLUMNS = ("run_id", "input_uri", "output_uri", "status", "face_index", "settings_fingerprint")
VIEW_COLUMNS = ["input_uri", "run_id", "output_uri", "status", "output_sha256", "identity_exported",
                "method_applied", "face_index", "settings_fingerprint"]
MAX_PART_BYTES = 1 << 30
MAX_OBJECT_BYTES = 1 << 31
KEYS_PER_BATCH = 2048
READERS = 8
# What marks a page of ours that embeds originals (report/html.py): the banner and the original thumbnails.
ORIGINAL_MARKS = (b"This report embeds ORIGINAL faces", b'class="thumb original"')
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"II*\x00", b"MM\x00*", b"BM")
VERIFY_RECORD_PREFIX = "verify-"


@dataclass
class ExportFacts:
    """What a verification saw: the record's content (with the verdict, added by the caller)."""

    output_uri: str
    parts: list[dict] = field(default_factory=list)  # {key, sha256, bytes}
    fingerprints: list[str] = field(default_factory=list)
    run_infos: dict[str, dict] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    findings: Findings = field(default_factory=Findings)


def _part_facts(storage: io.Storage, key: str) -> dict:
    try:
        data = storage.read(key, MAX_PART_BYTES)
        schema = pq.ParquetFile(_io.BytesIO(data)).schema_arrow
    except Exception as exc:  # noqa: BLE001 - a partial upload, a damaged file, a permission error
        raise CannotVerify(f"manifest part {key} cannot be read as Parquet (a partial or damaged manifest): "
                           f"{describe(exc)}") from None
    lacking = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if lacking:
        raise CannotVerify(f"{key} is not an rp-anonymize manifest part (it lacks {', '.join(lacking)}): another "
                           "tool's manifest cannot vouch for this export")
    return {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_manifest_facts(storage: io.Storage, folder: str, facts: ExportFacts) -> None:
    """The parts (hashed, schema checked) and the runs' recorded configs; ``CannotVerify`` without a manifest."""
    keys = [storage.key_of(u) for u in manifest.part_uris(storage.uri, folder)]
    if not keys:
        raise CannotVerify(f"no manifest under {storage.uri_of(folder)}/: nothing says what this export holds "
                           "(not an rp-anonymize export, or its manifest was not copied with it)")
    facts.parts = [_part_facts(storage, k) for k in keys]
    for key in storage.list(folder):
        name = posixpath.basename(key)
        if name.startswith(RUN_INFO_PREFIX) and name.endswith(".json"):
            try:
                info = json.loads(storage.read(key, 64 << 20))
                facts.run_infos[str(info["run_id"])] = info
            except Exception:  # noqa: BLE001 - a run without its config: its outputs are matched on this prefix
                continue


class Expected:
    """The outputs the latest view says were written: key hashes, recorded digests, and which were listed."""

    def __init__(self):
        self.hasher = KeyHash()
        self._h0, self._h1, self._digest, self._hashed = [], [], [], []
        self.seen = np.zeros(0, bool)

    def add(self, keys: list[str], shas: list[str | None]) -> None:
        if not keys:
            return
        h0, h1 = self.hasher(pa.array(keys, pa.string()))
        self._h0.append(h0)
        self._h1.append(h1)
        self._digest.append(np.array([bytes.fromhex(s)[:16] if s else b"" for s in shas], "S16"))
        self._hashed.append(np.array([bool(s) for s in shas], bool))

    def freeze(self) -> None:
        cat = (lambda a, t: np.concatenate(a) if a else np.zeros(0, t))
        h0, h1 = cat(self._h0, np.uint64), cat(self._h1, np.uint64)
        order = np.lexsort((h1, h0))
        self.h0, self.h1 = h0[order], h1[order]
        self.digest, self.hashed = cat(self._digest, "S16")[order], cat(self._hashed, bool)[order]
        self._h0 = self._h1 = self._digest = self._hashed = []
        self.seen = np.zeros(len(self.h0), bool)

    def __len__(self) -> int:
        return len(self.h0)

    def lookup(self, keys: list[str]) -> np.ndarray:
        """The index of each key among the expected outputs, -1 when it is not one."""
        if not keys or not len(self.h0):
            return np.full(len(keys), -1, np.int64)
        h0, h1 = self.hasher(pa.array(keys, pa.string()))
        lo = np.searchsorted(self.h0, h0, "left")
        hi = np.searchsorted(self.h0, h0, "right")
        out = np.full(len(keys), -1, np.int64)
        for i in np.flatnonzero(hi > lo):
            match = np.flatnonzero(self.h1[lo[i]:hi[i]] == h1[i])
            if len(match):
                out[i] = lo[i] + match[0]
        return out


def key_under(uri: str | None, prefixes: list[str]) -> str | None:
    """``uri``'s key under the first of ``prefixes`` it lies under (text only), else None."""
    for prefix in prefixes:
        head = prefix.rstrip("/") + "/"
        if uri and uri.startswith(head) and len(uri) > len(head):
            return uri[len(head):]
    return None


def applied_method(applied: str | None) -> str | None:
    """The method of a ``method_applied`` string (``blur (image box)+mask`` -> ``blur``)."""
    return applied.split(" (", 1)[0].split("+", 1)[0] if applied else None


class ViewCheck:
    """Pass over the latest view: row checks, and the written outputs collected into ``Expected``."""

    def __init__(self, facts: ExportFacts, storage: io.Storage):
        self.facts, self.findings = facts, facts.findings
        prefixes = {r: io.normalize_prefix(str(i.get("output_uri") or "")) for r, i in facts.run_infos.items()}
        self.prefixes = {r: [p, storage.uri] if p else [storage.uri] for r, p in prefixes.items()}
        self.default = [storage.uri]

    def key_of(self, uri: str | None, run: str | None) -> str | None:
        """The key under this export of an output the run ``run`` wrote at ``uri`` (None: outside it)."""
        return key_under(uri, self.prefixes.get(run, self.default))

    def written(self, batch: pa.RecordBatch) -> list[tuple[str | None, str, str | None]]:
        """(key or None, output_uri, recorded sha256) of the batch's rows that say an output was written (one per
        image: its image-level row or face 0)."""
        cols = {c: batch.column(c).to_pylist() for c in ("run_id", "output_uri", "status", "face_index",
                                                         "output_sha256")}
        out = []
        for run, uri, status, face, sha in zip(*cols.values()):
            if status in manifest.DONE_STATUSES and uri is not None and face in (None, 0):
                out.append((self.key_of(uri, run), uri, sha))
        return out

    def rows(self, batch: pa.RecordBatch, expected: Expected) -> None:
        counts, findings = self.facts.counts, self.findings
        cols = {c: batch.column(c).to_pylist() for c in ("input_uri", "output_uri", "identity_exported",
                                                         "method_applied", "face_index")}
        for inp, out, exported, applied, face in zip(*cols.values()):
            counts["rows"] = counts.get("rows", 0) + 1
            counts["faces"] = counts.get("faces", 0) + (face is not None)
            if exported:
                findings.add(Kind.IDENTITY_EXPORTED, out or inp, f"face {face}: re-identified in the written pixels")
            if face is not None and out is not None and applied_method(applied) not in METHODS:
                findings.add(Kind.FACE_NOT_ANONYMIZED, out, f"face {face}: method_applied {applied!r}")
        keys, shas = [], []
        for key, uri, sha in self.written(batch):
            if key is None:
                findings.add(Kind.OUTSIDE, uri, "its output_uri does not lie under this export")
                continue
            keys.append(key)
            shas.append(sha)
        counts["outputs_expected"] = counts.get("outputs_expected", 0) + len(keys)
        expected.add(keys, shas)
        self.facts.fingerprints = sorted(set(self.facts.fingerprints) | {
            f for f in batch.column("settings_fingerprint").to_pylist() if f})

    def missing(self, view: LatestView, expected: Expected) -> None:
        """Name the expected outputs the listing never met (a second pass over the view)."""
        for batch in view.batches(VIEW_COLUMNS):
            written = [(k, u) for k, u, _ in self.written(batch) if k is not None]
            idx = expected.lookup([k for k, _ in written])
            for (key, _), i in zip(written, idx):
                if i >= 0 and not expected.seen[i]:
                    self.findings.add(Kind.MISSING, key, "its manifest row says it was written; it is not there")
                    expected.seen[i] = True


def _read_output(storage: io.Storage, key: str) -> tuple[bytes | None, list[str] | str]:
    """(first 16 bytes of its sha256, metadata found) of the object at ``key``, or (None, why it is unreadable)."""
    try:
        data = storage.read(key, MAX_OBJECT_BYTES)
    except Exception as exc:  # noqa: BLE001
        return None, describe(exc)
    digest = hashlib.sha256(data).digest()[:16]
    try:
        return digest, metadata_found(data)
    except (ValueError, struct.error) as exc:
        return digest, [f"not a readable image ({exc})"]


class ListingCheck:
    """Pass over one listing of the prefix: extras, hashes and metadata of outputs, the manifest folder's files."""

    def __init__(self, facts: ExportFacts, storage: io.Storage, folder: str, expected: Expected):
        self.facts, self.storage, self.folder, self.expected = facts, storage, folder, expected
        self.findings = facts.findings

    def run(self) -> None:
        counts, batch, inside = self.facts.counts, [], self.folder + "/"
        with ThreadPoolExecutor(max_workers=READERS) as pool:
            for key in self.storage.list(everything=True):
                counts["objects"] = counts.get("objects", 0) + 1
                if key.startswith(inside):
                    counts["manifest_files"] = counts.get("manifest_files", 0) + 1
                    self.manifest_file(key)
                    continue
                counts["export_objects"] = counts.get("export_objects", 0) + 1
                batch.append(key)
                if len(batch) >= KEYS_PER_BATCH:
                    self.outputs(batch, pool)
                    batch = []
            self.outputs(batch, pool)

    def outputs(self, keys: list[str], pool: ThreadPoolExecutor) -> None:
        idx = self.expected.lookup(keys)
        known = []
        for key, i in zip(keys, idx):
            if i < 0:
                self.findings.add(Kind.EXTRA, key, "no latest manifest row wrote it")
            else:
                self.expected.seen[i] = True
                known.append((key, int(i)))
        for (key, i), (digest, meta) in zip(known, pool.map(lambda k: _read_output(self.storage, k[0]), known)):
            self.facts.counts["outputs_read"] = self.facts.counts.get("outputs_read", 0) + 1
            if digest is None:
                self.findings.add(Kind.UNREADABLE, key, str(meta))
                continue
            if not self.expected.hashed[i]:
                self.findings.add(Kind.UNHASHED, key, "its manifest row recorded no output_sha256")
            elif digest != self.expected.digest[i]:
                self.findings.add(Kind.ALTERED, key, "its sha256 is not the one its manifest row recorded")
            if meta:
                self.findings.add(Kind.METADATA, key, ", ".join(meta))

    def manifest_file(self, key: str) -> None:
        name = posixpath.basename(key)
        if (name.startswith("part-") and name.endswith(".parquet")) or name.startswith("lease-"):
            return  # parts are hashed and schema-checked; leases are checked before
        try:
            data = self.storage.read(key, MAX_OBJECT_BYTES)
        except Exception as exc:  # noqa: BLE001
            if "empty file" not in str(exc):
                self.findings.add(Kind.UNREADABLE, key, describe(exc))
            return
        if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            self.findings.add(Kind.ORIGINALS, key, "an image file in the manifest folder")
        elif not name.startswith(VERIFY_RECORD_PREFIX) and any(m in data for m in ORIGINAL_MARKS):
            self.findings.add(Kind.ORIGINALS, key, "a page that embeds the original faces (report.include_originals)")
