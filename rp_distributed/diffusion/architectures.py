"""Architectures of the random-weight model sets (``tiny.make_random_model``): the tiny one tests run and the
full-size SDXL base 1.0 one the GPU check runs. Plain data, no torch.

``SDXL`` is stabilityai/stable-diffusion-xl-base-1.0's configuration (unet/, vae/, text_encoder/,
text_encoder_2/ config.json): UNet 2,567,463,684 parameters, VAE 83,653,863, CLIP ViT-L text encoder
123,060,480, OpenCLIP bigG text encoder with projection 694,659,840 (``tests/test_gpu_check.py`` counts them
on the meta device). The FaceID adapter is shaped from the UNet (``tiny.make_adapter_state_dict``): 512-d
identity -> 1024 -> 4 tokens of the UNet's cross-attention width, and to_k_ip/to_v_ip for each of its
cross-attention layers (70 in SDXL).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ID_DIM = 512  # ArcFace embedding
NUM_TOKENS = 4  # FaceID identity tokens


@dataclass(frozen=True)
class Architecture:
    name: str
    unet: dict
    vae: dict
    text_encoder: dict  # transformers CLIPTextConfig kwargs (CLIPTextModel)
    text_encoder_2: dict  # CLIPTextConfig kwargs (CLIPTextModelWithProjection)
    face_size: int  # the UNet's native crop side in pixels
    seeds: dict = field(default_factory=lambda: {"unet": 0, "vae": 1, "text": 2, "adapter": 3})


_TINY_TEXT = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
                  layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=1000, projection_dim=32,
                  hidden_act="gelu", max_position_embeddings=77)

TINY = Architecture(
    name="tiny",
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
              transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
              cross_attention_dim=64, norm_num_groups=32),
    vae=dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, sample_size=128,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             norm_num_groups=32, force_upcast=True, scaling_factor=0.18215),
    text_encoder=_TINY_TEXT,
    text_encoder_2=_TINY_TEXT,
    face_size=128,
)

_CLIP_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=49408, max_position_embeddings=77,
                 layer_norm_eps=1e-5)

SDXL = Architecture(
    name="sdxl",
    unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
              addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816, use_linear_projection=True, norm_num_groups=32),
    vae=dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), latent_channels=4,
             layers_per_block=2, sample_size=1024, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, force_upcast=True,
             scaling_factor=0.13025),
    text_encoder=dict(_CLIP_IDS, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                      num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768),
    text_encoder_2=dict(_CLIP_IDS, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                        num_hidden_layers=32, hidden_act="gelu", projection_dim=1280),
    face_size=1024,
)

ARCHITECTURES = {a.name: a for a in (TINY, SDXL)}
