"""A tiny random-weight model set of the real architectures, for tests and smoke runs (no downloads).

``make_tiny(out_dir)`` writes
- ``sdxl/``: a diffusers StableDiffusionXLPipeline folder (UNet with text_time embedding, 2-block VAE, CLIP text
  encoders and tokenizers, sde-dpmsolver++ scheduler); UNet sample_size 64 latents = 128 px crops;
- ``ip-adapter/ip-adapter-faceid_sdxl.bin``: a FaceID adapter in the layout of ``ip-adapter-faceid_sdxl.bin``;
- ``arcface/w600k_r50.onnx``: an ArcFace-shaped ONNX (``data`` N x 3 x 112 x 112 -> N x 512).
Deterministic (fixed seeds).
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import numpy as np
import torch

CROSS_DIM = 64
TEXT_DIM = 32
ID_DIM = 512
NUM_TOKENS = 4

SCHEDULER_CONFIG = dict(
    algorithm_type="sde-dpmsolver++", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
    dynamic_thresholding_ratio=0.995, euler_at_final=False, final_sigmas_type="zero", lambda_min_clipped=-float("inf"),
    lower_order_final=True, num_train_timesteps=1000, prediction_type="epsilon", rescale_betas_zero_snr=False,
    sample_max_value=1.0, solver_order=2, solver_type="midpoint", steps_offset=1, thresholding=False,
    timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False, use_lu_lambdas=False, variance_type=None,
)


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for ch in string.ascii_lowercase + string.digits:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    _write_tokenizer_files(tmp)
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "!", "model_max_length": 77,
    }))
    return CLIPTokenizer.from_pretrained(str(tmp))


def _text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=TEXT_DIM, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=1000, projection_dim=TEXT_DIM,
        hidden_act="gelu", max_position_embeddings=77,
    )


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM, cross_attention_dim=CROSS_DIM, norm_num_groups=32,
    )


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, sample_size=128,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, force_upcast=True, scaling_factor=0.18215,
    )


def make_adapter_state_dict(unet, seed: int = 3) -> dict:
    """Random FaceID adapter for ``unet``: {"image_proj": proj.0/proj.2/norm, "ip_adapter": N.to_k_ip/to_v_ip}."""
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g) / i**0.5

    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.0.weight": lin(2 * ID_DIM, ID_DIM),
        "proj.0.bias": 0.1 * torch.randn(2 * ID_DIM, generator=g),
        "proj.2.weight": lin(NUM_TOKENS * cross, 2 * ID_DIM),
        "proj.2.bias": 0.1 * torch.randn(NUM_TOKENS * cross, generator=g),
        "norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
        "norm.bias": 0.1 * torch.randn(cross, generator=g),
    }
    ip_adapter = {}
    key_id = 1
    modules = dict(unet.named_modules())
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = modules[name[: -len(".processor")]]
        out_dim = attn.to_k.weight.shape[0]
        ip_adapter[f"{key_id}.to_k_ip.weight"] = lin(out_dim, cross)
        ip_adapter[f"{key_id}.to_v_ip.weight"] = lin(out_dim, cross)
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def make_arcface_onnx(path: Path, seed: int = 4) -> Path:
    """ArcFace-shaped ONNX: input ``data`` [N, 3, 112, 112] float32 -> ``fc1`` [N, 512]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w_conv = (rng.standard_normal((8, 3, 8, 8)) / 14).astype(np.float32)
    w_fc = (rng.standard_normal((8 * 14 * 14, ID_DIM)) / 40).astype(np.float32)
    b_fc = (0.01 * rng.standard_normal(ID_DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["data", "conv_w"], ["c"], name="conv0", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"], name="relu0"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten0", axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["fc1"], name="gemm0"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", ID_DIM])],
        initializer=[numpy_helper.from_array(w_conv, "conv_w"), numpy_helper.from_array(w_fc, "fc_w"),
                     numpy_helper.from_array(b_fc, "fc_b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="rp_distributed.tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_tiny(out_dir) -> dict[str, Path]:
    """Write the tiny SDXL, FaceID adapter and ArcFace into ``out_dir``; return their paths."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet, vae = _unet(), _vae()
    torch.manual_seed(2)
    te1 = CLIPTextModel(_text_config())
    te2 = CLIPTextModelWithProjection(_text_config())
    tok_dir = out / "_tokenizer_src"
    tok = _tokenizer(tok_dir)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    sdxl = out / "sdxl"
    pipe.save_pretrained(str(sdxl), safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # slow-tokenizer files too, for older transformers
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tok_dir / name, sdxl / sub / name)
    shutil.rmtree(tok_dir)

    adapter = out / "ip-adapter" / "ip-adapter-faceid_sdxl.bin"
    adapter.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_adapter_state_dict(unet), str(adapter))
    arcface = make_arcface_onnx(out / "arcface" / "w600k_r50.onnx")
    return {"model": sdxl, "ip_adapter": adapter.parent, "ip_adapter_file": adapter,
            "ip_adapter_weight_name": adapter.name, "arcface": arcface}
