"""The privacy gate judged on the written file: its masks are pixels in the output, ``identity_exported`` comes
from a re-check of the written pixels, and a check that cannot run masks the face.

The stages run in this process on t1.jpg (six people); every verdict is taken from the file on disk by a
recognizer built here, independent of the one inside the merge stage."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from PIL import Image

from rp_distributed import manifest, scoring, summary
from rp_distributed.anonymizer import Anonymizer
from rp_distributed.config import PrivacyConfig, anonymization_fingerprint, load_config
from rp_distributed.records import ImageRow
from rp_distributed.scoring import ReidScorer
from rp_distributed.stages.detect import DetectFaces
from rp_distributed.stages.merge import MergeAndWrite, MergeSettings
from tests.conftest import FAST_DETECTION

MAGENTA = "[255,0,255]"  # a mask colour no photo region is close to, so "the mask landed" is unambiguous
WEAK = [*FAST_DETECTION, "anonymizer.method=blur", "anonymizer.blur_strength=0.0001",
        f"anonymizer.mask_color={MAGENTA}"]


@pytest.fixture(scope="module")
def judge() -> ReidScorer:
    return ReidScorer(PrivacyConfig())


@pytest.fixture(scope="module")
def stages(t1_path):
    """t1.jpg detected once, and one merge stage (its recognizers load once); each test brings its config."""
    cfg = load_config(None, WEAK)
    row = DetectFaces.from_config(cfg).process(ImageRow.of({"input_uri": str(t1_path), "rel_path": "t1.jpg", "output_uri": "x",
                                    "error": None, "notes": None, "stale_output_uri": None}))
    assert len(row.payload.faces) == 6
    return row, _merge(cfg)


def run_stages(cfg, stages, out, monkeypatch, merge=None):
    """The detected t1 through the anonymizer and the merge stage with ``cfg``; returns the manifest rows."""
    detected, shared = stages
    merge = merge or shared
    row = dataclasses.replace(copy.deepcopy(detected), output_uri=str(out))
    Anonymizer.from_config(cfg)(row.payload.faces)
    settings = MergeSettings.of(cfg)
    monkeypatch.setattr(merge, "settings", settings)
    monkeypatch.setattr(merge.checks, "cfg", settings)
    rows = merge.process(row)
    for r in rows:
        manifest.normalize_row(r)
    return rows


def _box(r) -> tuple[int, int, int, int]:
    return (int(np.floor(r["box_x0"])), int(np.floor(r["box_y0"])), int(np.ceil(r["box_x1"])),
            int(np.ceil(r["box_y1"])))


def _is_mask(written: np.ndarray, r) -> bool:
    x0, y0, x1, y1 = _box(r)
    return bool(np.all(written[max(y0, 0):y1, max(x0, 0):x1] == (255, 0, 255)))


def _merge(cfg) -> MergeAndWrite:
    return MergeAndWrite.from_config(cfg, "test-run", anonymization_fingerprint(cfg))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_the_gate_masks_in_the_written_file(tmp_path, stages, monkeypatch, t1_rgb, judge, fmt):
    """A 1-pixel blur leaves every face recognizable: each one the gate masks is the mask colour in the file on
    disk (JPEG included), and the written file no longer re-identifies it."""
    out = tmp_path / f"t1.{'jpg' if fmt == 'jpeg' else fmt}"
    rows = run_stages(load_config(None, WEAK), stages, out, monkeypatch)
    written = np.asarray(Image.open(out).convert("RGB"))
    masked = [r for r in rows if r["method_applied"] == "blur+mask"]
    assert len(masked) >= 5, [r["reid_distance"] for r in rows]
    for r in masked:
        x0, y0, x1, y1 = _box(r)
        box = written[y0:y1, x0:x1].astype(int)
        if fmt == "png":
            assert _is_mask(written, r), r["face_index"]
        else:  # JPEG: the mask colour up to the codec's rounding
            assert np.abs(box - (255, 0, 255)).mean() < 4, r["face_index"]
        assert r["identity_exported"] is False and r["reidentified"] is False
        assert not judge.compare(t1_rgb, written, np.array(_box(r), np.float32)).reidentified
    assert summary.summarize(rows)["identity_exported"] == 0


def test_identity_exported_is_read_from_the_written_pixels(tmp_path, stages, t1_rgb, judge, monkeypatch):
    """A mask that never reaches the output (it lands on a copy): the manifest may not say "not exported" while
    the file holds the recognizable face. Fail closed: such an image is withheld, nothing is written."""
    real = scoring.destroy_box  # the gate's own mask

    def lands_on_a_copy(image, box, method, cfg, margin=0.3, out=None):  # injected: the mask is lost
        return real(image, box, method, cfg, margin=margin, out=None)

    monkeypatch.setattr(scoring, "destroy_box", lands_on_a_copy)
    out = tmp_path / "t1.png"
    rows = run_stages(load_config(None, WEAK), stages, out, monkeypatch)
    if out.exists():  # whatever the file holds, each row's identity_exported is what the file shows
        written = np.asarray(Image.open(out).convert("RGB"))
        for r in rows:
            leaked = judge.compare(t1_rgb, written, np.array(_box(r), np.float32)).reidentified
            assert r["identity_exported"] is (leaked and not _is_mask(written, r)), r["face_index"]
    assert not out.exists(), "a file whose faces are still recognizable was written with the gate on"
    assert {r["status"] for r in rows} == {"withheld"} and all(r["output_uri"] is None for r in rows)
    assert "still re-identified in the written image" in rows[0]["error"]


def test_identity_exported_counts_what_the_gate_lets_through(tmp_path, stages, monkeypatch, t1_rgb, judge):
    """With the gate off the written faces stay recognizable, and identity_exported says so face by face."""
    out = tmp_path / "t1.png"
    rows = run_stages(load_config(None, [*WEAK, "privacy.fallback_if_reidentified=false"]), stages, out, monkeypatch)
    written = np.asarray(Image.open(out).convert("RGB"))
    leaked = [judge.compare(t1_rgb, written, np.array(_box(r), np.float32)).reidentified for r in rows]
    assert sum(leaked) >= 5 and [r["identity_exported"] for r in rows] == leaked
    assert summary.summarize(rows)["identity_exported"] == sum(leaked)


def test_a_check_that_cannot_run_masks_the_face(tmp_path, stages, monkeypatch, t1_rgb):
    """No descriptor for the written face (the recognizer finds nothing to describe): the check did not run, so
    the face is not known to be safe. It is masked, and the manifest says why."""
    cfg = load_config(None, WEAK)
    merge = _merge(cfg)  # its own: its recognizer is made blind below
    gate = merge.checks.gate
    describe = type(gate).descriptor

    def blind_on_outputs(image, box, landmarks=None):  # injected: no descriptor for anything but the input
        same = image.shape == t1_rgb.shape and np.array_equal(image, t1_rgb)
        return describe(gate, image, box, landmarks) if same else None

    gate.descriptor = blind_on_outputs
    out = tmp_path / "t1.png"
    rows = run_stages(cfg, stages, out, monkeypatch, merge=merge)
    written = np.asarray(Image.open(out).convert("RGB"))
    assert len(rows) == 6
    for r in rows:
        assert _is_mask(written, r), r["face_index"]
        assert r["method_applied"] == "blur+mask" and "could not run" in r["score_error"]
        assert r["reidentified"] is None and r["reid_distance"] is None and r["identity_exported"] is False
