"""The ONNX models run on the threads their process was granted. onnxruntime's own default is a thread per core:
on a 64-core node each detection actor granted half a CPU would run 64, and so would every neighbour."""

from __future__ import annotations

import pytest

from rp_distributed.diffusion.arcface_onnx import make_arcface_onnx
from rp_distributed.faces.arcface import IdentityEmbedder
from rp_distributed.faces.centerface_backend import load_session, resolve_model_file


@pytest.mark.parametrize("granted", ["1", "3"])
def test_sessions_take_the_threads_ray_granted(monkeypatch, tmp_path, granted):
    monkeypatch.setenv("OMP_NUM_THREADS", granted)  # what Ray sets in a worker: the actor's whole CPUs, at least 1
    centerface = load_session(resolve_model_file(None), ["CPUExecutionProvider"])
    arcface = IdentityEmbedder(make_arcface_onnx(tmp_path / "w600k_r50.onnx")).model.session
    for session in (centerface, arcface):
        options = session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (int(granted), 1)


def test_a_plain_process_keeps_onnxruntimes_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert load_session(resolve_model_file(None), ["CPUExecutionProvider"]).get_session_options().intra_op_num_threads == 0
