"""Every fail-closed branch of the stages, reached by an injected failure and judged in pixels.

``tests/branch_sites.py`` finds every site in the stage modules where a face can miss its requested method or an
image can lose its output (each ``except``, each box destroyed or fallback recorded, each ``withheld``). Each
``Case`` below injects one failure into the real stages, run in this process as the Ray actors run them (the
batch interfaces ``DetectFaces`` -> ``AnonymizeFaces`` -> ``MergeAndWrite``), under a line tracer, and checks:

- that the injection executed the sites the case claims (so a case cannot drift away from its branch), and
- in the file on disk: every detected box is destroyed (the injected faces' boxes are the mask colour, every
  pixel), or nothing was written and the earlier run's output at that key is gone.

``test_every_site_is_claimed_by_a_case`` fails when a site is neither claimed by a case nor on ``NOT_PER_IMAGE``:
a new branch needs an injection here. The photo is a crop of insightface's t1.jpg with three of its people.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from rp_distributed import annotations, compose, io, manifest, pipeline
from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.pipeline import AnonymizeFaces, DetectFaces, MergeAndWrite, _columns, _rows
from tests import branch_sites
from tests.branch_sites import LineTrace

MAGENTA = (255, 0, 255)
BASE = ["anonymizer.method=blur", "anonymizer.fallback=mask", f"anonymizer.mask_color={list(MAGENTA)}",
        "output.format=png", "alignment.face_size=64"]
WEAK = ["anonymizer.blur_strength=0.0001"]  # leaves every face recognizable: the gate must mask it
ESCALATE = ["privacy.escalate=true"]

# Sites that are not about one image's pixels: what Ray prints while starting, and report.html at the end of a
# run (a failure there is recorded in the summary and never touches an output).
NOT_PER_IMAGE = {"pipeline:_native_stderr_aside:except#0": "Ray start-up output, shown when Ray fails to start",
                 "pipeline:_end_of_run:except#0": "report.html / run info write failure, after every image"}


class WorkerEnded(Exception):
    """Raised by the injected ``end_worker``: in Ray the process exits and its batch is retried elsewhere."""


def _raise(exc: BaseException, when: Callable[[], bool] = lambda: True):
    def fail(*args, **kwargs):
        if when():
            raise exc
        return None
    return fail


def _nth(n: int):
    """A predicate true on its ``n``-th call (0-based) only."""
    calls = [-1]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == n
    return hit


def _wrap(obj, name: str, mp, before: Callable[[tuple], None]) -> None:
    """``obj.name`` runs ``before(args)`` first (which may raise), then the real one."""
    real = getattr(obj, name)

    def wrapped(*args, **kwargs):
        before(args)
        return real(*args, **kwargs)
    mp.setattr(obj, name, wrapped)


@dataclass
class Ctx:
    bench: "Bench"
    detect: DetectFaces
    stage: AnonymizeFaces
    merge: MergeAndWrite

    @property
    def anonymizer(self):
        return self.stage.anonymizer


# -- injections (each gets the stages of its case and pytest's monkeypatch) ------------------------------------

def truncated_input(ctx, mp):
    ctx.bench.input.write_bytes(ctx.bench.input.read_bytes()[:3000])


def storage_read_fails(ctx, mp):
    mp.setattr(io, "read_bytes", _raise(OSError("connection reset by peer")))


def detector_fails(ctx, mp):
    mp.setattr(ctx.detect.detector, "detect", _raise(RuntimeError("detector exploded")))


def detector_device_fault(ctx, mp):
    mp.setattr(ctx.detect.detector, "detect", _raise(RuntimeError("CUDA error: an illegal memory access")))


def detection_stage_bug(ctx, mp):
    mp.setattr(ctx.detect, "_choose_prompts", _raise(KeyError("bug")))


def alignment_fails_on_face_1(ctx, mp):
    mp.setattr(ctx.detect, "_align", _wrapped_call(ctx.detect._align, _nth(1), RuntimeError("warp exploded")))


def _wrapped_call(real, when, exc):
    def call(*args, **kwargs):
        if when():
            raise exc
        return real(*args, **kwargs)
    return call


def embedding_fails(ctx, mp):
    mp.setattr(ctx.detect.embedder, "embed_many", _raise(RuntimeError("arcface exploded")))
    mp.setattr(ctx.detect.embedder, "embed", _raise(RuntimeError("arcface exploded")))
    mp.setattr(ctx.anonymizer.embedder, "embed", _raise(RuntimeError("arcface exploded")))


def blur_fails_on_face_1(ctx, mp):
    when = _nth(1)
    mp.setattr(compose, "destroy", _wrapped_call(compose.destroy, when, RuntimeError("blur exploded")))


def every_destructive_method_fails(ctx, mp):
    mp.setattr(compose, "destroy", _raise(RuntimeError("cv2 exploded")))


def generation_fails(ctx, mp):
    mp.setattr(ctx.anonymizer.rp, "generate", _raise(RuntimeError("generation exploded")))


def anonymizer_fails(ctx, mp):
    mp.setattr(ctx.anonymizer.rp, "latent_shape", _raise(ValueError("scheduler exploded")))


def anonymizer_device_fault(ctx, mp):
    mp.setattr(ctx.anonymizer.rp, "latent_shape", _raise(RuntimeError("CUDA error: device-side assert triggered")))


def escalation_check_fails(ctx, mp):
    mp.setattr(ctx.anonymizer.scorer, "distance", _raise(RuntimeError("recognizer exploded")))


def escalation_check_cannot_run(ctx, mp):
    mp.setattr(ctx.anonymizer.scorer, "descriptor", lambda *a, **k: None)  # no face found to describe


def paste_back_fails_on_face_1(ctx, mp):
    mp.setattr(compose, "paste_back", _wrapped_call(compose.paste_back, _nth(1), RuntimeError("warp exploded")))


def crop_lost_on_face_1(ctx, mp):
    real = ctx.stage.anonymizer

    def anonymize(faces):  # a face that leaves the anonymizer with neither a crop nor a reason
        real(faces)
        faces[min(1, len(faces) - 1)].anon_crop = None
        faces[min(1, len(faces) - 1)].face_error = None
    mp.setattr(ctx.stage, "anonymizer", anonymize)


def paste_and_fallback_fail(ctx, mp):
    paste_back_fails_on_face_1(ctx, mp)
    mp.setattr(compose, "destroy_box", _raise(RuntimeError("fallback exploded")))


def whole_image_replace_fails(ctx, mp):
    from rp_distributed.faces import align

    mp.setattr(align, "crop_to_image", _raise(RuntimeError("resize exploded")))


def whole_image_replace_and_fallback_fail(ctx, mp):
    whole_image_replace_fails(ctx, mp)
    mp.setattr(compose, "destroy_box", _raise(RuntimeError("fallback exploded")))


def gate_fails_on_face_1(ctx, mp):
    gate = ctx.merge.checks.gate
    mp.setattr(gate, "compare", _wrapped_call(gate.compare, _nth(1), RuntimeError("recognizer exploded")))


def gate_cannot_run(ctx, mp):
    gate, original = ctx.merge.checks.gate, ctx.bench.source
    describe = gate.descriptor

    def blind(image, box, landmarks=None):  # a descriptor for the input only: none for what is written
        same = image.shape == original.shape and np.array_equal(image, original)
        return describe(image, box, landmarks) if same else None
    mp.setattr(gate, "descriptor", blind)


def recheck_fails(ctx, mp):
    gate, checks = ctx.merge.checks.gate, ctx.merge.checks
    masked = []
    _wrap(checks, "_mask", mp, lambda args: masked.append(1))
    mp.setattr(gate, "compare", _wrapped_call(gate.compare, lambda: bool(masked), RuntimeError("recheck exploded")))


def mask_lands_on_a_copy(ctx, mp):
    real = compose.destroy_box

    def lost(image, box, method, cfg, margin=0.3, out=None):
        return real(image, box, method, cfg, margin=margin, out=None)
    mp.setattr(compose, "destroy_box", lost)


def report_recognizer_fails(ctx, mp):
    from rp_distributed.diffusion.identity import IdentityEmbedder

    reporter = IdentityEmbedder(str(ctx.bench.tiny / "arcface" / "w600k_r50.onnx"))
    mp.setattr(reporter, "embed_many", _raise(RuntimeError("second recognizer exploded")))
    mp.setattr(ctx.merge.checks, "reporter", reporter)


def utility_fails(ctx, mp):
    mp.setattr(ctx.merge.checks, "utility", _raise(RuntimeError("pose exploded")))


def write_fails(ctx, mp):
    mp.setattr(io, "write_atomic", _raise(OSError("disk full")))


def encode_fails(ctx, mp):
    mp.setattr(io, "encode_image", _raise(ValueError("encoder exploded")))


def merge_stage_bug(ctx, mp):
    mp.setattr(manifest, "face_row", _raise(KeyError("bug")))


def detector_and_stale_delete_fail(ctx, mp):
    detector_fails(ctx, mp)
    mp.setattr(io, "remove", _raise(PermissionError("access denied")))


def nothing(ctx, mp):
    pass


@dataclass(frozen=True)
class Case:
    name: str
    inject: Callable
    sites: tuple[str, ...]
    expect: str  # written | withheld | worker_ends | delete_reported
    masked: tuple[int, ...] | str = ()  # faces whose whole box is the mask colour; "all": every pixel
    flavour: str = "blur"  # blur | rp | aligned | annotations-bad-row | annotations-missing
    extra: tuple[str, ...] = ()
    reason: str = ""  # expected in the image's error / the faces' face_error or score_error


P, C, A, S = "pipeline:", "compose:", "anonymize:Anonymizer.", "scoring:FaceChecks."
CASES = [
    Case("truncated input", truncated_input, (P + "DetectFaces.process:except#0",), "withheld",
         reason="corrupt or truncated"),
    Case("storage read fails", storage_read_fails, (P + "DetectFaces.process:except#1",), "withheld",
         reason="read failed: OSError"),
    Case("detector fails", detector_fails, (P + "DetectFaces.process:except#2", P + "DetectFaces.process:withheld#1"),
         "withheld", reason="face detection failed"),
    Case("detector device fault", detector_device_fault,
         (P + "DetectFaces.process:except#2", P + "DetectFaces.__call__:except#0",
          P + "DetectFaces.__call__:end_worker#0"), "worker_ends"),
    Case("detection stage bug", detection_stage_bug, (P + "DetectFaces.__call__:except#1",), "withheld",
         reason="detection stage failed: KeyError"),
    Case("annotation row cannot be located", nothing, (P + "DetectFaces._find:withheld#0",
                                                      P + "DetectFaces.process:withheld#0"), "withheld",
         flavour="annotations-bad-row", reason="a face the annotations name cannot be located"),
    Case("no annotation rows, withhold", nothing, (P + "DetectFaces._find:withheld#1",
                                                   P + "DetectFaces.process:withheld#0"), "withheld",
         flavour="annotations-missing", reason="input.annotations_missing=withhold"),
    Case("alignment fails", alignment_fails_on_face_1,
         (P + "DetectFaces._align_faces:except#0", A + "__call__:add_error#1", C + "apply_faces:destroy_box#0"),
         "written", masked=(1,), reason="alignment failed"),
    Case("aligned input, detector fails", detector_fails, (P + "DetectFaces._aligned_face:except#0",), "written",
         flavour="aligned", extra=("input.aligned_keypoints=detector",)),
    Case("identity embedding fails", embedding_fails,
         (P + "DetectFaces._embed:except#0", P + "DetectFaces._embed:except#1", A + "_reverse_personalize:except#0",
          A + "_reverse_personalize:_fallback#0", A + "_fallback:add_error#0"), "written", masked=(0, 1, 2),
         flavour="rp", reason="identity embedding failed"),
    Case("face below min_face_size", nothing, (A + "__call__:_fallback#0",), "written", masked=(2,), flavour="rp",
         extra=("detection.min_face_size=100",), reason="smaller than detection.min_face_size"),
    Case("destructive method fails", blur_fails_on_face_1, (A + "__call__:except#1", A + "__call__:_fallback#1"),
         "written", masked=(1,), reason="blur exploded"),
    Case("fallback fails too", every_destructive_method_fails,
         (A + "_fallback:except#0", A + "_fallback:add_error#1", C + "apply_faces:destroy_box#0"), "written",
         masked=(0, 1, 2), reason="fallback failed"),
    Case("beyond max_faces", nothing, (A + "__call__:add_error#0", C + "apply_faces:destroy_box#0"), "written",
         masked=(2,), extra=("detection.max_faces=2",), reason="beyond detection.max_faces=2"),
    Case("generation fails", generation_fails,
         (A + "_generate_chunk:except#0", A + "_generate_chunk:_fallback#0", A + "_generate_chunk:except#1",
          A + "_generate_chunk:_fallback#1"), "written", masked=(0, 1, 2), flavour="rp",
         reason="generation failed"),
    Case("anonymizer stage fails", anonymizer_fails,
         (A + "__call__:except#0", P + "AnonymizeFaces.__call__:except#1", P + "AnonymizeFaces.__call__:withheld#0"),
         "withheld", flavour="rp", reason="anonymizer failed: ValueError"),
    Case("anonymizer device fault", anonymizer_device_fault,
         (A + "__call__:except#0", P + "AnonymizeFaces.__call__:except#0", P + "AnonymizeFaces.__call__:end_worker#0"),
         "worker_ends", flavour="rp"),
    Case("escalation check fails", escalation_check_fails,
         (A + "_reverse_personalize:except#1", A + "_reverse_personalize:_fallback#1"), "written", masked=(0, 1, 2),
         flavour="rp", extra=ESCALATE, reason="re-identification check failed"),
    Case("escalation check cannot run", escalation_check_cannot_run, (A + "_reverse_personalize:_fallback#1",),
         "written", masked=(0, 1, 2), flavour="rp", extra=ESCALATE, reason="check could not run"),
    Case("still re-identified after the ladder", nothing, (A + "_reverse_personalize:_fallback#2",), "written",
         masked=(0, 1, 2), flavour="rp", reason="still re-identified after 2 tries",
         extra=(*ESCALATE, "privacy.reid_threshold=5.0", "privacy.max_tries=2", "privacy.guidance_ladder=[-15.0]")),
    Case("paste-back fails", paste_back_fails_on_face_1,
         (C + "apply_faces:except#0", C + "apply_faces:add_error#0", C + "apply_faces:destroy_box#0"), "written",
         masked=(1,), reason="merge failed"),
    Case("no anonymized crop", crop_lost_on_face_1, (C + "apply_faces:add_error#1", C + "apply_faces:destroy_box#0"),
         "written", masked=(1,), reason="no anonymized crop"),
    Case("paste-back and fallback fail", paste_and_fallback_fail,
         (C + "apply_faces:except#1", P + "MergeAndWrite.process:withheld#0"), "withheld",
         reason="could not be anonymized"),
    Case("aligned input, replace fails", whole_image_replace_fails,
         (C + "replace_whole:except#0", C + "replace_whole:add_error#0", C + "replace_whole:destroy_box#0"),
         "written", masked="all", flavour="aligned", reason="merge failed"),
    Case("aligned input, no anonymized crop", crop_lost_on_face_1,
         (C + "replace_whole:add_error#1", C + "replace_whole:destroy_box#0"), "written", masked="all",
         flavour="aligned", reason="no anonymized crop"),
    Case("aligned input, replace and fallback fail", whole_image_replace_and_fallback_fail,
         (C + "replace_whole:except#1",), "withheld", flavour="aligned", reason="could not be anonymized"),
    Case("re-ID gate fails", gate_fails_on_face_1,
         (S + "_gate:except#0", S + "_gate:_mask#0", S + "_mask:destroy_box#0", S + "_mask:add_error#0"), "written",
         masked=(1,), reason="re-ID check failed"),
    Case("re-ID gate cannot run", gate_cannot_run, (S + "_gate:_mask#0",), "written", masked=(0, 1, 2),
         reason="could not run"),
    Case("re-identified in the output", nothing, (S + "_gate:_mask#1",), "written", masked=(0, 1, 2), extra=WEAK,
         reason="re-identified in the output: masked"),
    Case("aligned input re-identified", nothing, (S + "_gate:_mask#1",), "written", masked="all", flavour="aligned",
         extra=WEAK, reason="re-identified in the output: masked"),
    Case("re-check of the written file fails", recheck_fails, (S + "_record:except#0",), "written",
         masked=(0, 1, 2), extra=WEAK, reason="re-check of the written image failed"),
    Case("mask lost before the write", mask_lands_on_a_copy,
         (S + "__call__:withheld#0", P + "MergeAndWrite.process:withheld#1"), "withheld", extra=WEAK,
         reason="still re-identified in the written image"),
    Case("report recognizer fails", report_recognizer_fails, (S + "_signals:except#0",), "written",
         reason="report recognizer failed"),
    Case("utility signals fail", utility_fails, (S + "_signals:except#1",), "written", reason="utility signals failed"),
    Case("write fails", write_fails, (P + "MergeAndWrite.process:except#0",), "withheld",
         reason="write failed: OSError"),
    Case("encoding fails", encode_fails, (P + "MergeAndWrite.process:except#0",), "withheld",
         reason="write failed: ValueError"),
    Case("merge stage bug", merge_stage_bug, (P + "MergeAndWrite.__call__:except#0",), "withheld",
         reason="merge stage failed: KeyError"),
    Case("earlier output cannot be deleted", detector_and_stale_delete_fail, (P + "remove_stale_outputs:except#0",),
         "delete_reported", reason="could not be deleted: PermissionError"),
]


def test_every_site_is_claimed_by_a_case():
    sites = branch_sites.all_sites()
    claimed = {s for c in CASES for s in c.sites} | set(NOT_PER_IMAGE)
    unclaimed = [f"{s.id}  ({s.text})" for s in sites.values() if s.id not in claimed]
    assert not unclaimed, ("fail-closed sites no case reaches: add a Case to tests/test_fail_closed_branches.py "
                           "that injects a failure there and checks the written file:\n  " + "\n  ".join(unclaimed))
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
        self.merge = MergeAndWrite(cfg, "run", "dlib", anonymization_fingerprint(cfg))
        faces = DetectFaces(cfg).process(self.plan_row(self.trio, "trio.png", "x"))["payload"].faces
        sides = [f.box[2] - f.box[0] for f in faces]  # three people; the third below min_face_size=100
        assert len(faces) == 3 and sides[1] >= 100 > sides[2], sides
        self.aligned = folder / "aligned.png"
        Image.fromarray(DetectFaces(self.config("blur", "alignment.face_size=128")).process(
            self.plan_row(self.trio, "trio.png", "x"))["payload"].faces[0].crop).save(self.aligned)
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
            self._detect[key] = DetectFaces(self.config(case.flavour, "input.aligned_keypoints=detector")
                                            if key == "aligned" else self.config(case.flavour))
        method = "rp" if case.flavour == "rp" else "blur"
        if method not in self._anon:  # built escalating, so its recognizer exists; cases switch it off
            self._anon[method] = AnonymizeFaces(self.config(method, *(ESCALATE if method == "rp" else ())))
        detect, stage = self._detect[key], self._anon[method]
        mp.setattr(detect, "cfg", cfg)
        anon = stage.anonymizer
        mp.setattr(anon, "cfg", cfg)
        mp.setattr(anon, "acfg", cfg.anonymizer)
        if method == "rp" and not cfg.privacy.escalate:
            mp.setattr(anon, "scorer", None)
        mp.setattr(self.merge, "cfg", cfg)
        mp.setattr(self.merge.checks, "cfg", cfg)
        return Ctx(self, detect, stage, self.merge)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, t1_rgb, tiny_dir) -> Bench:
    return Bench(tmp_path_factory.mktemp("branches"), t1_rgb, tiny_dir)


def _run(ctx: Ctx, row: dict) -> list[dict]:
    """One input through the three stages' batch interfaces, as Ray Data calls them."""
    (row,) = _rows(ctx.detect(_columns([row])))
    (row,) = _rows(ctx.stage(_columns([row])))
    rows = _rows(ctx.merge(_columns([row])))
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
    monkeypatch.setattr(pipeline, "end_worker", _raise(WorkerEnded()))
    case.inject(ctx, monkeypatch)
    sites = branch_sites.all_sites()
    with LineTrace() as trace:
        if case.expect == "worker_ends":
            with pytest.raises(WorkerEnded):
                _run(ctx, row)
            rows = None
        else:
            rows = _run(ctx, row)
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
