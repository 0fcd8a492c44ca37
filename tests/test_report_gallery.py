"""report.html's gallery, decoded: each thumbnail is cut from the written output, and an original face is embedded
only when the current invocation asks for it (never because an earlier run did).

t1.jpg goes through the stages in this process (blur, six faces); its manifest part and a run record whose config
asked for originals are written as ``run_job`` writes them. Every thumbnail is decoded from the page and compared
with the same box cut from the output file and from the input file."""

from __future__ import annotations

import base64
import html
import io as _io
import re

import numpy as np
import pytest
from PIL import Image

from rp_distributed import manifest_writer, report
from rp_distributed.config import config_to_dict, load_config
from rp_distributed.job.run import JobResult, end_of_run
from tests.test_fail_closed import run_stages

THUMB = re.compile(r'<img class="thumb( original)?" alt="(original|anonymized) ([^"]+)" '
                   r'src="data:image/jpeg;base64,([^"]+)">')
from tests.conftest import FAST_DETECTION


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, t1_path):
    """(output folder, the face rows, input pixels, output pixels) of a run recorded with originals on."""
    out = tmp_path_factory.mktemp("gallery") / "out"
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png",
                             "report.include_originals=true"])
    rows = run_stages(cfg, t1_path, out / "t1.png")
    manifest_writer.write_part(str(out), "_manifest", "test-run", 0, rows)
    report.write_run_info(str(out), "_manifest", "test-run", {"run_id": "test-run", "config": config_to_dict(cfg)})
    original = np.asarray(Image.open(t1_path).convert("RGB"))
    written = np.asarray(Image.open(out / "t1.png").convert("RGB"))
    assert len(rows) == 6 and not np.array_equal(original, written)
    return out, rows, original, written


def _decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(_io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def _thumbs(out) -> list[tuple[str, str, str]]:
    page = (out / "_manifest" / "report.html").read_text()
    return [(kind, html.unescape(tag), b64) for _, kind, tag, b64 in THUMB.findall(page)]


def _check(out, rows, original, written, originals: bool) -> None:
    thumbs = _thumbs(out)
    by_tag = {f"{r['rel_path']}#{r['face_index']}": r for r in rows}
    anonymized = [t for t in thumbs if t[0] == "anonymized"]
    assert sorted(tag for _, tag, _ in anonymized) == sorted(by_tag)  # one per written face
    for kind, tag, b64 in thumbs:
        r, got = by_tag[tag], _decoded(b64)
        from_output = _decoded(report.thumbnail(written, r, 112))
        from_input = _decoded(report.thumbnail(original, r, 112))
        assert np.abs(from_output - from_input).mean() > 4, tag  # the two sources are told apart
        want, other = (from_input, from_output) if kind == "original" else (from_output, from_input)
        assert got.shape == want.shape and np.abs(got - want).mean() < 1.0, (kind, tag)
        assert np.abs(got - other).mean() > 4, (kind, tag)
    assert len(thumbs) == len(anonymized) * (2 if originals else 1)


def test_gallery_thumbnails_are_the_written_outputs(recorded):
    out, rows, original, written = recorded
    report.write_report(str(out), include_originals=False)
    _check(out, rows, original, written, originals=False)


def test_originals_only_when_this_invocation_asks(recorded):
    """The recorded run asked for originals; a report built now without asking embeds none (18.8)."""
    out, rows, original, written = recorded
    report.write_report(str(out))  # `rp-anonymize report OUTPUT` with no flag
    _check(out, rows, original, written, originals=False)
    report.write_report(str(out), include_originals=True)  # `--include-originals`
    _check(out, rows, original, written, originals=True)


def test_a_rerun_with_originals_off_writes_a_report_without_them(recorded):
    """A rerun that finds everything done still rewrites the report, with its own setting, not the earlier run's."""
    out, rows, original, written = recorded
    result = JobResult(run_id="rerun", summary={}, skipped=1)
    end_of_run(result, load_config(None, ["anonymizer.method=blur", "output.format=png"]), str(out), None, True)
    assert result.report_error is None and result.report_uri.endswith("report.html")
    _check(out, rows, original, written, originals=False)
    end_of_run(result, load_config(None, ["report.include_originals=true", "report.gallery_size=2"]), str(out),
                None, True)
    assert len(_thumbs(out)) == 4  # this invocation's gallery size too
