"""A whole job with a subject table, run as a user runs it (the CLI, its own local Ray, --verbose): every face of
one subject carries one pseudonym_id with a destructive method, and the pseudonym key is nowhere: not in the
manifest, the run's config JSON, the report, the outputs, the command's output, or Ray's session files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rp_distributed import manifest, pseudonyms

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RAY_TMP = Path("/tmp/ray")


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets, files gone while walking
                continue
            found += [f"{path}: {n!r}" for n in needles if n in data]
    return found


def test_subjects_link_faces_and_the_key_leaks_nowhere(tmp_path, t1_path):
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "visit1").mkdir(parents=True)
    (src / "visit2").mkdir()
    shutil.copy(t1_path, src / "visit1" / "t1.jpg")
    shutil.copy(t1_path, src / "visit2" / "t1.jpg")
    # The format `rp-anonymize subjects` writes: path, optional face_index / box, subject (Parquet).
    pq.write_table(pa.table({"path": ["visit1/t1.jpg", "visit2/t1.jpg", "visit1/t1.jpg"],
                             "face_index": pa.array([0, 0, 1], pa.int64()),
                             "subject": ["patient-0001", "patient-0001", "patient-0002"]}), tmp_path / "subjects.parquet")
    key = "K3Y-" + uuid.uuid4().hex  # a string that appears nowhere unless it leaks
    (tmp_path / "key").write_text(key + "\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RP_PSEUDONYM_KEY": key}
    env.pop("RAY_ADDRESS", None)
    before = set(RAY_TMP.glob("session_2*")) if RAY_TMP.exists() else set()
    started = time.time()
    cmd = [sys.executable, "-m", "rp_distributed.cli", "run", str(src), str(out), "--verbose", "--no-progress",
           "-s", "detection.passes=[{member: centerface}]", "-s", "merge.audit.passes=[{member: centerface, scale: 0.5}]",
           "-s", "anonymizer.method=pixelate", "-s", "ray.num_cpus=2", "-s", f"pseudonyms.table={tmp_path / 'subjects.parquet'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=850)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    rows = [r for r in manifest.read_manifest(str(out), "_manifest").to_pylist() if r["face_index"] is not None]
    by = {(r["rel_path"], r["face_index"]): r["pseudonym_id"] for r in rows}
    digest = pseudonyms.subject_digest(key.encode(), "patient-0001")
    assert by[("visit1/t1.jpg", 0)] == by[("visit2/t1.jpg", 0)] == digest[:16]
    assert by[("visit1/t1.jpg", 1)] == pseudonyms.subject_digest(key.encode(), "patient-0002")[:16]
    assert by[("visit2/t1.jpg", 1)] is None and sum(v is not None for v in by.values()) == 3
    assert {r["method_applied"] for r in rows} == {"pixelate"}

    needles = [key.encode(), b"patient-0001"]
    leaks = _files_holding(out, needles)
    assert any(p.name == "report.html" for p in out.rglob("*")) and list(out.rglob("*.json"))
    sessions = [s for s in RAY_TMP.glob("session_2*") if s not in before and s.stat().st_mtime >= started - 5]
    assert sessions, "the job's Ray session folder was not found"
    for session in sessions:
        leaks += _files_holding(session, [key.encode()])
    leaks += [f"command output: {n!r}" for n in needles if n in done.stdout + done.stderr]
    assert not leaks, leaks

    # The same key read from a file: the same settings fingerprint, so a rerun redoes nothing (another key is another
    # fingerprint: tests/test_fingerprint.py).
    count = len(manifest.read_manifest(str(out), "_manifest"))
    again = subprocess.run(cmd + ["-s", f"pseudonyms.key_file={tmp_path / 'key'}"],
                           env={**env, "RP_PSEUDONYM_KEY": ""}, capture_output=True, timeout=850)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert len(manifest.read_manifest(str(out), "_manifest")) == count
