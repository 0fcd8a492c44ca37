"""Issue 7: no detected face leaves un-anonymized, whatever the config, the rerun or the crowd.

The three pipeline stages run here in this process, on the real photo (t1.jpg: six people), exactly as
the Ray actors run them (``DetectFaces.process`` -> ``Anonymizer`` -> ``MergeAndWrite.process``).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from rp_distributed import io, manifest, manifest_writer, summary
from rp_distributed.anonymizer import Anonymizer
from rp_distributed.config import (
    DetectionConfig,
    anonymization_fingerprint,
    load_config,
)
from rp_distributed.faces import build_detector
from rp_distributed.job.plan import PlanError, make_plan, output_keys
from rp_distributed.records import ImageRow
from rp_distributed.stages.detect import DetectFaces
from rp_distributed.stages.merge import MergeAndWrite
from tests.conftest import FAST_DETECTION

_STAGES: dict[str, tuple] = {}  # config JSON -> its stages, built once per test session (models load once)


def run_stages(cfg, src, out_uri, merge=None, rel_path="t1.jpg", **row):
    """One input through the three stages in this process; returns its manifest rows."""
    key = cfg.model_dump_json()
    if key not in _STAGES:
        _STAGES[key] = (DetectFaces.from_config(cfg), Anonymizer.from_config(cfg),
                        MergeAndWrite.from_config(cfg, "test-run", anonymization_fingerprint(cfg)))
    detect, anonymize, shared = _STAGES[key]
    row = {"input_uri": str(src), "rel_path": rel_path, "output_uri": str(out_uri), "error": None, "notes": None,
           "stale_output_uri": None, **row}
    row = detect.process(ImageRow.of(row))
    if row.pending:
        anonymize(row.payload.faces)
    rows = (merge or shared).process(row)
    for r in rows:  # every row fits the manifest schema (nothing silently dropped)
        manifest.normalize_row(r)
    return rows


@pytest.fixture(scope="module")
def t1_boxes(t1_rgb):
    """t1's six faces, found independently of the pipeline (dlib HOG, no face limit)."""
    faces = build_detector(DetectionConfig(backend="dlib", model="hog")).detect(t1_rgb)
    assert len(faces) == 6
    return [f.box for f in faces]


def _changed(before, after, box) -> float:
    x0, y0, x1, y1 = (int(v) for v in box)
    return float(np.abs(before[y0:y1, x0:x1].astype(int) - after[y0:y1, x0:x1].astype(int)).mean())


# -- hole 1: crowds ------------------------------------------------------------------------------------

def test_faces_beyond_max_faces_are_destroyed_on_their_boxes(tmp_path, t1_path, t1_rgb, t1_boxes):
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=pixelate", "anonymizer.fallback=mask", "detection.max_faces=2",
                             "output.format=png"])
    out = tmp_path / "t1.png"
    rows = run_stages(cfg, t1_path, out)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"} and rows[0]["num_faces"] == 6
    by_index = sorted(rows, key=lambda r: r["face_index"])
    assert [r["method_applied"] for r in by_index[:2]] == ["pixelate", "pixelate"]
    for r in by_index[2:]:
        assert r["method_applied"] == "mask (image box)"
        assert "beyond detection.max_faces=2" in r["face_error"]
    written = np.asarray(Image.open(out).convert("RGB"))
    for box in t1_boxes:  # every one of the six people is changed in the exported image
        assert _changed(t1_rgb, written, box) > 8, box


# -- holes 6 and 10: scoring that fails, honest numbers --------------------------------------------------------
# A failed re-ID check masks the face (pixels in the written file): tests/test_fail_closed_branches.py ("re-ID gate
# fails", "re-ID gate cannot run"); identity_exported from the written pixels, gate on and off: tests/test_gate.py.

def test_a_second_recognizer_reports_but_never_gates(tmp_path, t1_path, tiny_dir):
    weak = [*FAST_DETECTION, "anonymizer.method=blur", "anonymizer.blur_strength=0.0001", "output.format=png"]
    plain = run_stages(load_config(None, weak), t1_path, tmp_path / "a.png")
    arcface = f"{tiny_dir}/arcface/w600k_r50.onnx"  # the tiny random ArcFace: real format, random weights
    cfg = load_config(None, weak + [f"privacy.report_recognizer={arcface}", "privacy.report_threshold=0.5"])
    assert anonymization_fingerprint(cfg) == anonymization_fingerprint(load_config(None, weak))
    reported = run_stages(cfg, t1_path, tmp_path / "b.png")
    key = lambda r: r["face_index"]  # noqa: E731
    for a, b in zip(sorted(plain, key=key), sorted(reported, key=key)):
        assert b["method_applied"] == a["method_applied"] and b["reid_distance"] == a["reid_distance"]
        assert 0.0 <= b["report_distance"] <= 2.0 and b["report_reidentified"] == (b["report_distance"] < 0.5)
    # Masked faces are far from their originals for any recognizer; untouched pixels would be at 0.
    masked = [r for r in reported if r["method_applied"].endswith("+mask")]
    assert masked and all(r["report_distance"] > 1e-3 for r in masked)
    assert summary.summarize(reported)["report_reid_rate"] is not None


def test_summary_does_not_count_a_masked_box_as_a_leak():
    rows = [
        {"input_uri": "a", "status": "ok", "face_index": 0, "reidentified": True, "method_applied": "blur+mask",
         "identity_exported": False, "face_error": "re-identified in the output: masked"},
        {"input_uri": "a", "status": "ok", "face_index": 1, "reidentified": False, "method_applied": "blur",
         "identity_exported": False},
    ]
    s = summary.summarize(rows)
    assert s["identity_exported"] == 0 and s["matched_masked"] == 1 and s["reid_rate"] == 0.0
    # A face of an image that was not written (identity_exported null) is neither.
    unwritten = {"input_uri": "b", "status": "error", "face_index": 0, "reidentified": True, "identity_exported": None}
    s = summary.summarize(rows + [unwritten])
    assert s["identity_exported"] == 0 and s["matched_masked"] == 1


# -- hole 3: reruns --------------------------------------------------------------------------------------

def _done_run(tmp_path, t1_path, cfg):
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    shutil.copy(t1_path, src / "t1.jpg")
    out = tmp_path / "out"
    plan = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg))
    (row,) = plan.todo
    rows = run_stages(cfg, row["input_uri"], row["output_uri"], rel_path=row["rel_path"])
    manifest_writer.write_part(str(out), "_manifest", "run1", 0, rows)
    return src, out, row


def test_an_output_without_a_manifest_row_is_redone(tmp_path, t1_path, astronaut_path):
    """A driver killed between an output's write and its manifest flush leaves an output no row describes:
    the rerun cannot know how it was made, so it redoes it (and says so), while a recorded one is skipped."""
    blur = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png"])
    src, out, _ = _done_run(tmp_path, t1_path, blur)
    shutil.copy(astronaut_path, src / "astronaut.png")
    Image.open(astronaut_path).save(out / "astronaut.png")  # written, never recorded
    partial = out / ("t1.png" + io.PARTIAL_WRITE_SUFFIX + "0" * 32)  # a merge worker killed mid-write
    partial.write_bytes(b"half")
    plan = make_plan(blur, str(src), str(out), anonymization_fingerprint(blur))
    assert plan.skipped == 1 and plan.unrecorded == 1
    assert [r["rel_path"] for r in plan.todo] == ["astronaut.png"]
    assert not partial.exists()


def test_rerun_with_other_anonymization_settings_redoes_the_input(tmp_path, t1_path):
    blur = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png"])
    src, out, row = _done_run(tmp_path, t1_path, blur)
    assert make_plan(blur, str(src), str(out), anonymization_fingerprint(blur)).skipped == 1
    for override in ["anonymizer.method=pixelate", "detection.upsample=2", "privacy.reid_threshold=0.5",
                     "detection.max_faces=3"]:
        other = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png", override])
        plan = make_plan(other, str(src), str(out), anonymization_fingerprint(other))
        assert plan.skipped == 0 and plan.redone_changed == 1 and len(plan.todo) == 1, override
    # Resources and the output encoding do not decide anonymization: still skipped.
    same = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png", "detection.resources.num_cpus=1",
                              "output.jpeg_quality=80"])
    assert make_plan(same, str(src), str(out), anonymization_fingerprint(same)).skipped == 1


def test_rerun_that_fails_deletes_the_earlier_output(tmp_path, t1_path):
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png"])
    src, out, row = _done_run(tmp_path, t1_path, cfg)
    assert (out / "t1.png").exists()
    (src / "t1.jpg").write_bytes((src / "t1.jpg").read_bytes()[:2000])  # the input is now truncated
    redo = load_config(None, [*FAST_DETECTION, "anonymizer.method=pixelate", "output.format=png"])
    (todo,) = make_plan(redo, str(src), str(out), anonymization_fingerprint(redo)).todo
    (r,) = run_stages(redo, todo["input_uri"], todo["output_uri"], rel_path=todo["rel_path"])
    assert r["status"] == "error" and r["output_uri"] is None
    assert not (out / "t1.png").exists(), "a stale output of an earlier run stays next to an error row"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_changed_output_key_deletes_the_earlier_output(tmp_path, t1_path, overwrite):
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png"])
    src, out, _ = _done_run(tmp_path, t1_path, cfg)
    jpeg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=jpeg", f"output.overwrite={overwrite}"])
    (todo,) = make_plan(jpeg, str(src), str(out), anonymization_fingerprint(jpeg)).todo
    assert todo["stale_output_uri"] == str(out / "t1.png")
    run_stages(jpeg, todo["input_uri"], todo["output_uri"], rel_path=todo["rel_path"],
               stale_output_uri=todo["stale_output_uri"])
    assert (out / "t1.jpg").exists() and not (out / "t1.png").exists()


def test_an_input_turned_into_a_refused_symlink_loses_its_earlier_output(tmp_path, t1_path):
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png"])
    src, out, _ = _done_run(tmp_path, t1_path, cfg)
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(t1_path, outside)
    (src / "t1.jpg").unlink()
    (src / "t1.jpg").symlink_to(outside)
    (todo,) = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg)).todo
    assert todo["error"] and "outside the input root" in todo["error"] and todo["output_uri"] is None
    assert todo["stale_output_uri"] == str(out / "t1.png")
    (row,) = run_stages(cfg, todo["input_uri"], None, rel_path=todo["rel_path"], error=todo["error"],
                        stale_output_uri=todo["stale_output_uri"])
    assert row["status"] == "error" and not (out / "t1.png").exists()


def test_a_stage_bug_becomes_an_error_row_and_leaves_no_output(tmp_path, t1_path, monkeypatch):
    from rp_distributed.stages.batch import columns, dicts

    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png"])
    src, out, row = _done_run(tmp_path, t1_path, cfg)
    detected = DetectFaces.from_config(cfg).process(ImageRow.of(row))
    Anonymizer.from_config(cfg)(detected.payload.faces)
    merge = MergeAndWrite.from_config(cfg, "run2", anonymization_fingerprint(cfg))

    def bug(*args):  # injected: an unexpected exception after the output was written
        raise KeyError("bug")

    monkeypatch.setattr(manifest, "face_row", bug)
    (r,) = dicts(merge(columns([detected])))
    assert r["status"] == "error" and "merge stage failed: KeyError" in r["error"]
    assert not (out / "t1.png").exists()


# -- hole 4: key collisions and unsafe keys --------------------------------------------------------------

def test_forced_format_collisions_get_distinct_keys():
    keys = output_keys(["a.png", "a.jpg", "b.png", "x//y.jpg", "x/y.jpg", "p\\q.jpg", "p/q.jpg"], "s3://b/out",
                       "jpeg", "_manifest")
    targets = [k for k, _, _ in keys.values()]
    assert len(set(targets)) == len(targets) == 7
    assert keys["b.png"] == ("s3://b/out/b.jpg", None, None)
    for rel in ["a.png", "a.jpg"]:
        key, err, note = keys[rel]
        assert err is None and key.startswith("s3://b/out/a~") and key.endswith(".jpg")
        assert "2 inputs map to s3://b/out/a.jpg" in note
    assert keys["x//y.jpg"][0] != keys["x/y.jpg"][0] and keys["p\\q.jpg"][0] != keys["p/q.jpg"][0]
    # Stable: a key depends on the input's own path, not on listing order.
    again = output_keys(["a.jpg", "a.png"], "s3://b/out", "jpeg", "_manifest")
    assert again["a.png"] == keys["a.png"]


def test_keys_made_in_chunks_are_the_keys_made_at_once(monkeypatch):
    """Keys are made a chunk of inputs at a time (10M inputs): collisions, renames that meet another input's key,
    and errors come out the same when every chunk holds two inputs and the colliding ones sit in other chunks."""
    from rp_distributed.job import plan

    rels = ["a.png", "b.png", "x/y.jpg", "a.jpg", "../bad.jpg", "x//y.jpg", "b.jpg", "p/q.jpg"]
    rels.append(plan.distinct_key("a.jpg", "a.png").rsplit("/", 1)[-1])  # takes the name a.png is renamed to
    whole = output_keys(rels, "s3://b/out", "jpeg", "_manifest")
    monkeypatch.setattr(plan, "KEY_CHUNK", 2)
    assert output_keys(rels, "s3://b/out", "jpeg", "_manifest") == whole
    assert whole["a.png"][0] is None and "collides with another input's key" in whole["a.png"][1]
    assert whole["b.png"][0].startswith("s3://b/out/b~") and whole["../bad.jpg"][0] is None


def test_unsafe_keys_become_error_rows(tmp_path):
    keys = output_keys(["../x.jpg", "_manifest/part-x.jpg", "ok.jpg"], str(tmp_path), "same", "_manifest")
    assert keys["../x.jpg"][0] is None and "unsafe relative path" in keys["../x.jpg"][1]
    assert keys["_manifest/part-x.jpg"][0] is None and "manifest folder" in keys["_manifest/part-x.jpg"][1]
    assert keys["ok.jpg"] == (str(tmp_path / "ok.jpg"), None, None)


def test_unsafe_s3_key_is_an_error_row_not_a_job_abort(s3_server, tmp_path, t1_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="unsafe")
    # A key that only escapes once its backslashes are read as separators (as join_uri must read them).
    s3.put_object(Bucket="unsafe", Key="in/a\\..\\..\\escape.jpg", Body=t1_path.read_bytes())
    s3.put_object(Bucket="unsafe", Key="in/../dotdot.jpg", Body=t1_path.read_bytes())
    s3.put_object(Bucket="unsafe", Key="in/fine.jpg", Body=t1_path.read_bytes())
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur"])
    plan = make_plan(cfg, "s3://unsafe/in", "s3://unsafe/out", anonymization_fingerprint(cfg))
    by_rel = {r["rel_path"]: r for r in plan.todo}
    assert by_rel["fine.jpg"]["output_uri"] == "s3://unsafe/out/fine.jpg" and by_rel["fine.jpg"]["error"] is None
    bad = by_rel["a\\..\\..\\escape.jpg"]
    assert bad["output_uri"] is None and "unsafe relative path" in bad["error"] and plan.refused == 2
    assert by_rel["../dotdot.jpg"]["output_uri"] is None and "unsafe" in by_rel["../dotdot.jpg"]["error"]
    (row,) = run_stages(cfg, bad["input_uri"], None, rel_path=bad["rel_path"], error=bad["error"])
    assert row["status"] == "error" and "unsafe relative path" in row["error"]


def test_s3_output_inside_the_input_is_excluded_on_rerun(s3_server, t1_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="nested")
    s3.put_object(Bucket="nested", Key="in/a.jpg", Body=t1_path.read_bytes())
    s3.put_object(Bucket="nested", Key="in/anon/a.jpg", Body=t1_path.read_bytes())  # an earlier output
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur"])
    for out in ["s3://nested/in/anon", "s3://nested/in/./anon/"]:
        plan = make_plan(cfg, "s3://nested/in", out, anonymization_fingerprint(cfg))
        assert [r["rel_path"] for r in plan.todo] == ["a.jpg"], out
    assert io.normalize_prefix("s3://nested/in/./anon//x/") == "s3://nested/in/anon/x"


def test_output_prefix_may_not_be_or_contain_the_input(tmp_path, t1_path):
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur"])
    src = tmp_path / "data" / "in"
    src.mkdir(parents=True)
    shutil.copy(t1_path, src / "t1.jpg")
    fp = anonymization_fingerprint(cfg)
    with pytest.raises(PlanError, match="is the input prefix"):
        make_plan(cfg, str(src), str(src) + "/", fp)
    with pytest.raises(PlanError, match="is the input prefix"):
        make_plan(cfg, str(src), str(tmp_path / "data" / "." / "in"), fp)
    with pytest.raises(PlanError, match="lies inside the output prefix"):
        make_plan(cfg, str(src), str(tmp_path / "data"), fp)
    # An output inside the input is excluded from the listing however it is spelled.
    (src / "anon").mkdir()
    shutil.copy(t1_path, src / "anon" / "old_output.jpg")
    for spelling in [src / "anon", f"{src}/./anon", f"{src}//anon/"]:
        plan = make_plan(cfg, str(src), str(spelling), fp)
        assert [r["rel_path"] for r in plan.todo] == ["t1.jpg"], spelling


# -- holes 7 and 8: device faults and poison inputs on a real Ray ------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_poison_input_and_device_fault_on_ray(tmp_path, tiny_dir, t1_path, astronaut_path):
    """A worker that dies on one input (every time) and a GPU actor whose device breaks, on a real local Ray.

    Faults are injected into the Ray workers by Ray's ``worker_process_setup_hook`` (tests/faults.py): the
    decoder exits the process when handed the poison bytes; the first anonymizer process to run diffusion
    gets a CUDA illegal-address error on every call from then on."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, skimage_image
    from tests.test_anonymize import _rp_cfg

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(t1_path, src / "t1.jpg")
    shutil.copy(astronaut_path, src / "astronaut.png")
    shutil.copy(skimage_image("coffee.png"), src / "coffee.png")
    marker = "rp-test-poison-7f3a"
    Image.open(astronaut_path).convert("RGB").save(src / "poison.jpg", "JPEG", comment=marker.encode())
    out = tmp_path / "out"
    flag = tmp_path / "device-fault.pid"
    # One retry (not the default 3): each retry of the poison block restarts a worker, and one retry proves
    # what three do (the block retried, then each input alone); the device fault needs one retry too.
    cfg = _rp_cfg(tiny_dir, "privacy.escalate=false", "detection.max_faces=2", "diffusion.num_inversion_steps=3",
                  "detection.resources.batch_size=4", "ray.max_task_retries=1")
    env = dict(os.environ, PYTHONPATH=str(REPO), RP_TEST_POISON=marker, RP_TEST_DEVICE_FAULT_FLAG=str(flag))
    proc = subprocess.run([sys.executable, "-m", "tests.faults", cfg.model_dump_json(), str(src), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    rows = manifest.read_manifest(str(out), "_manifest").to_pylist()
    by_path = {}
    for r in rows:
        by_path.setdefault(r["rel_path"], []).append(r)
    assert sorted(by_path) == ["astronaut.png", "coffee.png", "poison.jpg", "t1.jpg"]

    # The poison input is an error row with the reason; it did not take the job (or its batch-mates) down.
    (poison,) = by_path["poison.jpg"]
    assert poison["status"] == "error" and "with its block and alone" in poison["error"]
    assert "ray.max_task_retries=1" in poison["error"] and result["isolated"] >= 1
    assert not (out / "poison.png").exists()
    assert by_path["coffee.png"][0]["status"] == "no_face" and (out / "coffee.png").exists()

    # The device fault ended its actor; Ray restarted it and retried the batch: the faces got the method,
    # not the blur fallback of a broken device.
    assert flag.exists()
    t1_rows = sorted(by_path["t1.jpg"], key=lambda r: r["face_index"])
    assert len(t1_rows) == 6 and {r["status"] for r in t1_rows} == {"ok"}
    assert [r["method_applied"] for r in t1_rows[:2]] == ["reverse_personalization"] * 2, \
        [r["face_error"] for r in t1_rows[:2]]
    assert all(r["method_applied"] == "blur (image box)" for r in t1_rows[2:])
