"""Reverse personalization (SDXL + IP-Adapter-FaceID inversion with negative identity guidance).

Heavy imports (torch, diffusers, insightface) happen when a name is first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ReversePersonalizer": "reverse",
    "Inversion": "reverse",
    "inversion_timesteps": "solver",
    "make_tiny": "tiny",
    "ModelSourceError": "loading",
    "resolve_device_dtype": "loading",
    "resolve_model": "loading",
    "resolve_adapter_file": "loading",
    "load_adapter_state_dict": "loading",
    "validate_adapter_state_dict": "loading",
    "validate_sdxl_folder": "loading",
    "sync_uri": "loading",
    "sync_locked": "loading",
    "model_lock": "loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
