"""ArcFace identity embeddings (insightface ``buffalo_l`` recognizer, ``w600k_r50.onnx``) through onnxruntime:
the conditioning identity of reverse personalization (made on the CPU detection actors) and the report's
second recognizer. No torch here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..model_sources import model_lock, resolve_local, source_kind
from ..modelstore import LockedModels, ModelSourceError


def resolve_arcface(src: str, cache_dir: str, locked: LockedModels | None = None) -> Path:
    """The local ONNX file of ``src`` (a file or a URI synced once per node; with ``locked``, the pulled tree's
    verified copy)."""
    if locked is not None:
        path = locked.local(src, "diffusion.arcface")
    else:
        path = resolve_local(src, cache_dir) if source_kind(src) == "uri" else Path(os.path.expanduser(src))
    if not path.is_file():
        raise ModelSourceError(f"diffusion.arcface: ArcFace ONNX file {src} does not exist")
    return path


class IdentityEmbedder:
    """``embed(crop, kps)``: the 512-d L2-normalised ArcFace embedding (insightface ``normed_embedding``)."""

    def __init__(self, model_file, providers=("CPUExecutionProvider",)):
        from insightface.model_zoo import get_model

        from .onnx_threads import session_options

        try:
            model = get_model(str(model_file), providers=list(providers), sess_options=session_options())
        except Exception as exc:
            raise ModelSourceError(f"diffusion.arcface: cannot load {model_file}: {exc}") from exc
        if model is None or getattr(model, "taskname", None) != "recognition":
            raise ModelSourceError(f"diffusion.arcface: {model_file} is not an ArcFace recognition model "
                                   "(expects N x 3 x 112 x 112 input)")
        self.model = model
        self.input_size = int(model.input_size[0])
        self.model_file = str(model_file)

    @classmethod
    def from_config(cls, cfg) -> "IdentityEmbedder":
        return cls(resolve_arcface(cfg.arcface, cfg.cache_dir, model_lock(cfg)), cfg.arcface_providers)

    def embed_many(self, crops_rgb: list[np.ndarray], kps: list[np.ndarray]) -> np.ndarray:
        """[N, 512] float32. ``kps``: 5 landmarks (insightface order) in each crop's pixel coordinates."""
        from insightface.utils.face_align import norm_crop

        if len(crops_rgb) != len(kps):
            raise ValueError(f"{len(crops_rgb)} crops but {len(kps)} landmark sets")
        if not crops_rgb:
            return np.zeros((0, 512), np.float32)
        aligned = []
        for img, k in zip(crops_rgb, kps):
            img = np.asarray(img)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"crops must be HxWx3 uint8 RGB, got {img.shape} {img.dtype}")
            k = np.asarray(k, dtype=np.float32).reshape(5, 2)
            bgr = np.ascontiguousarray(img[:, :, ::-1])  # insightface works in BGR
            aligned.append(norm_crop(bgr, k, image_size=self.input_size))
        feats = np.asarray(self.model.get_feat(aligned), dtype=np.float32).reshape(len(aligned), -1)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        return (feats / np.maximum(norms, 1e-12)).astype(np.float32)

    def embed(self, crop_rgb: np.ndarray, kps5: np.ndarray) -> np.ndarray:
        """np.float32[512], unit norm."""
        return self.embed_many([crop_rgb], [kps5])[0]
