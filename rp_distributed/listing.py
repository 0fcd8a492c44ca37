"""The input listing: every image file under an input folder or prefix, with its content identity, as one Arrow
table sorted by relative path (``list_inputs_table``).

The walk yields paths one by one; what decides whether a path is listed (under the excluded output prefix, hidden,
its extension) is computed in Arrow a batch of ``LISTING_BATCH`` paths at a time, not in Python per path: at 10M
local files the per-path Python was over half of the listing's CPU.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from .storage import InputError, Storage, locate, walk_local

LISTING_BATCH = 65_536  # listed entries held as Python objects at a time
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("rel_path", pa.string()), ("skip_reason", pa.string()),
                            ("size", pa.int64()), ("version", pa.string())])

# What an object store's listing says changes when an object is replaced, in the order looked for (S3: ETag; GCS:
# its generation, then its md5), read from the listing's own entries: no request per object.
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "LastModified", "last_modified", "mtime")
# A hidden part of a relative path: one that starts with "." and is not "." or ".." (object keys may hold those:
# they are listed, and the planner refuses a key that would leave the output prefix).
_HIDDEN_PART = r"(^|/)\.([^./]|\.[^/])"
_EXTENSION = r"(?P<ext>\.[^./]*)$"  # as posixpath.splitext on a name that does not start with "."
NOT_UTF8 = ("its name is not valid UTF-8 (listed with the undecodable bytes written \\xNN): not read; rename it "
            "to anonymize it")


@dataclass
class InputFile:
    uri: str
    rel_path: str
    # Set when the file is listed but must not be read (a symlink leaving the input root, ...): the caller
    # records it as an error row with this reason instead of processing it.
    skip_reason: str | None = None


def listing_base(fs: fsspec.AbstractFileSystem, root: str) -> tuple[str, bool]:
    """The folder the listing's keys are relative to, and whether ``root`` names a single file."""
    single = os.path.isfile(root) if isinstance(fs, LocalFileSystem) else fs.isfile(root)
    return (posixpath.dirname(root) if single else root.rstrip("/")), single


def _local_identities(paths: list[str]) -> tuple[list[int | None], list[int | None]]:
    """Each local file's size and mtime in nanoseconds (one stat of the file the listing found; a replaced or
    rewritten file gets a new mtime), None for both when it cannot be stat'ed."""
    sizes: list[int | None] = []
    mtimes: list[int | None] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            sizes.append(None)
            mtimes.append(None)
            continue
        sizes.append(info.st_size)
        mtimes.append(info.st_mtime_ns)
    return sizes, mtimes


def _store_identity(info: dict) -> tuple[int | None, str | None]:
    """An object's size and version marker (``etag:...``) from its listing entry."""
    size = info.get("size")
    for name in _VERSION_FIELDS:
        if info.get(name) not in (None, ""):
            return (None if size is None else int(size)), f"{name.lower()}:{info[name]}"
    return (None if size is None else int(size)), None


@dataclass
class _Walk:
    """One listing under way: the filesystem, the folder the keys are relative to, the prefix left out."""
    fs: fsspec.AbstractFileSystem
    base: str
    exclude: str | None
    extensions: list[str]
    details: dict  # object stores: each path's listing entry

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)


def _utf8_names(paths: list[str], skips: list[str | None]) -> tuple[list[str], list[str | None]]:
    """``paths`` with each name that is not UTF-8 written with its undecodable bytes as ``\\xNN`` (the same dots
    and slashes, so the same filters apply) and skipped with ``NOT_UTF8``: a row the job records, never a crash."""
    paths, skips = list(paths), list(skips)
    for i, p in enumerate(paths):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            paths[i] = p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            skips[i] = skips[i] or NOT_UTF8
    return paths, skips


def _listed(walk: _Walk, paths: list[str], skips: list[str | None]) -> pa.RecordBatch:
    """The rows of ``paths`` (with the walk's ``skips``) that are listed: not under the excluded prefix, not
    hidden, with one of the extensions; with their URI, relative path and content identity."""
    try:
        path = pa.array(paths, pa.string())
    except UnicodeEncodeError:  # a name that is not UTF-8: the walk hands its bytes on as surrogates
        paths, skips = _utf8_names(paths, skips)
        path = pa.array(paths, pa.string())
    rel = pc.utf8_ltrim(pc.utf8_slice_codeunits(path, len(walk.base)), "/")
    ext = pc.utf8_lower(pc.extract_regex(rel, _EXTENSION).field("ext"))
    keep = pc.and_(pc.invert(pc.match_substring_regex(rel, _HIDDEN_PART)),
                   pc.fill_null(pc.is_in(ext, value_set=pa.array(walk.extensions, pa.string())), False))
    if walk.exclude:
        keep = pc.and_(keep, pc.invert(pc.starts_with(pc.binary_join_element_wise(path, "/", ""), walk.exclude)))
    path, rel, skip = path.filter(keep), rel.filter(keep), pa.array(skips, pa.string()).filter(keep)
    kept, skip_reasons = path.to_pylist(), skip.to_pylist()
    if walk.local:
        readable = [p for p, s in zip(kept, skip_reasons) if s is None]
        sizes, mtimes = _local_identities(readable)
        at = iter(range(len(readable)))
        slots = [None if s is not None else next(at) for s in skip_reasons]
        size = pa.array([None if i is None else sizes[i] for i in slots], pa.int64())
        mtime = pa.array([None if i is None else mtimes[i] for i in slots], pa.int64())
        version = pc.binary_join_element_wise("mtime_ns:", pc.cast(mtime, pa.string()), "")
        return pa.record_batch([path, rel, skip, size, version], schema=LISTING_SCHEMA)
    keys = Storage(walk.fs.unstrip_protocol(walk.base))
    for i, (p, s) in enumerate(zip(kept, skip_reasons)):
        if s is None:  # a key the store's client would read as syntax: listed, never read
            try:
                keys.check(p[len(walk.base) + 1:], literal=True)
            except InputError as exc:
                skip_reasons[i] = str(exc)
    identities = [(None, None) if s is not None else _store_identity(walk.details.get(p) or {})
                  for p, s in zip(kept, skip_reasons)]
    return pa.record_batch([pa.array([walk.fs.unstrip_protocol(p) for p in kept], pa.string()), rel,
                            pa.array(skip_reasons, pa.string()), pa.array([s for s, _ in identities], pa.int64()),
                            pa.array([v for _, v in identities], pa.string())], schema=LISTING_SCHEMA)


def list_inputs_table(input_uri: str, extensions: list[str], exclude_uri: str | None = None) -> pa.Table:
    """Image files under ``input_uri`` (recursively), by extension, sorted by relative path, as an Arrow
    table (``LISTING_SCHEMA``): about 100 bytes an object on the driver, not an info dict.

    Each listed file's content identity (``size``, ``version``) comes with it, for resume to notice an input
    replaced under the same key: on object stores from the listing's own entries (the ETag: no request per
    object); on a local folder from one ``stat`` of each listed file (its size and mtime in nanoseconds).

    A single file URI lists just that file. Anything under ``exclude_uri`` (the output prefix, when it
    lies inside the input) is skipped, as are hidden files and folders. Local folders are walked without
    following symlinked folders; a symlinked file whose target lies outside the input root is listed with
    ``skip_reason`` set (the caller records it, nothing reads it). Object stores are listed by name
    (``find`` without details; the store pages the listing) and the listing cache is dropped after.
    """
    fs, root, _ = locate(input_uri)
    if not fs.exists(root):
        raise FileNotFoundError(f"input {input_uri} does not exist")
    exclude = None
    if exclude_uri is not None:
        efs, epath, _ = locate(exclude_uri)
        if type(efs) is type(fs):
            exclude = epath.rstrip("/") + "/"
    local = isinstance(fs, LocalFileSystem)
    base, single = listing_base(fs, root)
    details: dict = {}
    if single:  # the file the user named (through a link or not): read it
        found = [(root, None)]
        if not local:
            details = {root: fs.info(root)}
    elif local:
        found = walk_local(root)
    else:
        # With details: s3fs and gcsfs build these entries for the listing anyway (a name-only find drops them).
        details = fs.find(root, detail=True)
        found = ((path, None) for path in list(details))
        fs.invalidate_cache()  # s3fs/gcsfs keep every listed object's info dict otherwise
    walk = _Walk(fs=fs, base=base, exclude=exclude, extensions=list(extensions), details=details)
    paths: list[str] = []
    skips: list[str | None] = []
    batches = []  # Arrow every LISTING_BATCH entries: at 10M inputs the Python lists alone held ~3 GB
    for path, skip in found:
        paths.append(path)
        skips.append(skip)
        if len(paths) >= LISTING_BATCH:
            batches.append(_listed(walk, paths, skips))
            paths, skips = [], []
    batches.append(_listed(walk, paths, skips))
    del found, details, walk, paths, skips
    table = pa.Table.from_batches(batches, schema=LISTING_SCHEMA)
    del batches
    order = pc.sort_indices(table["rel_path"])
    # Sorted a column at a time, each unsorted column let go once its sorted copy exists: sorting the table whole
    # held two copies of the listing (at 10M inputs ~1.2 GB more, the plan's peak).
    columns = {}
    for name in LISTING_SCHEMA.names:
        columns[name] = table[name].take(order)
        table = table.drop_columns([name])
    return pa.table(columns, schema=LISTING_SCHEMA)


def list_inputs(input_uri: str, extensions: list[str], exclude_uri: str | None = None) -> list[InputFile]:
    """``list_inputs_table`` as ``InputFile`` objects (small listings; the planner uses the table)."""
    t = list_inputs_table(input_uri, extensions, exclude_uri)
    return [InputFile(uri=u, rel_path=r, skip_reason=k) for u, r, k in
            zip(*(t[c].to_pylist() for c in ("uri", "rel_path", "skip_reason")))]
