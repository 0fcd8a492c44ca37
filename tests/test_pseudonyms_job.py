"""A whole job with a subject table, run as a user runs it (the CLI, its own local Ray, --verbose): every face of
one subject carries one pseudonym_id, and the pseudonym key is nowhere: not in the manifest, the run's config JSON,
the report, the outputs, the command's output, or Ray's session files. One Ray job: what a rerun would compute (the
fingerprint, the subjects' digests) is computed here from the same config with the key read from a file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rp_distributed import annotations, manifest, pseudonyms
from rp_distributed.config import anonymization_fingerprint, load_config
from tests.conftest import FAST_DETECTION, REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]


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


@pytest.fixture
def ray_tmp():
    """Ray's temp folder for the job alone (RAY_TMPDIR), short: Ray's socket paths must fit in 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="rp-pseu-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_subjects_link_faces_and_the_key_leaks_nowhere(tmp_path, t1_path, ray_tmp):
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "visit1").mkdir(parents=True)
    (src / "visit2").mkdir()
    shutil.copy(t1_path, src / "visit1" / "t1.jpg")
    shutil.copy(t1_path, src / "visit2" / "t1.jpg")
    # The format `rp-anonymize subjects` writes: path, optional face_index / box, subject (Parquet).
    table = tmp_path / "subjects.parquet"
    pq.write_table(pa.table({"path": ["visit1/t1.jpg", "visit2/t1.jpg", "visit1/t1.jpg"],
                             "face_index": pa.array([0, 0, 1], pa.int64()),
                             "subject": ["patient-0001", "patient-0001", "patient-0002"]}), table)
    key = "K3Y-" + uuid.uuid4().hex  # a string that appears nowhere unless it leaks
    (tmp_path / "key").write_text(key + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RP_PSEUDONYM_KEY": key, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    overrides = [*FAST_DETECTION, "anonymizer.method=pixelate", "ray.num_cpus=2", f"pseudonyms.table={table}"]
    cmd = [sys.executable, "-m", "rp_distributed.cli", "run", str(src), str(out), "--verbose", "--no-progress"]
    done = subprocess.run(cmd + [a for o in overrides for a in ("-s", o)], env=env, capture_output=True, timeout=850)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    rows = [r for r in manifest.read_manifest(str(out), "_manifest").to_pylist() if r["face_index"] is not None]
    by = {(r["rel_path"], r["face_index"]): r["pseudonym_id"] for r in rows}
    digest = pseudonyms.subject_digest(key.encode(), "patient-0001")
    assert by[("visit1/t1.jpg", 0)] == by[("visit2/t1.jpg", 0)] == digest[:16]
    assert by[("visit1/t1.jpg", 1)] == pseudonyms.subject_digest(key.encode(), "patient-0002")[:16]
    assert by[("visit2/t1.jpg", 1)] is None and sum(v is not None for v in by.values()) == 3
    assert {r["method_applied"] for r in rows} == {"pixelate"}
    # the written face's descriptor crossed Ray's blocks as it was made: for the linked faces only
    assert [len(r["anon_descriptor"] or b"") for r in rows if r["pseudonym_id"]] == [512] * 3
    assert all(r["anon_descriptor"] is None for r in rows if not r["pseudonym_id"])

    needles = [key.encode(), b"patient-0001"]
    assert (out / "_manifest" / "report.html").is_file() and list(out.rglob("config-*.json"))
    leaks = _files_holding(out, needles)
    sessions = list((ray_tmp / "ray").glob("session_2*"))
    assert sessions and list(sessions[0].rglob("*.log")), "the job's Ray session folder was not found"
    leaks += _files_holding(ray_tmp, needles)
    leaks += [f"command output: {n!r}" for n in needles if n in done.stdout + done.stderr]
    assert not leaks, leaks

    # A rerun with the key read from a file: the same fingerprint (so it redoes nothing) and the same subjects'
    # digests in its plan (so a redone face would get the same pseudonym_id). Another key: another fingerprint.
    again = load_config(None, [*overrides, f"pseudonyms.key_file={tmp_path / 'key'}", "pseudonyms.key_env=UNSET_KEY"])
    assert {r["settings_fingerprint"] for r in rows} == {anonymization_fingerprint(again)}
    plan, _ = annotations.attach(again, pa.table({"input_uri": [str(src / "visit2" / "t1.jpg")],
                                                  "rel_path": ["visit2/t1.jpg"]}))
    assert plan["subjects"][0].as_py()[0]["pseudonym"][:16] == by[("visit2/t1.jpg", 0)]
    (tmp_path / "other").write_text("another-key-0123456789\n")
    other = load_config(None, [*overrides, f"pseudonyms.key_file={tmp_path / 'other'}"])
    assert anonymization_fingerprint(other) != anonymization_fingerprint(again)
