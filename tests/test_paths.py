"""Paths are data, never syntax: a name in the input or output prefix cannot change which object is read,
written or deleted, and nothing leaves the prefixes through a symlink (swapped in before or during the job).

Most tests run the three stages in this process, exactly as the Ray actors run them; one Ray job runs the
attacks end to end. Also here: ``--overwrite`` keeps the manifest until its run completes, multi-frame
inputs, side-table rows for missing images written once, and the output prefix's lease.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from rp_distributed import annotations, io, manifest
from rp_distributed.anonymize import Anonymizer
from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.pipeline import DetectFaces, MergeAndWrite
from rp_distributed.plan import make_plan


def _blur(*extra):
    return load_config(None, ["anonymizer.method=blur", "output.format=same", *extra])


def _stages(cfg, row, **storages):
    """One plan row through the three stages in this process (``storages``: what the job passes them)."""
    inputs, outputs = storages.get("inputs"), storages.get("outputs")
    detect = DetectFaces(cfg, inputs=inputs) if inputs is not None else DetectFaces(cfg)
    row = detect.process(dict(row))
    if row["status"] is None:
        Anonymizer(cfg)(row["payload"].faces)
    fp = anonymization_fingerprint(cfg)
    merge = (MergeAndWrite(cfg, "test-run", cfg.detection.backend, fp, outputs=outputs) if outputs is not None
             else MergeAndWrite(cfg, "test-run", cfg.detection.backend, fp))
    return merge.process(row)


def _plan_and_run(cfg, src, out, **storages):
    plan = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg))
    return {r["rel_path"]: _stages(cfg, r, **storages) for r in plan.todo}


# -- hole 10: multi-frame images ----------------------------------------------------------------------------

def _frames(astronaut_path, fmt, **kw) -> bytes:
    import io as _io

    im = Image.open(astronaut_path).convert("RGB")
    buf = _io.BytesIO()
    im.save(buf, fmt, save_all=True, append_images=[im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,kw", [("TIFF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_a_multi_frame_image_is_refused_not_cut_to_its_first_frame(astronaut_path, fmt, kw):
    data = _frames(astronaut_path, fmt, **kw)
    assert getattr(Image.open(__import__("io").BytesIO(data)), "n_frames", 1) == 2
    with pytest.raises(io.InputError, match=f"multi-frame {fmt} \\(2 frames\\)"):
        io.decode_image(data, 64_000_000)


def test_a_multi_frame_input_is_an_error_row_with_nothing_written(tmp_path, astronaut_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "pages.tif").write_bytes(_frames(astronaut_path, "TIFF"))
    (row,) = _plan_and_run(_blur(), src, out)["pages.tif"]
    assert row["status"] == "error" and "multi-frame TIFF" in row["error"] and not (out / "pages.tif").exists()


def test_an_mpo_keeps_its_primary_picture_and_says_its_previews_are_not_written(astronaut_path):
    data = _frames(astronaut_path, "MPO")
    dec = io.decode_image(data, 64_000_000)
    assert dec.format == "MPO" and dec.rgb.shape == (512, 512, 3)
    assert any("MPO" in n and "1 further frame" in n for n in dec.notes), dec.notes
    written = Image.open(__import__("io").BytesIO(io.encode_image(dec.rgb, None, "a.jpg", 95)))
    assert written.format == "JPEG" and getattr(written, "n_frames", 1) == 1


# -- hole 12: side-table rows for images not in the input ----------------------------------------------------

def test_rows_for_paths_not_in_the_input_are_written_once_across_resumes(tmp_path, t1_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(t1_path, src / "t1.jpg")
    table = tmp_path / "ann.csv"
    table.write_text("path,x0,y0,x1,y1\nt1.jpg,1,1,50,50\ngone.jpg,1,1,20,20\n")
    cfg = _blur("input.mode=annotations", f"input.annotations={table}")
    fp = anonymization_fingerprint(cfg)

    def record(plan, run_id):  # what run_job writes for the plan's orphans
        rows = [annotations.orphan_row(o, str(src), run_id, fp) for o in plan.orphans]
        if rows:
            manifest.write_part(str(out), "_manifest", run_id, 0, rows)
        return len(rows)

    assert record(make_plan(cfg, str(src), str(out), fp), "20250101T000000-aaaaaa") == 1
    assert record(make_plan(cfg, str(src), str(out), fp), "20250101T000001-bbbbbb") == 0, "recorded again"
    table.write_text("path,x0,y0,x1,y1\nt1.jpg,1,1,50,50\nt1.jpg,2,2,40,40\ngone.jpg,1,1,20,20\n")
    assert record(make_plan(cfg, str(src), str(out), fp), "20250101T000002-cccccc") == 1  # new facts: row 2
    over = _blur("input.mode=annotations", f"input.annotations={table}", "output.overwrite=true")
    assert len(make_plan(over, str(src), str(out), fp).orphans) == 1  # the new run's manifest holds them too
