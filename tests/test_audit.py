"""The output audit (merge stage): a face the first detection pass cannot see is caught on the image about to be
written, anonymized there, recorded and counted. The stages run in this process, as the actors run them."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from rp_distributed import manifest, summary
from rp_distributed.audit import covered_fraction
from rp_distributed.config import load_config
from rp_distributed.records import ImageRow
from rp_distributed.stages.anonymize import AnonymizeFaces
from rp_distributed.stages.batch import columns as _columns
from rp_distributed.stages.batch import rows as _rows
from rp_distributed.stages.detect import DetectFaces
from rp_distributed.stages.merge import MergeAndWrite


def _through(stage, row):
    (out,) = _rows(stage(_columns([row])))
    return out


def _run_stages(cfg, src, out) -> list[dict]:
    row = {"input_uri": str(src), "rel_path": src.name, "output_uri": str(out), "error": None, "notes": None,
           "stale_output_uri": None}
    detected = DetectFaces.from_config(cfg).process(ImageRow.of(row))
    return MergeAndWrite.from_config(cfg, "run", "fp").process(_through(AnonymizeFaces.from_config(cfg), detected))


def _astronaut_with_a_turned_face(astronaut_path, t1_rgb):
    """astronaut.png with t1's second face, turned 90 degrees, pasted on the flag (top left)."""
    img = np.asarray(Image.open(astronaut_path).convert("RGB")).copy()
    face = np.ascontiguousarray(np.rot90(t1_rgb[320:500, 725:870]))  # t1's face at (748, 345, 847, 482), margin
    face = cv2.resize(face, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    h, w = face.shape[:2]
    img[20:20 + h, 10:10 + w] = face
    return img, np.array([10, 20, 10 + w, 20 + h], np.float32)


def test_a_face_the_first_pass_cannot_see_is_caught_by_the_audit_and_anonymized(tmp_path, astronaut_path, t1_rgb):
    img, pasted = _astronaut_with_a_turned_face(astronaut_path, t1_rgb)
    src = tmp_path / "in.png"
    Image.fromarray(img).save(src)
    # The first pass: dlib's HOG, which sees upright faces only. The audit: its default (CenterFace passes).
    cfg = load_config(None, ["anonymizer.method=blur", "output.format=png", "detection.backend=dlib"])
    rows = _run_stages(cfg, src, tmp_path / "out.png")
    first = [r for r in rows if not r["audit"]]
    audited = [r for r in rows if r["audit"]]
    def box(r):
        return np.array([r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]])

    # HOG finds the astronaut (and the badge on her suit), not the turned face.
    assert first and all(r["detector"] == "dlib" and covered_fraction(pasted, [box(r)]) < 0.2 for r in first)
    assert len(audited) == 1, [(r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]) for r in audited]
    a = audited[0]
    assert covered_fraction(box(a), [pasted]) > 0.8  # it is the pasted face
    assert a["detector"] == "audit" and a["found_by"].startswith("audit: centerface")
    # Then checked like every face (dlib's recognizer on a sideways face may still match its blur: then masked).
    assert a["method_applied"].startswith("blur (audit)") and "missed by the first detection pass" in a["face_error"]
    assert a["reid_distance"] is not None
    assert all(r["num_faces"] == len(first) + 1 and r["audit_faces"] == 1 and r["status"] == "ok" for r in rows)
    assert a["identity_exported"] is False and a["t_audit_s"] > 0
    out = np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).astype(int)
    x0, y0, x1, y1 = pasted.astype(int)
    inner = (slice(y0 + 15, y1 - 15), slice(x0 + 15, x1 - 15))
    assert np.abs(out[inner] - img[inner]).mean() > 8  # the turned face's pixels were destroyed
    assert np.array_equal(out[380:, 330:], img[380:, 330:])  # far from both faces: untouched
    counts = summary.summarize(rows)
    assert counts["missed_by_first_pass"] == 1 and counts["identity_exported"] == 0
    # Without the audit the turned face is written as it was: the hole this closes.
    off = load_config(None, ["anonymizer.method=blur", "output.format=png", "detection.backend=dlib",
                             "merge.audit.enabled=false"])
    rows = _run_stages(off, src, tmp_path / "unaudited.png")
    assert len(rows) == len(first) and not any(r.get("audit_faces") or r.get("audit") for r in rows)
    leaked = np.asarray(Image.open(tmp_path / "unaudited.png").convert("RGB")).astype(int)
    assert np.array_equal(leaked[inner], img[inner])


def test_the_audit_leaves_faces_the_first_pass_anonymized_alone(tmp_path, t1_path):
    """t1's six people, found by the first pass and pixelated: the audit sees faces there again (pixelation
    keeps a face's outline), inside their boxes, and adds nothing."""
    cfg = load_config(None, ["anonymizer.method=pixelate", "output.format=png", "detection.backend=dlib"])
    rows = _run_stages(cfg, t1_path, tmp_path / "t1.png")
    assert len(rows) == 6 and not any(r["audit"] for r in rows) and {r["audit_faces"] for r in rows} == {0}


def test_covered_fraction():
    face = np.array([100, 100, 200, 200], np.float32)
    assert covered_fraction(np.array([110, 110, 190, 190]), [face]) == 1.0
    assert covered_fraction(np.array([300, 300, 350, 350]), [face]) == 0.0
    assert 0.7 < covered_fraction(np.array([150, 100, 250, 200]), [face]) < 0.9  # half inside, + the grown rim
    assert covered_fraction(np.array([5, 5, 5, 9]), []) == 1.0  # an empty box is nothing to anonymize


def test_is_anonymized_tells_the_same_face_from_a_small_face_beside_it():
    from rp_distributed.audit import is_anonymized

    face = np.array([100, 100, 200, 200], np.float32)  # dlib-style eyes-to-lip box of a big face
    head = np.array([50, 130, 240, 320])  # a detector's larger box around that (blurred) head: mostly outside
    assert covered_fraction(head, [face]) < 0.5 and is_anonymized(head, [face], 0.5)
    child = np.array([212, 212, 242, 242])  # a small face just below-right: centred in the grown rim, 3x smaller
    assert is_anonymized(child, [face], 0.5) is False
    assert is_anonymized(np.array([120, 120, 180, 180]), [face], 0.5)


def test_audit_columns_are_appended_and_old_parts_read_as_null(tmp_path):
    """Columns are added after the old ones (the audit's right after ``t_merge_s``, later additions after them); a
    part written before they existed reads with them null."""
    names = manifest.SCHEMA.names
    added = ["found_by", "low_confidence", "audit", "audit_faces", "detect_passes", "detect_mpix", "t_audit_s"]
    first = names.index("t_merge_s") + 1
    assert names[first:first + len(added)] == added
    import pyarrow as pa

    old = pa.schema([f for f in manifest.SCHEMA if f.name not in added])
    (tmp_path / "_manifest").mkdir()
    pq.write_table(pa.Table.from_pylist([{"run_id": "r", "input_uri": "a", "status": "ok"}], schema=old),
                   tmp_path / "_manifest" / "part-r-00000.parquet")
    table = manifest.read_manifest(str(tmp_path), "_manifest")
    assert table.column("audit").to_pylist() == [None] and table.column("run_id").to_pylist() == ["r"]


def test_the_summary_and_report_show_missed_faces_next_to_identity_exported():
    from rp_distributed import report
    from rp_distributed.job.run import JobResult
    from rp_distributed.summary import summary_text

    rows = [{"face_index": 0, "status": "ok", "num_faces": 2, "reidentified": False, "identity_exported": False},
            {"face_index": 1, "status": "ok", "num_faces": 2, "audit": True, "face_error": "missed by the first "
             "detection pass: found on the output by the audit", "reidentified": False, "identity_exported": False}]
    counts = summary.summarize(rows)
    assert counts["missed_by_first_pass"] == 1 and counts["faces"] == 2
    text = summary_text(JobResult(run_id="r", summary=counts, skipped=0), load_config(None, []), "in", "out")
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if "identity exported" in line)
    assert "first pass missed 1 faces: found on the output by the audit, blur applied" in lines[i + 1]
    off = load_config(None, ["merge.audit.enabled=false"])
    assert "not audited" in summary_text(JobResult(run_id="r", summary=counts, skipped=0), off, "in", "out")
    assert "first detection pass missed, found on the output by the audit and anonymized: <b>1</b>" in \
        report.privacy_line(counts)


def test_the_audit_settings_are_part_of_the_fingerprint():
    """A rerun with the audit turned off (or changed) redoes its inputs: the audit decides what is destroyed."""
    from rp_distributed.config import anonymization_fingerprint

    base = anonymization_fingerprint(load_config(None, []))
    assert anonymization_fingerprint(load_config(None, ["merge.audit.enabled=false"])) != base
    assert anonymization_fingerprint(load_config(None, ["merge.audit.covered=0.7"])) != base
    assert anonymization_fingerprint(load_config(None, ["merge.audit.providers=[CUDAExecutionProvider]"])) == base
