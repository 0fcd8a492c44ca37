"""Each input's content identity: its listing's size and change marker (no extra request), recorded in the manifest,
so resume redoes an input replaced under the same key; a manifest row without them (written before they existed)
is unknown, and trusted as before. The hashes of the bytes read and written: tests/test_verify.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rp_distributed import io, manifest, manifest_writer
from rp_distributed.config import anonymization_fingerprint
from rp_distributed.job.plan import make_plan
from tests.conftest import skimage_image
from tests.test_verify import _cfg, _inputs  # the export's config and inputs


def _done_manifest(src: Path, out: Path, cfg, with_identity: bool) -> None:
    """A manifest saying every input under ``src`` was done (its output written), as the merge stage writes it."""
    listing = io.list_inputs_table(str(src), cfg.input.extensions)
    fp, rows = anonymization_fingerprint(cfg), []
    for uri, rel, size, version in zip(*(listing[c].to_pylist() for c in ("uri", "rel_path", "size", "version"))):
        key = io.output_rel_path(rel, "png")
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        (out / key).write_bytes((src / rel).read_bytes())
        identity = {"input_size": size, "input_version": version} if with_identity else {}
        rows.append(manifest.image_row("20260101T000000-aaaaaa", fp, uri, rel, "no_face",
                                       output_uri=io.join_uri(str(out), key), **identity))
    manifest_writer.write_part(str(out), "_manifest", "20260101T000000-aaaaaa", 0, rows)


def test_listing_carries_each_inputs_size_and_version(tmp_path):
    src = _inputs(tmp_path / "in")
    listing = io.list_inputs_table(str(src), [".jpg", ".png"]).to_pylist()
    by_rel = {r["rel_path"]: r for r in listing}
    stat = os.stat(src / "astronaut.png")
    assert by_rel["astronaut.png"]["size"] == stat.st_size
    assert by_rel["astronaut.png"]["version"] == f"mtime_ns:{stat.st_mtime_ns}"


def test_resume_redoes_an_input_replaced_under_the_same_key(tmp_path):
    cfg = _cfg()
    src, out = _inputs(tmp_path / "in"), tmp_path / "out"
    _done_manifest(src, out, cfg, with_identity=True)
    plan = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg))
    assert (plan.skipped, plan.num_todo, plan.redone_replaced) == (3, 0, 0)
    # Same key, same settings, other content: redone, and counted as replaced (not as changed settings).
    shutil.copy(skimage_image("coffee.png"), src / "astronaut.png")
    plan = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg))
    assert (plan.skipped, plan.num_todo, plan.redone_replaced, plan.redone_changed) == (2, 1, 1, 0)
    (todo,) = plan.todo
    assert todo["rel_path"] == "astronaut.png" and todo["input_size"] == os.stat(src / "astronaut.png").st_size


def test_rows_without_an_identity_are_unknown_not_replaced(tmp_path):
    cfg = _cfg()
    src, out = _inputs(tmp_path / "in"), tmp_path / "out"
    _done_manifest(src, out, cfg, with_identity=False)  # as a manifest written before the columns existed
    shutil.copy(skimage_image("coffee.png"), src / "astronaut.png")
    plan = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg))
    assert (plan.skipped, plan.num_todo, plan.redone_replaced) == (3, 0, 0)
