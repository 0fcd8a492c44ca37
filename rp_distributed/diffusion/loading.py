"""Resolve and validate the diffusion stage's model sources.

A source is one of
- an fsspec URI (``s3://``, ``gs://``, ``file://``, any ``scheme://``): synced once per node into
  ``cache_dir/<sha256(uri)[:16]>`` under a file lock, with a completed-marker so a half-synced copy is redone
  (``modelstore.sync_uri``). Storage options come from the environment (for S3: ``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``, ..., which botocore reads itself);
- a local path (absolute, ``~``, ``./`` or any existing path);
- a Hugging Face hub id (``owner/name``), resolved by diffusers / huggingface_hub at ``model_revision`` /
  ``ip_adapter_revision`` (unpinned when unset).

With ``lock_file`` set (a tree written by ``rp-anonymize models pull``), every source must lie in that tree: the
node copies the files the lock lists into ``cache_dir/lock-<lock digest>/``, checks size and sha256 of each,
and loads from there (``modelstore.sync_locked``); the config's revisions and variant must be the lock's.

Everything is checked at start-up; errors are ``ModelSourceError`` naming what is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..model_sources import model_lock, resolve_local, source_kind  # noqa: F401 (re-exported)
from ..modelstore import LockedModels, ModelSourceError, sync_locked, sync_uri  # noqa: F401 (re-exported)
from .sdxl_files import SDXL_COMPONENTS, WEIGHT_COMPONENTS, weight_name_regex

ADAPTER_IMAGE_PROJ_KEYS = ("proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias")
ADAPTER_EXTENSIONS = (".bin", ".safetensors", ".pt", ".pth")


# --------------------------------------------------------------------------- SDXL folder


def validate_sdxl_folder(path: Path, source: str | None = None, variant: str | None = None) -> None:
    """Raise ``ModelSourceError`` unless ``path`` is a diffusers SDXL folder with weights (of ``variant``)."""
    name = source or str(path)
    if not path.exists():
        raise ModelSourceError(f"diffusion.model: model folder {name} does not exist")
    if not path.is_dir():
        raise ModelSourceError(f"diffusion.model: {name} is not a folder (expected a diffusers SDXL folder)")
    missing = [c for c in ("model_index.json",) if not (path / c).is_file()]
    missing += [c + "/" for c in SDXL_COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelSourceError(f"diffusion.model: model folder {name} is incomplete, missing: {', '.join(missing)}")
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        d = path / comp
        if not (d / "config.json").is_file():
            raise ModelSourceError(f"diffusion.model: {name}: {comp}/config.json is missing")
        if not any(d.glob("*.safetensors")) and not any(d.glob("*.safetensors.index.json")):
            raise ModelSourceError(f"diffusion.model: {name}: no .safetensors weights in {comp}/")
        if variant:
            rx = weight_name_regex(WEIGHT_COMPONENTS[comp], variant)
            if not any(rx.match(f.name) and f.suffix == ".safetensors" for f in d.iterdir()):
                raise ModelSourceError(
                    f"diffusion.model: {name}: no {variant} variant weights in {comp}/ (diffusion.variant={variant} "
                    f"loads {WEIGHT_COMPONENTS[comp]}.{variant}.safetensors; set diffusion.variant: null for the plain "
                    "files)")


def resolve_model(src: str, cache_dir: str, variant: str | None = None, locked: LockedModels | None = None) -> str:
    """Local folder (validated) for a path or URI; the hub id itself for a hub id."""
    kind = source_kind(src)
    if kind == "hub" and locked is None:
        return src
    path = resolve_local(src, cache_dir, locked, "diffusion.model")
    validate_sdxl_folder(path, source=src, variant=variant)
    return str(path)


# --------------------------------------------------------------------------- IP-Adapter


def resolve_adapter_file(src: str, weight_name: str, cache_dir: str, revision: str | None = None,
                         locked: LockedModels | None = None) -> Path:
    """Local path of the adapter weights file. ``src`` is a folder/repo holding ``weight_name`` or the file."""
    kind = source_kind(src)
    direct = src.rstrip("/").endswith(ADAPTER_EXTENSIONS)
    if locked is not None:
        path = locked.local(src if direct else src.rstrip("/") + "/" + weight_name, "diffusion.ip_adapter")
        if not path.is_file():
            raise ModelSourceError(f"diffusion.ip_adapter: adapter file missing: {path}")
        return path
    if kind == "hub":
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(src, weight_name, revision=revision))
        except Exception as exc:
            raise ModelSourceError(
                f"diffusion.ip_adapter: cannot fetch {weight_name} from hub repo {src} ({type(exc).__name__}: {exc}); "
                "offline nodes need a local folder or a storage URI"
            ) from exc
    if kind == "uri":
        uri = src if direct else src.rstrip("/") + "/" + weight_name
        try:
            return sync_uri(uri, cache_dir)
        except ModelSourceError as exc:
            raise ModelSourceError(f"diffusion.ip_adapter: adapter file missing: {exc}") from exc
        except FileNotFoundError as exc:
            raise ModelSourceError(f"diffusion.ip_adapter: adapter file missing: {uri}") from exc
    path = Path(os.path.expanduser(src))
    if path.is_dir():
        path = path / weight_name
    if not path.is_file():
        raise ModelSourceError(f"diffusion.ip_adapter: adapter file missing: {path}")
    return path


def load_adapter_state_dict(path: Path, device: torch.device | str = "cpu") -> dict:
    """Read adapter weights safely (safetensors, or torch.load with weights_only=True) onto ``device`` as
    ``{"image_proj": {...}, "ip_adapter": {...}}``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path), device=str(device))
            sd: dict = {"image_proj": {}, "ip_adapter": {}}
            for k, v in flat.items():
                head, _, rest = k.partition(".")
                if head in sd:
                    sd[head][rest] = v
                else:
                    sd.setdefault(head, {})[rest] = v
        else:
            sd = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:
        raise ModelSourceError(f"diffusion.ip_adapter: cannot read adapter weights {path}: {exc}") from exc
    return sd


def validate_adapter_state_dict(sd, source: str, cross_attention_dim: int | None = None,
                                n_cross_attn_layers: int | None = None, id_dim: int = 512) -> None:
    """Check the IP-Adapter-FaceID layout (``image_proj``: proj.0/proj.2/norm, ``ip_adapter``: to_k_ip/to_v_ip),
    and, when given, that it fits the UNet."""
    where = f"diffusion.ip_adapter: {source}"
    if not isinstance(sd, dict) or "image_proj" not in sd or "ip_adapter" not in sd:
        keys = sorted(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
        raise ModelSourceError(f"{where} is not an IP-Adapter-FaceID file: needs 'image_proj' and 'ip_adapter' "
                               f"sections, found {keys}")
    proj, ip = sd["image_proj"], sd["ip_adapter"]
    missing = [k for k in ADAPTER_IMAGE_PROJ_KEYS if k not in proj]
    if missing:
        raise ModelSourceError(f"{where}: image_proj lacks {', '.join(missing)} (FaceID layout: proj.0, proj.2, norm)")
    kv = [k for k in ip if k.endswith((".to_k_ip.weight", ".to_v_ip.weight"))]
    if not kv:
        raise ModelSourceError(f"{where}: ip_adapter has no to_k_ip/to_v_ip weights")
    if proj["proj.0.weight"].shape[1] != id_dim:
        raise ModelSourceError(f"{where}: image_proj.proj.0 takes {proj['proj.0.weight'].shape[1]}-d input, "
                               f"identity embeddings are {id_dim}-d")
    dim = proj["norm.weight"].shape[0]
    if cross_attention_dim is not None and dim != cross_attention_dim:
        raise ModelSourceError(f"{where}: adapter tokens are {dim}-d but the UNet's cross_attention_dim is "
                               f"{cross_attention_dim} (adapter for another base model?)")
    if n_cross_attn_layers is not None:
        need = [f"{2 * i + 1}.{w}.weight" for i in range(n_cross_attn_layers) for w in ("to_k_ip", "to_v_ip")]
        absent = [k for k in need if k not in ip]
        if absent or len(kv) != len(need):
            raise ModelSourceError(f"{where}: ip_adapter has {len(kv) // 2} layers, the UNet has "
                                   f"{n_cross_attn_layers} cross-attention layers (missing e.g. {absent[:2]})")


# --------------------------------------------------------------------------- parameters, device


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device_dtype(cfg) -> tuple[torch.device, torch.dtype]:
    """auto: cuda + float16 when CUDA is available, else cpu + float32."""
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not cuda:
        raise ValueError("diffusion.device=cuda but CUDA is not available")
    if cfg.dtype == "auto":
        dtype = torch.float16 if device == "cuda" else torch.float32
    else:
        dtype = _DTYPES[cfg.dtype]
    return torch.device(device), dtype
