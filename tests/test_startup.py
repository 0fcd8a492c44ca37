"""Actor start-up: the pipeline and the FaceID adapter are read straight into their place (accelerate's empty
initialisation), not randomly initialised in real memory and then overwritten; what is loaded is exactly the
files' weights, in the target dtype."""

from __future__ import annotations

import logging

import pytest
import torch

from rp_distributed.config import DiffusionConfig
from rp_distributed.diffusion.sdxl import load_pipeline

INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                  "xavier_normal_", "ones_", "zeros_", "constant_", "orthogonal_")


def _cfg(tiny_dir, tmp_path, dtype="float32") -> DiffusionConfig:
    return DiffusionConfig(model=str(tiny_dir / "sdxl"), ip_adapter=str(tiny_dir / "ip-adapter"),
                           arcface=str(tiny_dir / "arcface" / "w600k_r50.onnx"), cache_dir=str(tmp_path / "cache"),
                           device="cpu", dtype=dtype)


@pytest.fixture
def initialised(monkeypatch) -> list[int]:
    """Elements that torch.nn.init writes into real (not meta) tensors while the test runs."""
    counts: list[int] = []
    for name in INIT_FUNCTIONS:
        original = getattr(torch.nn.init, name)

        def counted(tensor, *args, _original=original, **kwargs):
            if tensor.device.type != "meta":
                counts.append(tensor.numel())
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, counted)
    return counts


def test_loading_initialises_no_weights_in_memory(tiny_dir, tmp_path, initialised, caplog):
    """Before: without accelerate (and with the adapter loaded with low_cpu_mem_usage=False) every UNet, VAE
    and adapter layer was randomly initialised and then overwritten: twice the memory at start-up, and the
    time of initialising 2.6B parameters on the full-size model."""
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        loaded = load_pipeline(_cfg(tiny_dir, tmp_path))
    assert sum(initialised) == 0, f"{sum(initialised)} elements initialised in {len(initialised)} calls"
    assert not [r for r in caplog.records if "low_cpu_mem_usage" in r.getMessage()]
    assert loaded.pipe.unet.device.type == "cpu"


def test_loaded_weights_are_the_files(tiny_dir, tmp_path):
    """float16 straight from the float32 files: every UNet and adapter weight equals the file's, rounded once;
    the VAE stays float32 (its config asks for upcasting) with the file's exact values."""
    from safetensors.torch import load_file

    loaded = load_pipeline(_cfg(tiny_dir, tmp_path, "float16"))
    unet, vae = loaded.pipe.unet, loaded.pipe.vae
    files = load_file(str(tiny_dir / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"))
    params = dict(unet.named_parameters())
    assert files and all(params[k].dtype == torch.float16 and torch.equal(params[k], v.half()) for k, v in files.items())
    adapter = torch.load(str(tiny_dir / "ip-adapter" / "ip-adapter-faceid_sdxl.bin"), weights_only=True)
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(proj.ff.net[0].proj.weight, adapter["image_proj"]["proj.0.weight"].half())
    to_k = [m.to_k_ip[0].weight for n, m in unet.attn_processors.items() if n.endswith("attn2.processor")]
    assert torch.equal(to_k[0], adapter["ip_adapter"]["1.to_k_ip.weight"].half())
    vae_files = load_file(str(tiny_dir / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors"))
    vae_params = dict(vae.named_parameters())
    assert all(vae_params[k].dtype == torch.float32 and torch.equal(vae_params[k], v) for k, v in vae_files.items())


def test_loading_without_accelerate_is_refused(tiny_dir, tmp_path, monkeypatch):
    """Before: a node without accelerate loaded anyway, building every model before reading its weights, with
    a warning lost in the actor's log. Now the dependency is declared and its absence is a clear error."""
    from rp_distributed.diffusion import sdxl

    monkeypatch.setattr(sdxl, "has_accelerate", lambda: False, raising=False)
    with pytest.raises(RuntimeError, match="needs `accelerate`"):
        load_pipeline(_cfg(tiny_dir, tmp_path))
