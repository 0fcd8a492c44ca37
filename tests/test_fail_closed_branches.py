"""Every fail-closed branch of the stages, reached by an injected failure and judged in pixels.

``tests/branch_sites.py`` finds every site in the stage modules where a face can miss its requested method or an
image can lose its output (each ``except``, each box destroyed or fallback recorded, each ``withheld``). Each
``Case`` (``tests/fail_closed_cases.py``) injects one failure into the real stages, run in this process as the Ray actors run them (the
batch interfaces ``DetectFaces`` -> ``AnonymizeFaces`` -> ``MergeAndWrite``), under a line tracer, and checks:

- that the injection executed the sites the case claims (so a case cannot drift away from its branch), and
- in the file on disk: every detected box is destroyed (the injected faces' boxes are the mask colour, every
  pixel), or nothing was written and the earlier run's output at that key is gone.

``test_every_site_is_claimed_by_a_case`` fails when a site is neither claimed by a case nor on ``NOT_PER_IMAGE``:
a new branch needs an injection here. The photo is a crop of insightface's t1.jpg with three of its people.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from rp_distributed import annotations, manifest
from rp_distributed.anonymizer import AnonymizerSettings
from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.records import ImageRow
from rp_distributed.stages import anonymize as anonymize_stage
from rp_distributed.stages import detect as detect_stage
from rp_distributed.stages.anonymize import AnonymizeFaces
from rp_distributed.stages.batch import columns as _columns
from rp_distributed.stages.batch import dicts
from rp_distributed.stages.batch import rows as _rows
from rp_distributed.stages.detect import DetectFaces, DetectSettings
from rp_distributed.stages.merge import MergeAndWrite, MergeSettings
from tests import branch_sites
from tests.branch_sites import LineTrace, untraced
from tests.fail_closed_cases import (
    BASE,
    CASES,
    ESCALATE,
    MAGENTA,
    NOT_PER_IMAGE,
    Case,
    Ctx,
    WorkerEnded,
    _raise,
)


def test_every_site_is_claimed_by_a_case():
    sites = branch_sites.all_sites()
    claimed = {s for c in CASES for s in c.sites} | set(NOT_PER_IMAGE)
    unclaimed = [f"{s.id}  ({s.text})" for s in sites.values() if s.id not in claimed]
    assert not unclaimed, ("fail-closed sites no case reaches: add a Case to tests/fail_closed_cases.py "
                           "that injects a failure there and checks the written file (sites are numbered in "
                           "source order per function, so a new one shifts the numbers after it: recheck the "
                           "cases of that function):\n  " + "\n  ".join(unclaimed))
    stale = sorted(claimed - set(sites))
    assert not stale, f"cases claim sites the code no longer has (renumbered? check each case): {stale}"


# -- the bench: the real stages, built once per flavour, configured per case ----------------------------------

class Bench:
    """A crop of t1.jpg with three people, the stages that run on it, and the side inputs (an aligned face, the
    annotation tables). Stages load their models once; each case swaps in its own config."""

    def __init__(self, folder, t1_rgb, tiny):
        self.folder, self.tiny = folder, tiny
        self.source = np.ascontiguousarray(t1_rgb[140:440, 0:640])
        self.trio = folder / "trio.png"
        Image.fromarray(self.source).save(self.trio)
        self._detect, self._anon = {}, {}
        cfg = self.config("blur")
        self.merge = MergeAndWrite.from_config(cfg, "run", anonymization_fingerprint(cfg))
        faces = DetectFaces.from_config(cfg).process(ImageRow.of(self.plan_row(self.trio, "trio.png", "x"))).payload.faces
        sides = [f.box[2] - f.box[0] for f in faces]  # three people; the third below min_face_size=100
        assert len(faces) == 3 and sides[1] >= 100 > sides[2], sides
        self.aligned = folder / "aligned.png"
        Image.fromarray(DetectFaces.from_config(self.config("blur", "alignment.face_size=128")).process(
            ImageRow.of(self.plan_row(self.trio, "trio.png", "x"))).payload.faces[0].crop).save(self.aligned)
        good = "\n".join(f"trio.png,{','.join(f'{v:g}' for v in f.box)}" for f in faces)
        (folder / "bad-row.csv").write_text(f"path,x0,y0,x1,y1\n{good}\ntrio.png,300,40,280,90\n")
        (folder / "other.csv").write_text(f"path,x0,y0,x1,y1\nsomething_else.png,1,1,30,30\n")

    def config(self, flavour: str, *extra: str):
        over = list(BASE)
        if flavour == "rp":
            t = self.tiny
            over += ["anonymizer.method=reverse_personalization", f"diffusion.model={t}/sdxl",
                     f"diffusion.ip_adapter={t}/ip-adapter", f"diffusion.arcface={t}/arcface/w600k_r50.onnx",
                     "diffusion.device=cpu", "diffusion.dtype=float32", "diffusion.num_inversion_steps=2",
                     "anonymizer.face_batch_size=2", "privacy.escalate=false"]
        elif flavour == "aligned":
            over += ["input.mode=aligned"]
        elif flavour.startswith("annotations"):
            table = "bad-row.csv" if flavour == "annotations-bad-row" else "other.csv"
            over += ["input.mode=annotations", f"input.annotations={self.folder / table}",
                     "input.annotations_missing=withhold"]
        return load_config(None, over + list(extra))

    @staticmethod
    def plan_row(path, rel, out, **cols) -> dict:
        return {"input_uri": str(path), "rel_path": rel, "output_uri": str(out), "stale_output_uri": None,
                "error": None, "notes": None, **cols}

    def stages(self, case: Case, cfg, mp) -> Ctx:
        """The flavour's stages, carrying ``cfg`` for this case (restored by ``mp`` afterwards)."""
        key = "aligned" if case.flavour == "aligned" else case.flavour
        if key not in self._detect:
            self._detect[key] = DetectFaces.from_config(self.config(case.flavour, "input.aligned_keypoints=detector")
                                            if key == "aligned" else self.config(case.flavour))
        method = "rp" if case.flavour == "rp" else "blur"
        if method not in self._anon:  # built escalating, so its recognizer exists; cases switch it off
            self._anon[method] = AnonymizeFaces.from_config(self.config(method, *(ESCALATE if method == "rp" else ())))
        detect, stage = self._detect[key], self._anon[method]
        mp.setattr(detect, "settings", DetectSettings.of(cfg))
        for section in ("input", "detection", "alignment", "diffusion"):
            mp.setattr(detect.finder, section, getattr(cfg, section))
        anon = stage.anonymizer
        mp.setattr(anon, "settings", AnonymizerSettings.of(cfg))
        if method == "rp":
            for name in ("invert", "generate"):  # diffusion holds no site: run it untraced
                mp.setattr(anon.method.rp, name, untraced(getattr(anon.method.rp, name)))
            if not cfg.privacy.escalate:
                mp.setattr(anon.method, "scorer", None)
        merge_settings = MergeSettings.of(cfg)
        mp.setattr(self.merge, "settings", merge_settings)
        mp.setattr(self.merge.checks, "cfg", merge_settings)
        mp.setattr(self.merge.audit, "anon", cfg.anonymizer)
        return Ctx(self, detect, stage, self.merge)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, t1_rgb, tiny_dir) -> Bench:
    return Bench(tmp_path_factory.mktemp("branches"), t1_rgb, tiny_dir)


def _run(ctx: Ctx, row: ImageRow) -> list[dict]:
    """One input through the three stages' batch interfaces, as Ray Data calls them."""
    (row,) = _rows(ctx.detect(_columns([row])))
    (row,) = _rows(ctx.stage(_columns([row])))
    rows = dicts(ctx.merge(_columns([row])))
    for r in rows:
        manifest.normalize_row(r)  # every row fits the manifest's schema
    return rows


def _box_pixels(image: np.ndarray, r: dict) -> np.ndarray:
    x0, y0 = int(np.floor(r["box_x0"])), int(np.floor(r["box_y0"]))
    x1, y1 = int(np.ceil(r["box_x1"])), int(np.ceil(r["box_y1"]))
    return image[max(y0, 0):y1, max(x0, 0):x1].astype(int)


def _check_written(case: Case, rows: list[dict], out, original: np.ndarray) -> None:
    assert {r["status"] for r in rows} == {"ok"} and out.exists(), [r["error"] for r in rows]
    written = np.asarray(Image.open(out).convert("RGB"))
    assert written.shape == original.shape
    assert len(rows) == (1 if case.flavour == "aligned" else 3)
    for r in rows:
        assert r["output_uri"] == str(out) and r["identity_exported"] is False, r
        before, after = _box_pixels(original, r), _box_pixels(written, r)
        if case.masked == "all":
            assert np.all(written == MAGENTA), "the whole aligned image is the mask colour"
        elif r["face_index"] in case.masked:
            assert np.all(after == MAGENTA), f"face {r['face_index']}: its box is not wholly the mask colour"
        else:
            assert np.abs(after - before).mean() > 8, f"face {r['face_index']} is not destroyed"
    if case.reason:
        said = " | ".join(f"{r['face_error']} {r['score_error']}" for r in rows)
        assert case.reason in said, said


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_an_injected_failure_leaves_no_face_in_any_output(case, bench, monkeypatch, tmp_path):
    cfg = bench.config(case.flavour, *case.extra)
    ctx = bench.stages(case, cfg, monkeypatch)
    src = tmp_path / ("aligned.png" if case.flavour == "aligned" else "trio.png")
    src.write_bytes((bench.aligned if case.flavour == "aligned" else bench.trio).read_bytes())
    monkeypatch.setattr(bench, "input", src, raising=False)
    original = np.asarray(Image.open(src).convert("RGB"))
    out = tmp_path / "out" / src.name
    out.parent.mkdir()
    out.write_bytes(src.read_bytes())  # an earlier run's output at this key: it must not outlive a failure
    row = bench.plan_row(src, src.name, out)
    if case.flavour.startswith("annotations"):
        row |= annotations.attach(cfg, pa.table({"input_uri": [str(src)], "rel_path": [src.name]}))[0].to_pylist()[0]
    row = ImageRow.of(row)
    for stage_module in (detect_stage, anonymize_stage):
        monkeypatch.setattr(stage_module, "end_worker", _raise(WorkerEnded()))
    case.inject(ctx, monkeypatch)
    sites = branch_sites.all_sites()
    with LineTrace() as trace:
        if case.expect == "worker_ends":
            with pytest.raises(WorkerEnded):
                _run(ctx, row)
            rows = None
        else:
            rows = _run(ctx, row)
    gone = [s for s in case.sites if s not in sites]
    assert not gone, f"the code no longer has the sites {gone} (test_every_site_is_claimed_by_a_case lists them)"
    missed = [s for s in case.sites if not trace.reached(sites[s])]
    assert not missed, f"the injection did not reach {[(s, sites[s].text) for s in missed]}"

    if case.expect == "written":
        _check_written(case, rows, out, original)
    elif case.expect == "worker_ends":  # Ray retries the batch on a fresh worker; this one wrote nothing
        assert out.read_bytes() == src.read_bytes() and sorted(out.parent.iterdir()) == [out]
    else:
        assert {r["status"] for r in rows} <= {"withheld", "error"} and all(r["output_uri"] is None for r in rows)
        assert case.reason in (rows[0]["error"] or ""), rows[0]["error"]
        if case.expect == "withheld":
            assert list(out.parent.iterdir()) == [], "a file is left at the output key of a withheld image"
        else:  # the earlier output could not be deleted: the manifest says so (the operator must act)
            assert out.exists()
