"""The verification record: ``<manifest_dir>/verify-<time>.json``, what a steward keeps to show what was shared.

It holds the verdict, the counts and findings, the manifest's parts with their sha256, the settings fingerprints
and the sha256 of every model lock file the runs' configs name. With a key (``--sign-key FILE``: the file's bytes
are an HMAC-SHA256 key) it carries ``signature``: the HMAC of the record's canonical JSON without it.
``compare`` checks a record against the export as it is now (a fresh, read-only verification): signature, parts,
fingerprints, counts and verdict must all match.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid

from .. import io
from ..faults import describe
from .export import VERIFY_RECORD_PREFIX, ExportFacts
from .findings import Verdict

RECORD_FORMAT = "rp-anonymize-verify/1"
SIGNATURE_ALG = "hmac-sha256"
# Counts that do not change when a record is added to the manifest folder (the record itself is a new file there).
COMPARED_COUNTS = ("rows", "faces", "outputs_expected", "outputs_read", "export_objects")
COMPARED_FIELDS = ("verdict", "manifest_parts", "settings_fingerprints", "findings_by_kind")
MAX_KEY_BYTES = 1 << 16


class RecordError(ValueError):
    """A record or key file that cannot be used; the message says why."""


def _lock_files(node) -> list[str]:
    """Every ``lock_file`` value in a config dict (detection, diffusion, privacy, ...)."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "lock_file" and isinstance(v, str) and v]
        return found + [p for v in node.values() for p in _lock_files(v)]
    return []


def lock_digests(run_infos: dict[str, dict]) -> dict[str, str]:
    """sha256 of each model lock file the runs' configs name (or why it could not be read here)."""
    digests: dict[str, str] = {}
    for info in run_infos.values():
        for path in _lock_files(info.get("config") or {}):
            if path in digests:
                continue
            try:
                store, key = io.Storage.around(path)
                digests[path] = hashlib.sha256(store.read(key, 64 << 20)).hexdigest()
            except Exception as exc:  # noqa: BLE001 - recorded as such: a lock on another machine
                digests[path] = f"unreadable here: {describe(exc)}"
    return digests


def build(facts: ExportFacts, verdict: Verdict, reason: str) -> dict:
    return {"format": RECORD_FORMAT, "output_uri": facts.output_uri,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "verdict": verdict.value,
            "reason": reason, "counts": {k: facts.counts.get(k, 0) for k in sorted(facts.counts)},
            "findings_by_kind": dict(sorted(facts.findings.counts.items())),
            "findings": [f.as_json() for f in facts.findings.kept],
            "manifest_parts": facts.parts, "settings_fingerprints": sorted(facts.fingerprints),
            "runs": sorted(facts.run_infos), "model_locks": lock_digests(facts.run_infos)}


def _canonical(record: dict) -> bytes:
    return json.dumps({k: v for k, v in record.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def signature(record: dict, key: bytes) -> dict:
    return {"alg": SIGNATURE_ALG, "value": hmac.new(key, _canonical(record), hashlib.sha256).hexdigest()}


def read_key(path: str) -> bytes:
    """The HMAC key in the file ``path`` (its bytes, a trailing newline dropped)."""
    try:
        store, name = io.Storage.around(path)
        key = store.read(name, MAX_KEY_BYTES).rstrip(b"\r\n")
    except Exception as exc:  # noqa: BLE001
        raise RecordError(f"sign key {path} cannot be read: {describe(exc)}") from None
    if len(key) < 16:
        raise RecordError(f"sign key {path} holds {len(key)} bytes: an HMAC key needs at least 16")
    return key


def write(storage: io.Storage, folder: str, record: dict, key: bytes | None) -> str:
    """Write ``record`` (signed with ``key``) beside the manifest; returns its URI."""
    if key is not None:
        record["signature"] = signature(record, key)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{folder}/{VERIFY_RECORD_PREFIX}{stamp}-{uuid.uuid4().hex[:6]}.json"
    storage.write(name, json.dumps(record, indent=2).encode())
    return storage.uri_of(name)


def load(path: str) -> dict:
    try:
        store, name = io.Storage.around(path)
        record = json.loads(store.read(name, 256 << 20))
    except Exception as exc:  # noqa: BLE001
        raise RecordError(f"record {path} cannot be read as JSON: {describe(exc)}") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise RecordError(f"{path} is not an rp-anonymize verification record (format {RECORD_FORMAT})")
    return record


def compare(record: dict, now: dict, key: bytes | None) -> list[str]:
    """What differs between a stored ``record`` and ``now`` (``build`` of a fresh verification), signature first.
    Empty: the record describes the export as it is."""
    problems = []
    sig = record.get("signature")
    if key is None:
        if sig is not None:
            problems.append("the record is signed but no --sign-key was given: its signature was not checked")
    elif sig is None:
        problems.append("the record is not signed")
    elif sig.get("alg") != SIGNATURE_ALG or not hmac.compare_digest(str(sig.get("value")),
                                                                    signature(record, key)["value"]):
        problems.append("its signature does not match: the record was altered, or signed with another key")
    for name in COMPARED_FIELDS:
        if record.get(name) != now.get(name):
            problems.append(f"{name} differs: recorded {_short(record.get(name))}, now {_short(now.get(name))}")
    for name in COMPARED_COUNTS:
        was, is_ = (record.get("counts") or {}).get(name, 0), now["counts"].get(name, 0)
        if was != is_:
            problems.append(f"count {name} differs: recorded {was}, now {is_}")
    return problems


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."
