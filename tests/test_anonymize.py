"""The anonymizer stage with reverse personalization (tiny model): escalation ladder, fail closed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rp_distributed.anonymizer import Anonymizer
from rp_distributed.config import load_config
from rp_distributed.faults import DeviceFault, is_device_fault
from rp_distributed.records import ImageRow
from rp_distributed.stages.detect import DetectFaces
from tests.conftest import FAST_DETECTION

STEPS = 4  # the ladder, pooling and fallbacks are logic over generations: the least the tiny model needs


def _rp_cfg(tiny_dir, *extra):
    return load_config(None, [*FAST_DETECTION, 
        "anonymizer.method=reverse_personalization", f"diffusion.model={tiny_dir}/sdxl",
        f"diffusion.ip_adapter={tiny_dir}/ip-adapter", f"diffusion.arcface={tiny_dir}/arcface/w600k_r50.onnx",
        "diffusion.device=cpu", "diffusion.dtype=float32", f"diffusion.num_inversion_steps={STEPS}",
        "alignment.face_size=64", "anonymizer.face_batch_size=3", "output.format=png", *extra])


@pytest.fixture(scope="module")
def t1_faces(tiny_dir, t1_path):
    """Real face records of t1.jpg (detected and aligned by the pipeline's own first stage)."""
    row = DetectFaces.from_config(_rp_cfg(tiny_dir)).process(ImageRow.of({"input_uri": str(t1_path), "rel_path": "t1.jpg", "output_uri": "x"}))
    assert row.pending and len(row.payload.faces) == 6
    return row.payload.faces


def _fresh(faces, n=3):
    return [dataclasses.replace(f) for f in faces[:n]]


def test_escalation_runs_every_rung_then_falls_back(tiny_dir, t1_faces):
    # A threshold no distance can pass: every face is "re-identified" after every try.
    cfg = _rp_cfg(tiny_dir, "privacy.reid_threshold=5.0", "privacy.guidance_ladder=[-14.0, -18.0]",
                  "privacy.max_tries=3", "anonymizer.fallback=pixelate")
    faces = _fresh(t1_faces)
    Anonymizer.from_config(cfg)(faces)
    for f in faces:
        assert [t.guidance for t in f.tries] == [-10.0, -14.0, -18.0]
        assert all(t.reid_distance is not None and t.reid_distance < 5.0 for t in f.tries)
        assert len(f.tries) == 3 and f.guidance_final == -18.0
        assert f.unet_evals == 4 * STEPS * 3  # an inversion and a generation per rung
        assert str(f.method_applied) == "pixelate" and "still re-identified after 3 tries" in f.face_error
        # Every rung produced a different face: guidance changes the output.
    dists = [[t.reid_distance for t in f.tries] for f in faces]
    assert all(len(set(d)) == 3 for d in dists)


def test_an_escalated_face_equals_a_fresh_run_at_the_rung_guidance(tiny_dir, t1_faces):
    """A rung at g' is the method at g' (ALGORITHM.md): re-inverted at g', not regenerated from g's noise."""
    rung = _rp_cfg(tiny_dir, "privacy.reid_threshold=5.0", "privacy.guidance_ladder=[-14.0]", "privacy.max_tries=2",
                   "privacy.fallback_if_reidentified=false")  # keep the last rung's crop
    escalated = _fresh(t1_faces, 2)
    Anonymizer.from_config(rung)(escalated)
    fresh = _fresh(t1_faces, 2)
    Anonymizer.from_config(_rp_cfg(tiny_dir, "diffusion.guidance_scale=-14.0", "privacy.escalate=false",
                       "privacy.guidance_ladder=[-15.0, -20.0]"))(fresh)
    reused = _fresh(t1_faces, 2)  # what the old escalation did: -10's inversion regenerated at -14
    a = Anonymizer.from_config(_rp_cfg(tiny_dir, "privacy.escalate=false"))
    ids = np.stack([a.method.embedder.embed(f.crop, f.kps5) for f in reused])
    inv = a.method.rp.invert([f.crop for f in reused], [f.seed for f in reused])
    old = a.method.rp.generate(inv, ids, None, [-14.0, -14.0])
    for f, g, o in zip(escalated, fresh, old):
        assert len(f.tries) == 2 and f.guidance_final == -14.0 and f.unet_evals == 8 * STEPS
        assert np.abs(f.anon_crop.astype(int) - g.anon_crop.astype(int)).max() <= 1
        assert np.abs(f.anon_crop.astype(int) - o.astype(int)).mean() > 1  # a different function


def test_escalation_pools_the_re_identified_faces_of_all_chunks(tiny_dir, t1_faces):
    """Issue 13: the faces still re-identified after a rung are pooled across chunks, so the next rung runs
    full chunks (here one chunk of 2, not two chunks of 1), and the re-ID checks of a rung are all gathered
    before the next one starts."""
    anonymizer = Anonymizer.from_config(_rp_cfg(tiny_dir, "privacy.guidance_ladder=[-14.0]", "privacy.max_tries=2"))
    order = []

    def distance(original, anonymized):  # injected: the 1st and 5th face checked on rung 0 are re-identified
        order.append(len(order))
        return 0.1 if len(order) in (1, 5) else 1.0

    calls = []
    generate = anonymizer.method.rp.generate

    def counted(inv, *args, **kwargs):
        calls.append(len(inv))
        return generate(inv, *args, **kwargs)

    anonymizer.method.scorer.distance = distance
    anonymizer.method.rp.generate = counted
    faces = _fresh(t1_faces, 6)
    anonymizer(faces)
    assert calls == [3, 3, 2]
    assert [len(f.tries) for f in faces] == [2, 1, 1, 1, 2, 1]
    assert [f.guidance_final for f in faces] == [-14.0, -10.0, -10.0, -10.0, -14.0, -10.0]
    assert all(str(f.method_applied) == "reverse_personalization" and f.face_error is None for f in faces)


def test_escalation_stops_at_the_first_rung_that_passes(tiny_dir, t1_faces):
    cfg = _rp_cfg(tiny_dir, "privacy.reid_threshold=0.0001")  # nothing is re-identified
    faces = _fresh(t1_faces)
    Anonymizer.from_config(cfg)(faces)
    for f in faces:
        assert len(f.tries) == 1 and f.guidance_final == -10.0 and f.face_error is None
        assert str(f.method_applied) == "reverse_personalization"
        assert f.anon_crop.shape == f.crop.shape and np.abs(
            f.anon_crop.astype(int) - f.crop.astype(int)).mean() > 5


def test_stage_output_is_independent_of_the_batch(tiny_dir, t1_faces):
    cfg = _rp_cfg(tiny_dir, "privacy.escalate=false")
    anonymizer = Anonymizer.from_config(cfg)
    together = _fresh(t1_faces, 3)
    anonymizer(together)
    alone = [_fresh(t1_faces[i:i + 1], 1) for i in range(3)]
    for one in alone:
        anonymizer(one)
    for f, (g,) in zip(together, alone):
        assert np.abs(f.anon_crop.astype(int) - g.anon_crop.astype(int)).max() <= 1


def test_generation_failure_falls_back_for_that_face_only(tiny_dir, t1_faces):
    cfg = _rp_cfg(tiny_dir, "privacy.escalate=false", "anonymizer.fallback=mask")
    faces = _fresh(t1_faces)
    faces[1].crop = np.ascontiguousarray(faces[1].crop[:62, :62])  # not a size the VAE can take
    Anonymizer.from_config(cfg)(faces)
    assert str(faces[1].method_applied) == "mask" and "generation failed" in faces[1].face_error
    assert faces[1].anon_crop is not None and faces[1].anon_crop.max() == 0
    for f in (faces[0], faces[2]):  # the rest of the chunk was retried one by one and succeeded
        assert str(f.method_applied) == "reverse_personalization" and f.face_error is None


def test_a_device_fault_ends_the_stage_instead_of_falling_back(tiny_dir, t1_faces):
    """A CUDA error that means the device is gone must not turn every later face into a blur."""
    anonymizer = Anonymizer.from_config(_rp_cfg(tiny_dir, "privacy.escalate=false"))

    def broken(*args, **kwargs):  # injected: what torch raises after an illegal memory access
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    anonymizer.method.rp.generate = broken
    faces = _fresh(t1_faces)
    with pytest.raises(DeviceFault, match="illegal memory access"):
        anonymizer(faces)
    assert not any(str(f.method_applied) == "blur" for f in faces)


def test_a_device_fault_outside_the_chunk_also_ends_the_stage(tiny_dir, t1_faces):
    """A CUDA error raised off the chunk's own path (here: the noise handed over by the background thread)
    still ends the actor instead of withholding its images as a user error."""
    anonymizer = Anonymizer.from_config(_rp_cfg(tiny_dir, "privacy.escalate=false"))

    def broken(*args, **kwargs):  # injected
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    anonymizer.method.rp.draw_noise = broken
    with pytest.raises(DeviceFault, match="illegal memory access"):
        anonymizer(_fresh(t1_faces))


def test_out_of_memory_keeps_the_one_by_one_retry(tiny_dir, t1_faces):
    import torch

    anonymizer = Anonymizer.from_config(_rp_cfg(tiny_dir, "privacy.escalate=false"))
    generate = anonymizer.method.rp.generate

    def small_memory(inv, *args, **kwargs):  # injected: a batch of several faces does not fit
        if len(inv) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate(inv, *args, **kwargs)

    anonymizer.method.rp.generate = small_memory
    faces = _fresh(t1_faces)
    anonymizer(faces)
    assert all(str(f.method_applied) == "reverse_personalization" and not f.face_error for f in faces)


@pytest.mark.parametrize("message,fatal", [
    ("CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`", True),
    ("CUDA failure 700: an illegal memory access was encountered ; GPU=0", True),  # onnxruntime
    ("CUDA error: uncorrectable ECC error encountered", True),
    ("CUDA out of memory. Tried to allocate 20.00 MiB", False),
    ("CUDA error: out of memory", False),
    ("crops must be HxWx3 with H, W multiples of 8", False),
])
def test_device_fault_classification(message, fatal):
    assert is_device_fault(RuntimeError(message)) is fatal


# What onnxruntime's CUDA provider raises (its Fail type) when the device is gone, on a model exported with scoped
# node names: the CUDA status comes after more than 500 characters.
_NODE = "/".join(f"stage{i}/block{j}/conv{k}" for i in range(3) for j in range(3) for k in range(2))
ORT_DEVICE_FAULT = (
    f"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running FusedConv node. "
    f"Name:'/{_NODE}/Conv_output_0' Status Message: CUDA failure 700: an illegal memory access was encountered ; "
    "GPU=0 ; hostname=node-17 ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_execution_provider.cc ; "
    "line=446 ; expr=cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));")


def test_device_faults_are_told_by_type_before_text():
    """Only the types a device error arrives as (torch's RuntimeError family, onnxruntime's errors) are read for
    CUDA markers; an error of another type is never one, whatever its text says (a path or a table cell in a
    message must not restart workers). A DeviceFault stays one, however its message was shortened."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    assert is_device_fault(Fail(ORT_DEVICE_FAULT)) and ORT_DEVICE_FAULT.lower().index("cuda failure") > 500
    assert is_device_fault(DeviceFault("device fault, this worker must restart: (cut short)"))
    for exc in (ValueError("cannot read in/CUDA error: an illegal memory access was encountered.jpg"),
                OSError("no such file: device-side assert triggered.png"), KeyError("ecc error")):
        assert not is_device_fault(exc), exc


def test_a_detector_device_fault_ends_the_detection_stage_in_aligned_mode(t1_path):
    """Aligned mode asks the detector for keypoints; a device fault there must end the worker. It was withheld
    as an ordinary failure: the DeviceFault's message, shortened to 500 characters, was matched again as text
    and no longer held the CUDA status."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    cfg = load_config(None, ["input.mode=aligned", "input.aligned_keypoints=detector"])
    stage = DetectFaces.from_config(cfg)

    def broken(rgb):  # injected: what the insightface detector raises on a lost device
        raise Fail(ORT_DEVICE_FAULT)

    stage.finder.detector.detect = broken
    with pytest.raises(DeviceFault, match="CUDA failure 700|ONNXRuntimeError"):
        stage.process(ImageRow.of({"input_uri": str(t1_path), "rel_path": "t1.jpg", "output_uri": "x", "error": None,
                       "notes": None, "stale_output_uri": None}))


def test_small_faces_get_the_destructive_method(tiny_dir, t1_path):
    cfg = _rp_cfg(tiny_dir, "detection.min_face_size=120", "privacy.escalate=false")
    # Detection decides which faces are small (t1's sides: 130 px and five of 90 to 109 px).
    row = DetectFaces.from_config(cfg).process(ImageRow.of({"input_uri": str(t1_path), "rel_path": "t1.jpg", "output_uri": "x"}))
    faces = row.payload.faces
    assert [f.small for f in faces] == [max(f.box[2] - f.box[0], f.box[3] - f.box[1]) < 120 for f in faces]
    assert 0 < sum(f.small for f in faces) < 6
    Anonymizer.from_config(cfg)(faces)
    for f in faces:
        if f.small:
            assert str(f.method_applied) == "blur" and "smaller than detection.min_face_size" in f.face_error
        else:
            assert str(f.method_applied) == "reverse_personalization"


def test_low_confidence_detections_get_the_destructive_method(tiny_dir, t1_faces):
    """A detection the ensemble marks low-confidence costs a blurred patch, never a GPU generation."""
    cfg = _rp_cfg(tiny_dir, "privacy.escalate=false")
    faces = _fresh(t1_faces, 3)
    faces[1].low_confidence = True
    Anonymizer.from_config(cfg)(faces)
    assert str(faces[1].method_applied) == "blur" and "low-confidence detection" in faces[1].face_error
    assert faces[1].unet_evals in (None, 0)
    assert [str(faces[0].method_applied), str(faces[2].method_applied)] == ["reverse_personalization"] * 2


def test_bad_model_source_fails_at_start_up(tiny_dir, tmp_path):
    from rp_distributed.diffusion import ModelSourceError

    with pytest.raises(ModelSourceError, match="does not exist"):
        Anonymizer.from_config(_rp_cfg(tiny_dir, f"diffusion.model={tmp_path}/nope"))


# The whole Ray job with this method: tests/test_report.py (rp_run: the tiny model on t1.jpg and three more inputs,
# checked face by face in test_the_run_generates_every_face_and_touches_nothing_else).
