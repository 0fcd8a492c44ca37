"""A manifest written before the package was split into stages/ and job/ resumes after it with zero inputs redone,
and every fingerprint is what it was (tests/data/resume_v1, written by the earlier code: see its README)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rp_distributed.config import CENTERFACE_PASSES, anonymization_fingerprint, load_config
from rp_distributed.job.plan import make_plan
from tests.conftest import insightface_image, skimage_image

FIXTURE = Path(__file__).parent / "data" / "resume_v1"


@pytest.mark.parametrize("name", sorted(json.loads((FIXTURE / "fingerprints.json").read_text())))
def test_fingerprints_are_unchanged(name):
    case = json.loads((FIXTURE / "fingerprints.json").read_text())[name]
    assert anonymization_fingerprint(_as_written(case["overrides"])) == case["fingerprint"]
    # The same overrides on today's defaults are other settings (the default detection has changed since):
    # a run made then is redone, not skipped.
    assert anonymization_fingerprint(load_config(None, case["overrides"])) != case["fingerprint"]


def _as_written(overrides: list[str]):
    """The fixture's config as it was: its overrides on the defaults of then, whose detection passes were the
    CenterFace passes alone (the second look and the MTCNN pass joined the default later)."""
    cfg = load_config(None, overrides)
    return cfg.model_copy(update={"detection": cfg.detection.model_copy(update={"passes": list(CENTERFACE_PASSES)})})


def _moved(part: Path, old: str, new: str) -> None:
    """The part with its URIs moved from ``old`` to ``new`` (nothing else changes)."""
    table = pq.read_table(part)
    for name in ("input_uri", "output_uri"):
        col = pc.replace_substring(table[name], old, new)
        table = table.set_column(table.schema.get_field_index(name), name, col)
    pq.write_table(table, part)


def test_a_run_made_before_the_split_resumes_with_nothing_redone(tmp_path):
    run = json.loads((FIXTURE / "run.json").read_text())
    shutil.copytree(FIXTURE / "run" / "out", tmp_path / "out")
    (tmp_path / "in").mkdir()
    shutil.copy(insightface_image("t1.jpg"), tmp_path / "in" / "t1.jpg")
    shutil.copy(skimage_image("coffee.png"), tmp_path / "in" / "coffee.png")
    for part in (tmp_path / "out" / "_manifest").glob("part-*.parquet"):
        _moved(part, run["prefix"], str(tmp_path))
    cfg = load_config(None, run["overrides"])
    plan = make_plan(cfg, str(tmp_path / "in"), str(tmp_path / "out"), anonymization_fingerprint(cfg))
    assert (plan.skipped, plan.num_todo, plan.redone_changed, plan.unrecorded) == (2, 0, 0, 0)
    # The check can fail: the same run under another setting redoes both inputs.
    other = load_config(None, [*run["overrides"], "merge.feather=0.1"])
    again = make_plan(other, str(tmp_path / "in"), str(tmp_path / "out"), anonymization_fingerprint(other))
    assert (again.skipped, again.num_todo, again.redone_changed) == (0, 2, 2)
