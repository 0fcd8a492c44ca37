"""The injected failures of ``tests/test_fail_closed_branches.py``: one ``Case`` per fail-closed branch.

Each injection takes the stages of its case (``Ctx``) and pytest's monkeypatch; each case names the sites of
``tests/branch_sites.py`` its injection must reach and what the written file must show (``expect``, ``masked``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rp_distributed import compose, io, manifest, scoring
from rp_distributed.anonymizer import anonymizer as anonymizer_core
from rp_distributed.anonymizer import methods
from rp_distributed.stages.anonymize import AnonymizeFaces
from rp_distributed.stages.detect import DetectFaces
from rp_distributed.stages.merge import MergeAndWrite

MAGENTA = (255, 0, 255)
# dlib's HOG finds the trio's three people at distinct sizes (the min_face_size case needs one below 100 px); the
# output audit still looks at every written image (one CenterFace pass: the cases are about the branches, not its
# recall, which tests/test_audit.py and the recall benchmark measure).
BASE = ["anonymizer.method=blur", "anonymizer.fallback=mask", f"anonymizer.mask_color={list(MAGENTA)}",
        "output.format=png", "alignment.face_size=64", "detection.backend=dlib",
        "merge.audit.passes=[{member: centerface}]"]
WEAK = ["anonymizer.blur_strength=0.0001"]  # leaves every face recognizable: the gate must mask it
ESCALATE = ["privacy.escalate=true"]

# Sites that are not about one image's pixels: what Ray prints while starting, and report.html at the end of a
# run (a failure there is recorded in the summary and never touches an output).
NOT_PER_IMAGE = {"job/ray_session:_native_stderr_aside:except#0": "Ray start-up output, shown when Ray fails to start",
                 "job/run:end_of_run:except#0": "report.html / run info write failure, after every image",
                 "job/run:lost_input_row:error#0": "a poison input's row, once its worker died with its block and alone: "
                                                   "needs Ray (tests/test_fail_closed.py, the poison-input job)",
                 "anonymizer/methods:build_method:except#0": "an unknown method fails the actor's construction (the "
                                                             "config refuses the name before any actor starts)"}


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
    bench: object  # test_fail_closed_branches.Bench
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
    mp.setattr(ctx.detect.finder.detector, "detect", _raise(RuntimeError("detector exploded")))


def detector_device_fault(ctx, mp):
    mp.setattr(ctx.detect.finder.detector, "detect", _raise(RuntimeError("CUDA error: an illegal memory access")))


def refused_at_plan_time(ctx, mp):
    real = ctx.detect.process
    mp.setattr(ctx.detect, "process", lambda row: real(dataclasses.replace(row, error="output key would leave the prefix")))


def detection_stage_bug(ctx, mp):
    mp.setattr(ctx.detect, "_choose_prompts", _raise(KeyError("bug")))


def alignment_fails_on_face_1(ctx, mp):
    from rp_distributed.faces import align

    mp.setattr(align, "align", _wrapped_call(align.align, _nth(1), RuntimeError("warp exploded")))


def _wrapped_call(real, when, exc):
    def call(*args, **kwargs):
        if when():
            raise exc
        return real(*args, **kwargs)
    return call


def embedding_fails(ctx, mp):
    mp.setattr(ctx.detect.embedder, "embed_many", _raise(RuntimeError("arcface exploded")))
    mp.setattr(ctx.detect.embedder, "embed", _raise(RuntimeError("arcface exploded")))
    mp.setattr(ctx.anonymizer.method.embedder, "embed", _raise(RuntimeError("arcface exploded")))


def blur_fails_on_face_1(ctx, mp):
    mp.setattr(methods, "destroy", _wrapped_call(methods.destroy, _nth(1), RuntimeError("blur exploded")))


def every_destructive_method_fails(ctx, mp):
    for module in (methods, anonymizer_core):  # the method itself and the stage's fallback
        mp.setattr(module, "destroy", _raise(RuntimeError("cv2 exploded")))


def generation_fails(ctx, mp):
    mp.setattr(ctx.anonymizer.method.rp, "generate", _raise(RuntimeError("generation exploded")))


def anonymizer_fails(ctx, mp):
    mp.setattr(ctx.anonymizer.method.rp, "latent_shape", _raise(ValueError("scheduler exploded")))


def anonymizer_device_fault(ctx, mp):
    mp.setattr(ctx.anonymizer.method.rp, "latent_shape", _raise(RuntimeError("CUDA error: device-side assert triggered")))


def escalation_check_fails(ctx, mp):
    mp.setattr(ctx.anonymizer.method.scorer, "distance", _raise(RuntimeError("recognizer exploded")))


def escalation_check_cannot_run(ctx, mp):
    mp.setattr(ctx.anonymizer.method.scorer, "descriptor", lambda *a, **k: None)  # no face found to describe


def paste_back_fails_on_face_1(ctx, mp):
    mp.setattr(compose, "_paste", _wrapped_call(compose._paste, _nth(1), RuntimeError("warp exploded")))


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
    real = scoring.destroy_box

    def lost(image, box, method, cfg, margin=0.3, out=None):
        return real(image, box, method, cfg, margin=margin, out=None)
    mp.setattr(scoring, "destroy_box", lost)


def report_recognizer_fails(ctx, mp):
    from rp_distributed.faces.arcface import IdentityEmbedder

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


def low_confidence_face_1(ctx, mp):
    def marked(detected):
        detected[1].confident = False  # as the ensemble marks a weak detection only one member found
    real = ctx.detect.finder.detector.detect
    mp.setattr(ctx.detect.finder.detector, "detect", lambda image: (lambda d: (marked(d), d)[1])(real(image)))


def first_pass_misses_face_1(ctx, mp):
    real = ctx.detect.finder.detector.detect
    mp.setattr(ctx.detect.finder.detector, "detect", lambda image: [f for i, f in enumerate(real(image)) if i != 1])


def coverage_fill_fails(ctx, mp):
    mp.setattr(compose, "_fill_unreached", _raise(RuntimeError("fill exploded")))


def audit_fails(ctx, mp):
    mp.setattr(ctx.merge.audit.detector, "detect", _raise(RuntimeError("audit detector exploded")))


def audit_face_cannot_be_destroyed(ctx, mp):
    from rp_distributed import audit

    first_pass_misses_face_1(ctx, mp)
    mp.setattr(audit, "destroy_box", _raise(RuntimeError("fallback exploded")))


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


D, F, AS, M = "stages/detect:DetectFaces.", "faces/sources:FaceFinder.", "stages/anonymize:AnonymizeFaces.", "stages/merge:"
A, DC, L = "anonymizer/anonymizer:Anonymizer.", "anonymizer/methods:DestroyCrops.", "anonymizer/ladder:ReversePersonalization."
C, S, AU = "compose:", "scoring:FaceChecks.", "audit:OutputAudit."
CASES = [
    Case("refused at plan time", refused_at_plan_time, (D + "_process:error#0",), "withheld",
         reason="output key would leave the prefix"),
    Case("truncated input", truncated_input, (D + "_process:except#0", D + "_process:error#1"), "withheld",
         reason="corrupt or truncated"),
    Case("storage read fails", storage_read_fails, (D + "_process:except#1", D + "_process:error#2"), "withheld",
         reason="read failed: OSError"),
    Case("detector fails", detector_fails, (D + "_process:except#2", D + "_process:withheld#0"),
         "withheld", reason="face detection failed"),
    Case("detector device fault", detector_device_fault,
         (D + "_process:except#2", D + "__call__:except#0", D + "__call__:end_worker#0"), "worker_ends"),
    Case("detection stage bug", detection_stage_bug, (D + "__call__:except#1", D + "__call__:error#0"), "withheld",
         reason="detection stage failed: KeyError"),
    Case("annotation row cannot be located", nothing, (F + "_locate:withheld#0", D + "_process:withheld#1"), "withheld",
         flavour="annotations-bad-row", reason="a face the annotations name cannot be located"),
    Case("no annotation rows, withhold", nothing, (F + "_locate:withheld#1", D + "_process:withheld#1"), "withheld",
         flavour="annotations-missing", reason="input.annotations_missing=withhold"),
    Case("alignment fails", alignment_fails_on_face_1,
         (F + "_align_faces:except#0", A + "__call__:add_error#0", C + "apply_faces:destroy_box#0"),
         "written", masked=(1,), reason="alignment failed"),
    Case("aligned input, detector fails", detector_fails, (F + "_aligned_face:except#0",), "written",
         flavour="aligned", extra=("input.aligned_keypoints=detector",)),
    Case("identity embedding fails", embedding_fails,
         (D + "_embed:except#0", D + "_embed:except#1", L + "_ladder:except#0", L + "_ladder:fallback#0",
          A + "fallback:add_error#0"), "written", masked=(0, 1, 2), flavour="rp", reason="identity embedding failed"),
    Case("face below min_face_size", nothing, (A + "__call__:fallback#0",), "written", masked=(2,), flavour="rp",
         extra=("detection.min_face_size=100",), reason="smaller than detection.min_face_size"),
    Case("low-confidence detection", low_confidence_face_1, (A + "__call__:fallback#0",), "written", masked=(1,),
         flavour="rp", reason="low-confidence detection"),
    Case("destructive method fails", blur_fails_on_face_1, (DC + "anonymize:except#0", DC + "anonymize:fallback#0"),
         "written", masked=(1,), reason="blur exploded"),
    Case("fallback fails too", every_destructive_method_fails,
         (A + "fallback:except#0", A + "fallback:add_error#1", C + "apply_faces:destroy_box#0"), "written",
         masked=(0, 1, 2), reason="fallback failed"),
    Case("beyond max_faces", nothing, (A + "__call__:add_error#0", C + "apply_faces:destroy_box#0"), "written",
         masked=(2,), extra=("detection.max_faces=2",), reason="beyond detection.max_faces=2"),
    Case("generation fails", generation_fails,
         (L + "_generate_chunk:except#0", L + "_generate_chunk:fallback#0", L + "_generate_chunk:except#1",
          L + "_generate_chunk:fallback#1"), "written", masked=(0, 1, 2), flavour="rp", reason="generation failed"),
    Case("anonymizer stage fails", anonymizer_fails,
         (L + "anonymize:except#0", AS + "__call__:except#1", AS + "__call__:withheld#0"),
         "withheld", flavour="rp", reason="anonymizer failed: ValueError"),
    Case("anonymizer device fault", anonymizer_device_fault,
         (L + "anonymize:except#0", AS + "__call__:except#0", AS + "__call__:end_worker#0"), "worker_ends", flavour="rp"),
    Case("escalation check fails", escalation_check_fails, (L + "_rung:except#0", L + "_rung:fallback#0"), "written",
         masked=(0, 1, 2), flavour="rp", extra=ESCALATE, reason="re-identification check failed"),
    Case("escalation check cannot run", escalation_check_cannot_run, (L + "_rung:fallback#0",),
         "written", masked=(0, 1, 2), flavour="rp", extra=ESCALATE, reason="check could not run"),
    Case("still re-identified after the ladder", nothing, (L + "_ladder:fallback#1",), "written",
         masked=(0, 1, 2), flavour="rp", reason="still re-identified after 2 tries",
         extra=(*ESCALATE, "privacy.reid_threshold=5.0", "privacy.max_tries=2", "privacy.guidance_ladder=[-15.0]")),
    Case("paste-back fails", paste_back_fails_on_face_1,
         (C + "apply_faces:except#0", C + "apply_faces:add_error#0", C + "apply_faces:destroy_box#0"), "written",
         masked=(1,), reason="merge failed"),
    Case("the crop does not reach the whole box", nothing, (C + "_fill_unreached:add_error#0",), "written",
         extra=("alignment.padding=0",), reason="of its box lay beyond its aligned crop"),
    Case("covering the box fails", coverage_fill_fails, (C + "apply_faces:except#2", M + "MergeAndWrite.process:withheld#0"),
         "withheld", reason="could not be covered"),
    Case("the first pass misses a face", first_pass_misses_face_1,
         (AU + "__call__:add_error#0", AU + "__call__:destroy_box#0"), "written", masked=(2,),
         reason="missed by the first detection pass"),
    Case("the audit fails", audit_fails, (AU + "__call__:except#0", M + "MergeAndWrite.process:withheld#0"),
         "withheld", reason="output audit failed"),
    Case("a missed face cannot be destroyed", audit_face_cannot_be_destroyed,
         (AU + "__call__:except#1", M + "MergeAndWrite.process:withheld#0"), "withheld", reason="could not be anonymized"),
    Case("no anonymized crop", crop_lost_on_face_1, (C + "apply_faces:add_error#1", C + "apply_faces:destroy_box#0"),
         "written", masked=(1,), reason="no anonymized crop"),
    Case("paste-back and fallback fail", paste_and_fallback_fail,
         (C + "apply_faces:except#1", M + "MergeAndWrite.process:withheld#0"), "withheld", reason="could not be anonymized"),
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
         (S + "__call__:withheld#0", M + "MergeAndWrite.process:withheld#1"), "withheld", extra=WEAK,
         reason="still re-identified in the written image"),
    Case("report recognizer fails", report_recognizer_fails, (S + "_signals:except#0",), "written",
         reason="report recognizer failed"),
    Case("utility signals fail", utility_fails, (S + "_signals:except#1",), "written", reason="utility signals failed"),
    Case("write fails", write_fails, (M + "MergeAndWrite.process:except#0", M + "MergeAndWrite.process:error#0"),
         "withheld", reason="write failed: OSError"),
    Case("encoding fails", encode_fails, (M + "MergeAndWrite.process:except#0",), "withheld",
         reason="write failed: ValueError"),
    Case("merge stage bug", merge_stage_bug, (M + "MergeAndWrite.__call__:except#0", M + "MergeAndWrite.__call__:error#0"),
         "withheld", reason="merge stage failed: KeyError"),
    Case("earlier output cannot be deleted", detector_and_stale_delete_fail, (M + "remove_stale_outputs:except#0",),
         "delete_reported", reason="could not be deleted: PermissionError"),
]
