"""The whole Ray job on real photos: local folders and S3 (moto), bad inputs, resume, fail closed."""

from __future__ import annotations

import hashlib
import io as _io
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rp_distributed import io, manifest
from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.job.plan import make_plan
from rp_distributed.job import run as pipeline
from rp_distributed.job.run import run_job
from rp_distributed.summary import summary_text
from rp_distributed.verify import Kind, Verdict, verify
from tests.conftest import FAST_DETECTION, skimage_image, upload_folder, write_bad_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _blur_cfg(*extra):
    # PNG output so untouched pixels can be compared byte for byte.
    return load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png", *extra])


def _manifest(out) -> list[dict]:
    return manifest.read_manifest(str(out), "_manifest").to_pylist()


def _outside_boxes(shape, boxes, margin=0.9):
    keep = np.ones(shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        w, h = x1 - x0, y1 - y0
        keep[max(int(y0 - margin * h), 0):int(y1 + margin * h), max(int(x0 - margin * w), 0):int(x1 + margin * w)] = False
    return keep


def test_local_job_t1_bad_inputs_resume_and_overwrite(ray_session, tmp_path, t1_path, t1_rgb, monkeypatch):
    src = tmp_path / "in"
    (src / "people").mkdir(parents=True)
    shutil.copy(t1_path, src / "people" / "t1.jpg")
    bad = write_bad_inputs(src / "bad")
    out = tmp_path / "out"
    cfg = _blur_cfg()

    result = run_job(cfg, str(src), str(out), progress=False)
    rows = _manifest(out)
    assert len(result.manifest_parts) == 1

    # t1.jpg: six faces found, each changed, none re-identified; the background is byte-identical.
    t1_rows = sorted((r for r in rows if r["rel_path"] == "people/t1.jpg"), key=lambda r: r["face_index"])
    assert len(t1_rows) == 6 and {r["status"] for r in t1_rows} == {"ok"}
    assert all(r["method_applied"] == "blur" and r["face_error"] is None for r in t1_rows)
    written = np.asarray(Image.open(out / "people" / "t1.png").convert("RGB"))
    assert written.shape == t1_rgb.shape
    boxes = [(r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]) for r in t1_rows]
    for x0, y0, x1, y1 in boxes:
        face_before = t1_rgb[int(y0):int(y1), int(x0):int(x1)].astype(int)
        face_after = written[int(y0):int(y1), int(x0):int(x1)].astype(int)
        assert np.abs(face_before - face_after).mean() > 8, "face was not changed"
    keep = _outside_boxes(t1_rgb.shape, boxes)
    assert keep.mean() > 0.3
    assert np.array_equal(written[keep], t1_rgb[keep]), "background pixels changed"
    threshold = cfg.privacy.reid_threshold
    assert all(r["reid_distance"] > threshold and r["reidentified"] is False for r in t1_rows)

    # Every bad or unusual input has its row with a clear reason; the job went on.
    by_path = {}
    for r in rows:
        by_path.setdefault(r["rel_path"], []).append(r)
    for name, kind in bad.items():
        assert f"bad/{name}" in by_path, f"{kind} input has no manifest row"
    expect_error = {"empty.jpg": "empty file", "not_an_image.jpg": "not a recognised image format",
                    "truncated.jpg": "truncated", "corrupt.jpg": "", "huge.png": "image too large"}
    for name, reason in expect_error.items():
        (row,) = by_path[f"bad/{name}"]
        assert row["status"] == "error" and reason in row["error"] and row["output_uri"] is None
        assert not (out / "bad" / name).with_suffix(".png").exists()
    for name in ["sixteen_bit.png", "cmyk.jpg", "alpha.png", "palette.png", "exif_rotated.jpg"]:
        rs = by_path[f"bad/{name}"]
        assert rs[0]["status"] == "ok" and rs[0]["notes"], name  # decoded, faces anonymized, conversion noted
        assert rs[0]["num_faces"] >= 1 and rs[0]["reid_distance"] > threshold
    (nf,) = by_path["bad/no_face.jpg"]
    assert nf["status"] == "no_face" and nf["face_index"] is None and (out / "bad" / "no_face.png").exists()
    alpha_out = Image.open(out / "bad" / "alpha.png")
    assert alpha_out.mode == "RGBA"

    # A rerun does no work for inputs that are done: it tries the failed ones again, and redoes an input replaced
    # under the same key since (its recorded size and hash no longer match).
    Image.open(skimage_image("coffee.png")).convert("RGB").save(src / "bad" / "no_face.jpg", quality=90)
    again = run_job(cfg, str(src), str(out), progress=False)
    assert again.skipped == len(by_path) - len(expect_error) - 1 and again.redone_replaced == 1
    assert again.summary["images"] == len(expect_error) + 1 and again.summary["faces"] == 0
    assert "replaced         1 inputs were replaced" in summary_text(again, cfg, str(src), str(out))
    latest = {r["rel_path"]: r for r in manifest.latest_outcomes(
        str(out), "_manifest", ["input_uri", "rel_path", "status", "input_sha256"]).to_pylist()}
    assert latest["bad/no_face.jpg"]["input_sha256"] == hashlib.sha256((src / "bad" / "no_face.jpg").read_bytes()).hexdigest()
    assert verify(str(out), dry_run=True).verdict is Verdict.SAFE

    # --overwrite retires the earlier runs' manifest only when its own run completes: a run that fails first keeps it.
    def parts():
        return sorted(os.path.basename(u) for u in manifest.part_uris(str(out), "_manifest"))

    kept = parts()
    assert len(kept) == 2
    over = _blur_cfg("output.overwrite=true", "anonymizer.method=pixelate")

    def cluster_lost(*args, **kwargs):
        raise RuntimeError("the cluster went away")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "build_dataset", cluster_lost)
        with pytest.raises(RuntimeError, match="went away"):
            run_job(over, str(src), str(out), progress=False, report=False)
    assert parts() == kept, "a failed overwrite lost the manifest"
    still = manifest.latest_outcomes(str(out), "_manifest", ["input_uri", "rel_path", "status"]).to_pylist()
    assert {r["rel_path"]: r["status"] for r in still} == {k: v["status"] for k, v in latest.items()}
    redo = run_job(over, str(src), str(out), progress=False)
    assert redo.skipped == 0 and redo.summary["images"] == len(by_path)
    assert parts() == sorted(os.path.basename(u) for u in redo.manifest_parts) and len(parts()) == 1
    rows = _manifest(out)
    assert {r["run_id"] for r in rows} == {redo.run_id}
    assert {r["method_applied"] for r in rows if r["rel_path"] == "people/t1.jpg"} == {"pixelate"}
    names = os.listdir(out / "_manifest")
    assert not [n for n in names if result.run_id in n or again.run_id in n], names  # config records retired too


# Metadata through every output format: tests/test_metadata.py (in process, through the same stages). The gate's
# masks on the written file: tests/test_gate.py and tests/test_fail_closed_branches.py.


def test_s3_job_moto(s3_server, ray_session, tmp_path, t1_path, astronaut_path):
    local = tmp_path / "in"
    (local / "nested").mkdir(parents=True)
    shutil.copy(t1_path, local / "nested" / "t1.jpg")
    shutil.copy(astronaut_path, local / "astronaut.png")
    (local / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    upload_folder(local, "s3://photos/in")
    # Parts cut at 4 rows, and by a flush timer shorter than the time between rows: never inside an image.
    cut = ["output.manifest_rows_per_file=4", "output.manifest_flush_s=0.000001"]
    result = run_job(_blur_cfg(*cut), "s3://photos/in", "s3://photos/out", progress=False)
    assert result.summary["images"] == 3 and len(result.manifest_parts) >= 2
    fs, _ = io.filesystem("s3://photos/out")
    keys = sorted(fs.find("photos/out"))
    assert "photos/out/nested/t1.png" in keys and "photos/out/astronaut.png" in keys
    assert any(k.startswith("photos/out/_manifest/part-") for k in keys)
    rows = _manifest("s3://photos/out")
    t1_rows = [r for r in rows if r["rel_path"] == "nested/t1.jpg"]
    assert len(t1_rows) == 6 and all(r["output_uri"] == "s3://photos/out/nested/t1.png" for r in t1_rows)
    assert [r["status"] for r in rows if r["rel_path"] == "broken.jpg"] == ["error"]
    with fs.open("photos/out/nested/t1.png", "rb") as f:
        img = np.asarray(Image.open(_io.BytesIO(f.read())).convert("RGB"))
    assert img.shape[:2] == (Image.open(t1_path).size[1], Image.open(t1_path).size[0])
    for uri in result.manifest_parts:  # each part holds whole images: all face rows of an image, or none
        with fs.open(uri, "rb") as f:
            part = pq.read_table(f).to_pylist()
        for r in part:
            assert sum(q["input_uri"] == r["input_uri"] for q in part) == max(r["num_faces"] or 0, 1), uri
    # Resume against S3 (the local job test reruns through Ray): the plan skips what is done, from S3's listing.
    plan = make_plan(_blur_cfg(*cut), "s3://photos/in", "s3://photos/out", anonymization_fingerprint(_blur_cfg(*cut)))
    assert plan.skipped == 2 and [r["rel_path"] for r in plan.todo] == ["broken.jpg"]

    # The release gate on the bucket: S3 versions are ETags; a clean export passes and its record lies on the
    # bucket; a planted extra file and an altered output are named by key.
    assert all(r["input_version"].startswith("etag:") for r in rows if r["status"] != "error")
    outcome = verify("s3://photos/out")
    assert outcome.verdict is Verdict.SAFE and outcome.facts.counts["outputs_read"] == 2, outcome.reason
    assert [k for k in fs.find("photos/out/_manifest") if "/verify-" in k]
    fs.pipe_file("photos/out/nested/extra.jpg", t1_path.read_bytes())
    fs.pipe_file("photos/out/astronaut.png", b"\x89PNG\r\n\x1a\n not the output")
    outcome = verify("s3://photos/out", dry_run=True)
    found = {kind: {f.key for f in outcome.facts.findings.kept if f.kind is kind} for kind in (Kind.EXTRA, Kind.ALTERED)}
    assert found == {Kind.EXTRA: {"nested/extra.jpg"}, Kind.ALTERED: {"astronaut.png"}}, found
