"""Which files of a diffusers SDXL repository the pipeline loads (no torch: ``models pull`` uses this).

``StableDiffusionXLPipeline.from_pretrained(..., variant=V, use_safetensors=True)`` reads ``model_index.json``,
``scheduler/``, ``tokenizer/``, ``tokenizer_2/``, and in ``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/`` the ``config.json`` and the safetensors weights of variant V, named as diffusers and
transformers name them (``_add_variant``): ``diffusion_pytorch_model.fp16.safetensors``, ``model.fp16.safetensors``,
shards ``model.fp16-00001-of-00002.safetensors`` (older: ``model-00001-of-00002.fp16.safetensors``) with their
index ``model.safetensors.index.fp16.json``. Without a variant: the same names without it. Everything else in the
repository (float32 weights when V is fp16, ``.bin``/``.ckpt``/ONNX/OpenVINO exports, ``vae_1_0/``, the refiner
bits, sample images) is left out.
"""

from __future__ import annotations

import re

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
WEIGHT_COMPONENTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                     "text_encoder": "model", "text_encoder_2": "model"}
FOLDER_COMPONENTS = ("tokenizer", "tokenizer_2", "scheduler")  # every file in them (small text files)


def weight_name_regex(base: str, variant: str | None) -> re.Pattern:
    b = re.escape(base)
    if variant:
        v = re.escape(variant)
        alts = [rf"{b}\.{v}\.safetensors", rf"{b}\.{v}-\d+-of-\d+\.safetensors", rf"{b}-\d+-of-\d+\.{v}\.safetensors",
                rf"{b}\.safetensors\.index\.{v}\.json"]
    else:
        alts = [rf"{b}\.safetensors", rf"{b}-\d+-of-\d+\.safetensors", rf"{b}\.safetensors\.index\.json"]
    return re.compile("^(?:" + "|".join(alts) + ")$")


def is_weights_file(name: str) -> bool:
    """A safetensors weights file or index (not its JSON index)."""
    return name.endswith(".safetensors")


def wanted(rel: str, variant: str | None) -> bool:
    """Whether the file at ``rel`` (relative to the SDXL folder, '/'-separated) is one the pipeline loads."""
    if rel == "model_index.json":
        return True
    parts = rel.split("/")
    if len(parts) != 2:
        return False
    comp, name = parts
    if comp in FOLDER_COMPONENTS:
        return not name.startswith(".")
    if comp in WEIGHT_COMPONENTS:
        return name == "config.json" or bool(weight_name_regex(WEIGHT_COMPONENTS[comp], variant).match(name))
    return False


def select(rels, variant: str | None) -> list[str]:
    return sorted(r for r in rels if wanted(r, variant))


def missing(rels, variant: str | None) -> list[str]:
    """What a selection lacks to be loadable: model_index.json, each component's config and weights."""
    rels = set(rels)
    out = [] if "model_index.json" in rels else ["model_index.json"]
    for comp in FOLDER_COMPONENTS:
        if not any(r.startswith(comp + "/") for r in rels):
            out.append(comp + "/")
    for comp, base in WEIGHT_COMPONENTS.items():
        if comp + "/config.json" not in rels:
            out.append(comp + "/config.json")
        rx = weight_name_regex(base, variant)
        if not any(r.startswith(comp + "/") and rx.match(r[len(comp) + 1:]) and is_weights_file(r) for r in rels):
            what = f"{variant} variant weights" if variant else "safetensors weights"
            out.append(f"{comp}/ {what} ({base}{'.' + variant if variant else ''}.safetensors)")
    return out


def allow_patterns(variant: str | None) -> list[str]:
    """Globs for ``huggingface_hub.snapshot_download``: a superset of ``select`` (which filters the result)."""
    pats = ["model_index.json"] + [f"{c}/*" for c in FOLDER_COMPONENTS]
    for comp, base in WEIGHT_COMPONENTS.items():
        pats.append(f"{comp}/config.json")
        if variant:
            pats += [f"{comp}/{base}.{variant}.safetensors", f"{comp}/{base}.{variant}-*-of-*.safetensors",
                     f"{comp}/{base}-*-of-*.{variant}.safetensors", f"{comp}/{base}.safetensors.index.{variant}.json"]
        else:
            pats += [f"{comp}/{base}.safetensors", f"{comp}/{base}-*-of-*.safetensors",
                     f"{comp}/{base}.safetensors.index.json"]
    return pats
