"""Objects under one prefix, where a key is a plain path and never syntax.

``Storage(prefix)`` builds the prefix's filesystem once (fsspec: local folders, ``file://``, ``s3://``,
``gs://``) and takes **keys**: relative paths under the prefix, handed to the filesystem as they are. No key,
and no URI made by joining one to a prefix, is ever parsed again as an fsspec URL: ``::`` (a chained URL),
``|``, ``{}``, ``%``, ``\\``, ``[*?]`` are characters of a name. ``locate`` reads a URI strictly (a
``scheme://`` at its start, else a local path), and its result does not depend on what follows the prefix.

Refused with ``InputError`` before any call (nothing touched): an empty or absolute key, a ``.``/``..``/empty
part or a NUL (writes, deletes and local paths; an object store's listed key is read as it is spelled), and
what the store's client itself parses inside a path (``CLIENT_SYNTAX``: s3fs cuts a key at ``?versionId=``,
so ``out/a.jpg?versionId=1`` would reach ``out/a.jpg``).

Local folders are walked from the prefix one folder at a time with ``O_NOFOLLOW`` (``openat``): a write or a
delete never goes through a symlinked folder below the prefix (the prefix itself may be a link: the user named
it), and a write replaces a symlink at its key instead of following it. A read follows a symlinked file only
to a file inside the prefix's real path, and checks the file it actually opened (re-walked without following
anything), so a link or folder swapped in between listing and reading is refused, as is a FIFO (opened
non-blocking, never read).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


class InputError(Exception):
    """An input (or an output key) that cannot be used; the message is the manifest's reason."""


SYMLINK_OUTSIDE = "symlink to a file outside the input root: not followed"
SYMLINK_BROKEN = "broken symlink (its target does not exist): not followed"
NOT_REGULAR = "not a regular file: not read"

PARTIAL_WRITE_SUFFIX = ".tmp-"  # + 32 hex digits: a local write in progress (or cut short by a killed worker)
PARTIAL_WRITE = re.compile(re.escape(PARTIAL_WRITE_SUFFIX) + r"[0-9a-f]{32}$")

# What each store's client parses inside a path, so that a key holding it would name another object (s3fs
# cuts ``?versionId=`` off the key; gcsfs reads a query or fragment as a generation). Unknown stores: both.
CLIENT_SYNTAX = {"s3": ("?versionId=",), "s3a": ("?versionId=",), "gs": ("?", "#"), "gcs": ("?", "#")}
_UNKNOWN_STORE_SYNTAX = ("?", "#")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL = ("file", "local")

_DIR = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = os.O_NOFOLLOW
_READ = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # non-blocking: a FIFO cannot hang us


def _storage_options(protocol: str) -> dict:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if protocol in ("s3", "s3a") and endpoint:
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def locate(uri: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """``(filesystem, path inside it, protocol)`` of ``uri``, read strictly: the protocol is a ``scheme://``
    at the start, else the local filesystem; nothing else in the string is syntax (no ``::`` chains, no
    query). Local paths come back absolute."""
    m = _SCHEME.match(uri)
    protocol = m.group(1).lower() if m else "file"
    if protocol in _LOCAL:
        path = uri[m.end():] if m else uri
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), "file"
    fs = fsspec.filesystem(protocol, **_storage_options(protocol))
    return fs, uri[m.end():], protocol


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _walk(top: str, parts: list[str], create: bool, where: str) -> int:
    """A descriptor of the folder ``top``/``parts``, opened one part at a time without following a symlink
    (``top`` itself is followed). ``create``: make missing folders."""
    if create:
        os.makedirs(top, exist_ok=True)
    fd = os.open(top, _DIR)
    try:
        for i, part in enumerate(parts):
            try:
                nxt = os.open(part, _DIR | _NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, dir_fd=fd)
                except FileExistsError:  # made meanwhile by another writer
                    pass
                nxt = os.open(part, _DIR | _NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(part, fd):
                    raise InputError(f"folder {'/'.join(parts[:i + 1])!r} under {where} is a symlink: "
                                     "not followed") from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


LINKED_FOLDER = "symlinked folder: not followed"


def walk_local(root: str, everything: bool = False):
    """Files under a local folder as ``(path, skip_reason)``, streamed (``os.scandir``: no stat call per
    regular file), without following symlinked folders (so link loops cannot happen).

    A symlinked file is followed only when its real path lies inside the root's real path; otherwise it
    is listed with a ``skip_reason`` and never opened. Hidden folders are not descended into, and a
    symlinked folder is skipped, unless ``everything`` (an audit of what a folder holds: hidden folders are
    walked, and a symlinked folder is listed itself, with ``LINKED_FOLDER``).
    """
    real_root = os.path.realpath(root)
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # removed or unreadable while listing
            continue
        for entry in entries:
            try:
                if entry.is_dir():  # follows a link to tell; a linked folder is never descended
                    if not entry.is_symlink() and (everything or not entry.name.startswith(".")):
                        stack.append(entry.path)
                    elif everything and entry.is_symlink():
                        yield entry.path, LINKED_FOLDER
                    continue
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not os.path.exists(target):
                        yield entry.path, SYMLINK_BROKEN
                    elif not _inside(target, real_root):
                        yield entry.path, SYMLINK_OUTSIDE
                    else:
                        yield entry.path, None if os.path.isfile(target) else NOT_REGULAR
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path, None
                else:  # FIFO, socket, device: reading could block or never end
                    yield entry.path, NOT_REGULAR
            except FileNotFoundError:  # removed while listing
                continue
            except OSError:  # a link loop (ELOOP), a target we may not stat (EACCES): listed, never read
                try:
                    if entry.is_symlink():
                        yield entry.path, SYMLINK_BROKEN
                except OSError:
                    continue


class Storage:
    """The objects under one prefix; every method takes a key (see the module's docstring).

    ``follow_links_out``: a read may follow a symlinked file anywhere (only for the single file a user
    named as the input, whose folder is then the prefix)."""

    def __init__(self, uri: str, follow_links_out: bool = False):
        self.uri = uri.rstrip("/")  # as spelled: a key's URI is this + "/" + key
        self.fs, root, self.protocol = locate(uri)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") or "/"
        self.follow_links_out = follow_links_out
        self.syntax = () if self.local else CLIENT_SYNTAX.get(self.protocol, _UNKNOWN_STORE_SYNTAX)

    @classmethod
    def around(cls, uri: str) -> tuple[Storage, str]:
        """The storage of ``uri``'s own folder and ``uri``'s name in it (one object named by its URI)."""
        parent, name = uri.rsplit("/", 1) if "/" in uri.rstrip("/") else (".", uri)
        return cls(parent or "/"), name

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # -- keys ------------------------------------------------------------------------------------------------
    def uri_of(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def key_of(self, uri: str) -> str:
        """The key of ``uri``, which must lie under this prefix (compared as text: nothing is parsed)."""
        head = self.uri + "/"
        if not uri.startswith(head) or len(uri) == len(head):
            raise InputError(f"{uri} does not lie under {self.uri}: not touched")
        return uri[len(head):]

    def check(self, key: str, literal: bool = False) -> str:
        """``key`` if it is a plain path under the prefix, else ``InputError``. ``literal``: an object store's
        listed key, used as spelled (``a//b``, ``a/../b`` are names there)."""
        if not key or "\x00" in key:
            raise InputError(f"unusable key {key!r} under {self.uri}")
        if (self.local or not literal) and (key.startswith("/") or
                                            any(p in ("", ".", "..") for p in key.split("/"))):
            raise InputError(f"unsafe key {key!r}: must be a plain relative path under {self.uri}")
        for mark in self.syntax:
            if mark in key:
                raise InputError(f"key {key!r} holds {mark!r}, which the {self.protocol} client reads as syntax "
                                 "(it could name another object): not used")
        return key

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root != "/" else f"/{key}"

    # -- reading ---------------------------------------------------------------------------------------------
    def _open_local(self, key: str) -> int:
        parts = key.split("/")
        dfd = _walk(self.root, parts[:-1], False, self.uri)
        try:
            info = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                return self._open_link(key, dfd, parts[-1])
            if not stat.S_ISREG(info.st_mode):
                raise InputError(NOT_REGULAR)
            return _regular(os.open(parts[-1], _READ | _NOFOLLOW, dir_fd=dfd), info)
        finally:
            os.close(dfd)

    def _open_link(self, key: str, dfd: int, name: str) -> int:
        if self.follow_links_out:
            return _regular(os.open(name, _READ, dir_fd=dfd), None)
        real_root = os.path.realpath(self.root)
        target = os.path.realpath(self._path(key))
        if not os.path.exists(target):
            raise InputError(SYMLINK_BROKEN)
        if not _inside(target, real_root) or target == real_root:
            raise InputError(SYMLINK_OUTSIDE)
        # Open the target by walking the real path again without following anything: a link swapped in since
        # realpath resolved it fails here instead of being followed.
        parts = os.path.relpath(target, real_root).split(os.sep)
        tfd = _walk(real_root, parts[:-1], False, self.uri)
        try:
            try:
                return _regular(os.open(parts[-1], _READ | _NOFOLLOW, dir_fd=tfd), None)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise InputError(f"{SYMLINK_OUTSIDE} (it changed while being opened)") from None
                raise
        finally:
            os.close(tfd)

    def read(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes; ``InputError`` above ``max_bytes`` or when empty."""
        if self.local:
            fd = self._open_local(self.check(key))
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    raise InputError(f"file too large: {size} bytes > input.max_bytes={max_bytes}")
                data = f.read(max_bytes + 1)
        else:
            path = self._path(self.check(key, literal=True))
            size = self.fs.size(path)
            if size is not None and size > max_bytes:
                raise InputError(f"file too large: {size} bytes > input.max_bytes={max_bytes}")
            with self.fs.open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise InputError(f"file too large: > input.max_bytes={max_bytes}")
        if not data:
            raise InputError("empty file (0 bytes)")
        return data

    def open(self, key: str):
        """A binary file object for reading (seekable: Parquet reads its footer first)."""
        if self.local:
            return os.fdopen(self._open_local(self.check(key)), "rb")
        return self.fs.open(self._path(self.check(key, literal=True)), "rb")

    def exists(self, key: str) -> bool:
        self.check(key)
        if not self.local:
            return self.fs.exists(self._path(key))
        parts = key.split("/")
        try:
            dfd = _walk(self.root, parts[:-1], False, self.uri)
        except FileNotFoundError:
            return False
        try:
            os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dfd)

    def list(self, under: str = "", everything: bool = False) -> Iterator[str]:
        """Keys of every object under the folder ``under`` (all of them by default): one listing, names only
        (local: ``walk_local``, not through symlinked or hidden folders unless ``everything``, which also lists
        a symlinked folder as a key of its own; object stores: ``find``, paged)."""
        top = self._path(self.check(under)) if under else self.root
        cut = len(self.root.rstrip("/")) + 1
        if self.local:
            if os.path.isdir(top):
                yield from (path[cut:] for path, _ in walk_local(top, everything))
            return
        if not self.fs.exists(top):
            return
        paths = self.fs.find(top)
        self.fs.invalidate_cache()  # s3fs/gcsfs keep every listed object's info dict otherwise
        yield from (p[cut:] for p in paths)

    # -- writing ---------------------------------------------------------------------------------------------
    def write(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` so readers see the old object or the whole new one, never a part.

        Local files go through a temporary name and a rename in the same (walked) folder; a symlink at the
        key is replaced, not followed. Object stores' single PUT is atomic."""
        self.check(key)
        if not self.local:
            self.fs.pipe_file(self._path(key), data)
            return
        *folders, name = key.split("/")
        dfd = _walk(self.root, folders, True, self.uri)
        tmp = f"{name}{PARTIAL_WRITE_SUFFIX}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         0o666, dir_fd=dfd)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            os.close(dfd)

    def remove(self, key: str) -> None:
        """Delete the object at ``key`` if there is one (a missing one is fine; a symlink there is removed,
        never its target). Other errors propagate."""
        self.check(key)
        if not self.local:
            try:
                self.fs.rm_file(self._path(key))
            except FileNotFoundError:
                pass
            return
        *folders, name = key.split("/")
        try:
            dfd = _walk(self.root, folders, False, self.uri)
        except FileNotFoundError:
            return
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        finally:
            os.close(dfd)


def _regular(fd: int, listed: os.stat_result | None) -> int:
    """``fd`` if it is a regular file (and the very file ``listed`` saw), else closed and refused."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or (listed is not None and
                                          (info.st_dev, info.st_ino) != (listed.st_dev, listed.st_ino)):
        os.close(fd)
        raise InputError(NOT_REGULAR if not stat.S_ISREG(info.st_mode) else "the file changed while being opened")
    return fd
