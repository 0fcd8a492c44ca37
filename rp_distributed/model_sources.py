"""Where a model comes from, without loading it (no torch here: CPU actors, the driver and ``models pull``
use it): a hub id, a local path, or an fsspec URI synced once per node; with a config's ``lock_file``, the
node's verified copy of a tree written by ``rp-anonymize models pull``."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from .modelstore import LockedModels, ModelSourceError, is_uri, sync_locked, sync_uri

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def source_kind(src: str) -> str:
    """'uri', 'local' or 'hub'."""
    if is_uri(src):
        return "uri"
    expanded = os.path.expanduser(src)
    if src.startswith(("/", "~", ".")) or os.path.exists(expanded) or not HUB_ID.match(src):
        return "local"
    return "hub"


def resolve_local(src: str, cache_dir: str | os.PathLike, locked: LockedModels | None = None,
                  key: str = "model source") -> Path:
    """A URI (synced) or a local path (expanded); with ``locked``, the verified copy of a source in the pulled
    tree. Hub ids are not handled here."""
    if locked is not None:
        return locked.local(src, key)
    if source_kind(src) == "uri":
        return sync_uri(src, cache_dir)
    return Path(os.path.expanduser(src))


def model_lock(cfg) -> LockedModels | None:
    """The node's verified copy of ``cfg.lock_file`` (a ``DiffusionConfig``; synced and checked once per node),
    or None without one. The config's revisions and variant must be the ones the lock records."""
    lock_file = getattr(cfg, "lock_file", None)
    if not lock_file:
        return None
    locked = sync_locked(lock_file, cfg.cache_dir)
    locked.check_pin(cfg.model, "diffusion.model", "diffusion.model_revision", cfg.model_revision,
                     cfg.variant, check_variant=True)
    locked.check_pin(cfg.ip_adapter, "diffusion.ip_adapter", "diffusion.ip_adapter_revision", cfg.ip_adapter_revision)
    return locked


def local_folder(model_dir: str | None, lock_file: str | None, cache_dir: str, key: str) -> str | None:
    """``model_dir`` as a local folder on this node: through the lock file when one is set (checked, sha256),
    synced when a URI, as given otherwise (None: the backend's default)."""
    if lock_file:
        if not model_dir:
            raise ModelSourceError(f"{key.rsplit('.', 1)[0]}.lock_file is set but {key} is not: name the folder in "
                                   "the pulled tree (`rp-anonymize models pull` prints it)")
        return str(sync_locked(lock_file, cache_dir).local(model_dir, key))
    if model_dir and "://" in model_dir:
        return str(sync_uri(model_dir, cache_dir))
    return model_dir


def installed_path(package: str, rel: str) -> Path | None:
    """A file or folder shipped inside an installed package (``rel`` below it), found without importing the
    package; None when the package is not installed or does not hold it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / rel).exists():
            return Path(loc) / rel
    return None
