"""Model files on nodes: the per-node cache, and pulled model trees checked against ``models.lock.json``.

Two ways a model source reaches a node (no torch here: the detection stage uses this too):

- ``sync_uri(uri, cache_dir)``: a file or folder at an fsspec URI, copied once per node into
  ``cache_dir/<sha256(uri)[:16]>`` under a file lock, with a completed-marker so a half-synced copy is redone.
  Keyed by the URI: nothing checks the content, and new weights uploaded to the same URI are not noticed.
- ``sync_locked(lock_uri, cache_dir)``: a tree written by ``rp-anonymize models pull`` (``pull.py``), whose
  ``models.lock.json`` lists every file with its source, revision, path (relative to the lock's folder), size
  and sha256. The node copies exactly the listed files into ``cache_dir/lock-<sha256(lock bytes)[:16]>/``
  once, under a file lock, and checks each one's size and sha256 on the way; a missing, truncated or altered
  file stops start-up with a ``ModelSourceError`` naming it. The cache is keyed by the lock's content, so a
  re-pull at another revision (a new lock) never reuses the old copy, and two nodes that loaded the same
  lock digest hold the same bytes. Later starts on the node check the copy's sizes (a stat per file).

Storage options come from the environment (for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "models.lock.json"
LOCK_FORMAT = "rp-distributed/models.lock/1"
_MARKER = ".complete"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ModelSourceError(ValueError):
    """A model source that cannot be used; the message names the source and what is wrong."""


def is_uri(src: str) -> bool:
    return "://" in src


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _url_to_fs(uri: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri if is_uri(uri) else os.path.expanduser(uri))
    except Exception as exc:  # unknown protocol, missing backend package
        raise ModelSourceError(f"cannot open {uri}: {exc}") from exc


def location(uri: str) -> tuple[str, str]:
    """(filesystem, normalised path) of a local path or URI, for comparing where two sources are."""
    if not is_uri(uri):
        return "file", os.path.realpath(os.path.expanduser(uri))
    fs, path = _url_to_fs(uri)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return "file", os.path.realpath(path)
    return proto, path.rstrip("/")


def join(root: str, rel: str) -> str:
    """``root/rel`` for a local folder (absolute) or a URI prefix."""
    if not rel:
        return root
    if is_uri(root):
        return root.rstrip("/") + "/" + rel
    return str(Path(os.path.expanduser(root)).resolve() / rel)


# --------------------------------------------------------------------------- cache by URI


def _cache_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def safe_relative(sub: str) -> bool:
    parts = sub.split("/")
    return not (not sub or sub.startswith("/") or "\\" in sub or "\x00" in sub or any(p in ("", ".", "..") for p in parts))


def _inside_staging(staging: Path, sub: str, uri: str, key: str) -> Path:
    """``staging / sub``, refusing a relative path that is absolute, has '..' parts or would resolve
    outside ``staging`` (``ModelSourceError`` naming the key)."""
    parts = sub.split("/")
    bad = (not sub or sub.startswith("/") or "\\" in sub or "\x00" in sub
           or any(p in (".", "..") for p in parts))
    dst = staging / sub
    if not bad:
        real_staging = os.path.realpath(staging)
        real = os.path.realpath(dst)
        bad = not real.startswith(real_staging.rstrip(os.sep) + os.sep)
    if bad:
        raise ModelSourceError(f"cannot sync {uri}: unsafe key {key!r} (its path {sub!r} would leave the cache "
                               "folder or is not a plain relative path); refusing the whole source")
    return dst


def sync_uri(uri: str, cache_dir: str | os.PathLike) -> Path:
    """Copy the file or folder at ``uri`` into the node-local cache once; return the local path.

    A folder maps to ``cache_dir/<key>/``; a single file to ``cache_dir/<key>/<basename>``.
    """
    from filelock import FileLock

    cache = Path(os.path.expanduser(str(cache_dir)))
    cache.mkdir(parents=True, exist_ok=True)
    key = _cache_key(uri)
    target = cache / key
    marker = cache / (key + _MARKER)

    def done() -> Path | None:
        if marker.is_file() and target.is_dir():
            rel = marker.read_text().strip()
            return target / rel if rel else target
        return None

    if (hit := done()) is not None:
        return hit
    with FileLock(str(cache / (key + ".lock"))):
        if (hit := done()) is not None:
            return hit
        fs, rpath = _url_to_fs(uri)
        rpath = rpath.rstrip("/")
        try:
            fs.invalidate_cache()  # a listing cached by this process may predate the upload
        except Exception:
            pass
        staging = cache / f"{key}.partial-{uuid.uuid4().hex[:8]}"
        if target.exists():  # an earlier sync died half-way
            shutil.rmtree(target, ignore_errors=True)
        staging.mkdir()
        try:
            try:
                is_file = fs.isfile(rpath)
                files = [] if is_file else fs.find(rpath)
            except Exception as exc:
                raise ModelSourceError(f"cannot list {uri}: {exc}") from exc
            if is_file:
                rel = Path(rpath).name
                fs.get_file(rpath, str(_inside_staging(staging, rel, uri, rpath)))
            else:
                if not files:
                    raise ModelSourceError(f"{uri} does not exist (no file or folder there)")
                rel = ""
                # Every key is checked before anything is written: a key with '..' (S3 keeps them verbatim)
                # or an absolute part would otherwise be written outside the cache.
                plan = []
                for f in files:
                    sub = f[len(rpath) :].lstrip("/")
                    if sub:
                        plan.append((f, _inside_staging(staging, sub, uri, f)))
                for f, dst in plan:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(f, str(dst))
            os.replace(staging, target)
            marker.write_text(rel)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    hit = done()
    assert hit is not None
    return hit


# --------------------------------------------------------------------------- the lock file


@dataclass(frozen=True)
class ModelLock:
    """A parsed ``models.lock.json``. ``digest`` is the sha256 of its bytes (what the manifest records)."""

    raw: bytes
    data: dict
    digest: str

    @property
    def files(self) -> list[dict]:
        return self.data["files"]

    @property
    def components(self) -> dict[str, dict]:
        return self.data.get("components", {})

    @classmethod
    def parse(cls, raw: bytes, where: str) -> "ModelLock":
        def bad(why: str) -> ModelSourceError:
            return ModelSourceError(f"{where} is not a usable {LOCK_NAME}: {why}")

        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise bad(f"not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT:
            raise bad(f"format is not {LOCK_FORMAT!r}")
        files = data.get("files")
        if not isinstance(files, list) or not files:
            raise bad("it lists no files")
        seen = set()
        for i, f in enumerate(files):
            if not isinstance(f, dict):
                raise bad(f"files[{i}] is not an object")
            path, size, sha = f.get("path"), f.get("size"), f.get("sha256")
            if not isinstance(path, str) or not safe_relative(path) or path == LOCK_NAME:
                raise bad(f"files[{i}].path {path!r} is not a plain relative path")
            if path in seen:
                raise bad(f"{path} is listed twice")
            seen.add(path)
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise bad(f"{path}: size {size!r} is not a byte count")
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise bad(f"{path}: sha256 {sha!r} is not 64 lowercase hex digits")
        if not isinstance(data.get("components", {}), dict):
            raise bad("components is not an object")
        return cls(raw, data, hashlib.sha256(raw).hexdigest())


def read_lock(lock_uri: str) -> ModelLock:
    fs, path = _url_to_fs(lock_uri)
    try:
        try:
            fs.invalidate_cache()
        except Exception:
            pass
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ModelSourceError(f"lock file {lock_uri} does not exist (write it with `rp-anonymize models pull`; "
                               "a pull that did not finish leaves none)") from None
    except Exception as exc:
        raise ModelSourceError(f"cannot read lock file {lock_uri}: {type(exc).__name__}: {exc}") from exc
    return ModelLock.parse(raw, lock_uri)


def lock_root(lock_uri: str) -> str:
    """The folder or prefix the lock's paths are relative to: the one holding the lock file."""
    if is_uri(lock_uri):
        return lock_uri.rstrip("/").rsplit("/", 1)[0]
    return str(Path(os.path.expanduser(lock_uri)).resolve().parent)


# --------------------------------------------------------------------------- cache by lock content


@dataclass(frozen=True)
class LockedModels:
    """A verified node-local copy of a pulled tree. ``local(source)`` maps a config source under the lock's
    folder (``s3://bucket/models/sdxl``) to its copy (``cache_dir/lock-<digest>/sdxl``)."""

    lock: ModelLock
    lock_uri: str
    root_uri: str
    local_root: Path

    @property
    def digest(self) -> str:
        return self.lock.digest

    def relative(self, source: str, key: str) -> str:
        proto_s, path_s = location(source)
        proto_r, path_r = location(self.root_uri)
        if proto_s != proto_r or not (path_s == path_r or path_s.startswith(path_r.rstrip("/") + "/")):
            raise ModelSourceError(
                f"{key}={source} is not under {self.root_uri}, the folder of the lock file {self.lock_uri}: with a "
                "lock file set, model sources must point into the tree `rp-anonymize models pull` wrote (it prints "
                "the config lines)")
        return path_s[len(path_r):].strip("/")

    def component(self, rel: str) -> tuple[str, dict] | None:
        """The component whose ``path`` is ``rel`` (or holds it)."""
        comps = self.lock.components
        for name, c in comps.items():
            if c.get("path") == rel:
                return name, c
        for name, c in comps.items():
            p = c.get("path")
            if p and rel.startswith(p + "/"):
                return name, c
        return None

    def local(self, source: str, key: str) -> Path:
        rel = self.relative(source, key)
        paths = [f["path"] for f in self.lock.files]
        if rel and rel not in paths and not any(p.startswith(rel + "/") for p in paths):
            tops = sorted({p.split("/")[0] for p in paths})
            raise ModelSourceError(f"{key}={source}: the lock file {self.lock_uri} lists no file at or under "
                                   f"{rel!r} (it holds: {', '.join(tops)})")
        return self.local_root / rel if rel else self.local_root

    def check_pin(self, source: str, key: str, revision_key: str, revision: str | None,
                  variant: str | None = None, check_variant: bool = False) -> dict | None:
        """The lock's component for ``source``; its recorded revision (and variant) must be the config's, so the
        settings fingerprint (which holds the config's revision) changes whenever the weights do."""
        found = self.component(self.relative(source, key))
        if found is None:
            return None
        name, comp = found
        pinned = comp.get("revision")
        if revision != pinned:
            raise ModelSourceError(
                f"{revision_key}={revision!r} does not match the lock file {self.lock_uri}: it holds {name} from "
                f"{comp.get('source')} at " + (f"revision {pinned}" if pinned else "no revision") +
                f"; set {revision_key}: {pinned if pinned else 'null'} (or pull that revision again)")
        if check_variant and variant != comp.get("variant"):
            raise ModelSourceError(
                f"diffusion.variant={variant!r} does not match the lock file {self.lock_uri}: {name} was pulled "
                f"with variant {comp.get('variant')!r}")
        return comp


def _verify_sizes(base: Path, lock: ModelLock) -> bool:
    for f in lock.files:
        try:
            if (base / f["path"]).stat().st_size != f["size"]:
                return False
        except OSError:
            return False
    return True


def sync_locked(lock_uri: str, cache_dir: str | os.PathLike) -> LockedModels:
    """Copy the files ``lock_uri`` lists into ``cache_dir/lock-<digest16>/`` once per node, checking size and
    sha256 of each; ``ModelSourceError`` naming the first file that is missing or differs."""
    from filelock import FileLock

    lock = read_lock(lock_uri)
    root_uri = lock_root(lock_uri)
    cache = Path(os.path.expanduser(str(cache_dir)))
    cache.mkdir(parents=True, exist_ok=True)
    key = "lock-" + lock.digest[:16]
    target = cache / key
    marker = cache / (key + _MARKER)
    result = LockedModels(lock, lock_uri, root_uri, target)

    def done() -> bool:
        return marker.is_file() and marker.read_text().strip() == lock.digest and _verify_sizes(target, lock)

    if done():
        return result
    with FileLock(str(cache / (key + ".lock"))):
        if done():
            return result
        marker.unlink(missing_ok=True)
        if target.exists():  # an earlier sync died half-way, or the copy lost a file since
            shutil.rmtree(target, ignore_errors=True)
        fs, rpath = _url_to_fs(root_uri)
        rpath = rpath.rstrip("/")
        try:
            fs.invalidate_cache()
        except Exception:
            pass

        def where(rel: str) -> str:
            return join(root_uri, rel)

        mismatch = f"the model files at {root_uri} do not match {lock_uri}"
        # Sizes first, from the store's metadata: a missing or truncated file is named before anything is copied.
        for f in lock.files:
            try:
                size = fs.size(rpath + "/" + f["path"])
            except FileNotFoundError:
                size = None
            except Exception as exc:
                raise ModelSourceError(f"cannot read {where(f['path'])}: {type(exc).__name__}: {exc}") from exc
            if size is None:
                raise ModelSourceError(f"{mismatch}: {where(f['path'])} is missing")
            if size != f["size"]:
                raise ModelSourceError(f"{mismatch}: {where(f['path'])} has {size} bytes, the lock says {f['size']} "
                                       "(truncated or replaced)")
        staging = cache / f"{key}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for f in lock.files:
                dst = _inside_staging(staging, f["path"], root_uri, f["path"])
                dst.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(rpath + "/" + f["path"], str(dst))
                size, digest = dst.stat().st_size, sha256_file(dst)
                if size != f["size"] or digest != f["sha256"]:
                    got = f"{size} bytes" if size != f["size"] else f"sha256 {digest}"
                    want = f"{f['size']} bytes" if size != f["size"] else f"sha256 {f['sha256']}"
                    raise ModelSourceError(f"{mismatch}: {where(f['path'])} has {got}, the lock says {want} "
                                           "(corrupted or replaced)")
            (staging / LOCK_NAME).write_bytes(lock.raw)
            os.replace(staging, target)
            marker.write_text(lock.digest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return result
