"""The job's plan, made on the driver before Ray starts: which inputs to do, and where each output goes.

Fail-closed rules that live here:
- the output prefix may not be the input prefix or contain it (outputs could overwrite inputs); an output
  prefix inside the input prefix is allowed, and the listing excludes it;
- every input gets its own output key. Keys that would collide (a forced format turning ``a.png`` and
  ``a.jpg`` into ``a.jpg``; ``a//b.jpg`` and ``a/b.jpg``; ``a\\b.jpg``) are renamed ``stem~<hash>.ext``,
  where the hash is of the input's own relative path, and the manifest notes it; a key that would leave
  the output prefix or land in the manifest folder becomes that input's error row, never a job abort;
- resume skips an input only when its latest manifest row wrote this same key under the same
  anonymization settings (``config.anonymization_fingerprint``) and the output exists; otherwise it is
  redone, and an earlier output at another key is deleted (``stale_output_uri``). Resume reads only
  four manifest columns, decides in Arrow, and learns which outputs exist from one listing of the
  output prefix, not one request per key.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from . import io, manifest
from .config import JobConfig


class PlanError(ValueError):
    """Input and output prefixes that cannot be used together; the message says why."""


@dataclass
class Plan:
    todo: list[dict] = field(default_factory=list)  # rows for the first stage
    skipped: int = 0  # done earlier with the same settings
    redone_changed: int = 0  # done earlier under other anonymization settings: redone
    renamed: int = 0  # given a distinct output key because their natural keys collide
    refused: int = 0  # error rows made here (unsafe key, symlink out of the root, collision)


def _norm(fs, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        path = os.path.realpath(path)
    return posixpath.normpath(path.rstrip("/") or "/")


def output_exclusion(input_uri: str, output_uri: str) -> str | None:
    """Check the two prefixes; return the output prefix as the input listing spells it (to exclude), if
    it lies inside the input, else None. ``PlanError`` when output == input or output contains input."""
    ifs, ipath = io.filesystem(input_uri)
    ofs, opath = io.filesystem(output_uri)
    if type(ifs) is not type(ofs):
        return None
    i, o = _norm(ifs, ipath), _norm(ofs, opath)
    if o == i:
        raise PlanError(f"the output prefix {output_uri} is the input prefix: outputs would overwrite the inputs")
    if i.startswith(o.rstrip("/") + "/"):
        raise PlanError(f"the input {input_uri} lies inside the output prefix {output_uri}: outputs could "
                        "overwrite inputs; choose an output prefix outside the input")
    if o.startswith(i.rstrip("/") + "/"):
        # The listing walks the input as spelled: rebase the output onto that spelling (a full URI, so
        # the listing knows its filesystem).
        rebased = posixpath.join(ipath.rstrip("/"), o[len(i.rstrip("/")) + 1:])
        return rebased if isinstance(ifs, LocalFileSystem) else ifs.unstrip_protocol(rebased)
    return None


def distinct_key(target: str, rel_path: str) -> str:
    stem, ext = posixpath.splitext(target)
    return f"{stem}~{hashlib.sha256(rel_path.encode()).hexdigest()[:8]}{ext}"


def output_keys(rel_paths: list[str], output_uri: str, out_format: str, manifest_dir: str
                ) -> dict[str, tuple[str | None, str | None, str | None]]:
    """rel_path -> (output key, error, note). Exactly one of key and error is set."""
    result: dict[str, tuple[str | None, str | None, str | None]] = {}
    by_key: dict[str, list[str]] = defaultdict(list)
    reserved = io.join_uri(output_uri, manifest_dir).rstrip("/") + "/"
    for rel in rel_paths:
        try:
            key = io.join_uri(output_uri, io.output_rel_path(rel, out_format))
        except io.InputError as exc:
            result[rel] = (None, str(exc), None)
            continue
        if key.startswith(reserved):
            result[rel] = (None, f"output key {key} would lie inside the manifest folder {manifest_dir}/", None)
            continue
        by_key[key].append(rel)
    final: dict[str, list[str]] = defaultdict(list)
    for key, members in by_key.items():
        if len(members) == 1:
            result[members[0]] = (key, None, None)
            final[key].append(members[0])
            continue
        note = f"output key renamed: {len(members)} inputs map to {key}"
        for rel in members:
            new = distinct_key(key, rel)
            result[rel] = (new, None, note)
            final[new].append(rel)
    for key, members in final.items():  # a renamed key that meets another input's key: refuse both
        if len(members) > 1:
            for rel in members:
                result[rel] = (None, f"output key {key} collides with another input's key", None)
    return result


def _existing_outputs(output_uri: str) -> pa.Array:
    """Relative paths of every object under the output prefix: one listing (paged by the store), not one
    request per key."""
    fs, root = io.filesystem(output_uri)
    root = root.rstrip("/")
    if not fs.exists(root):
        return pa.array([], pa.string())
    return pa.array([p[len(root) + 1:] for p in fs.find(root)], pa.string())


def make_plan(cfg: JobConfig, input_uri: str, output_uri: str, fingerprint: str) -> Plan:
    out_cfg = cfg.output
    exclude = output_exclusion(input_uri, output_uri)
    # The earlier outcomes are read even with --overwrite: an output at a key this run no longer writes
    # is deleted either way. Only the resume columns are read, and the decisions are made in Arrow.
    latest = manifest.latest_outcomes(output_uri, out_cfg.manifest_dir)
    if out_cfg.overwrite:
        manifest.remove_manifest(output_uri, out_cfg.manifest_dir)
    files = io.list_inputs(input_uri, cfg.input.extensions, exclude_uri=exclude or output_uri)
    if exclude is not None:
        inside = [f.uri for f in files if (f.uri + "/").startswith(exclude.rstrip("/") + "/")]
        if inside:
            raise PlanError(f"the input listing did not exclude the output prefix {output_uri} (e.g. {inside[0]})")
    keys = output_keys([f.rel_path for f in files], output_uri, out_cfg.format, out_cfg.manifest_dir)
    errors = [getattr(f, "skip_reason", None) or keys[f.rel_path][1] for f in files]
    writes = [None if err else keys[f.rel_path][0] for f, err in zip(files, errors)]
    listed = pa.table({"_i": pa.array(range(len(files)), pa.int64()),
                       "input_uri": pa.array([f.uri for f in files], pa.string()),
                       "key": pa.array(writes, pa.string())})
    done = latest.filter(pc.and_(pc.is_in(latest["status"], pa.array(manifest.DONE_STATUSES)),
                                 pc.is_valid(latest["output_uri"])))
    done = done.select(["input_uri", "output_uri", "settings_fingerprint"]).rename_columns(
        ["input_uri", "prev_key", "prev_fp"])
    joined = listed.join(done, keys="input_uri", join_type="left outer").sort_by("_i")
    has_prev = pc.is_valid(joined["prev_key"])
    same_fp = pc.fill_null(pc.equal(joined["prev_fp"], pa.scalar(fingerprint)), False)
    same_key = pc.fill_null(pc.equal(joined["prev_key"], joined["key"]), False)
    skip = pa.array([False] * len(files)) if out_cfg.overwrite or not len(done) else pc.and_(same_key, same_fp)
    if pc.any(skip).as_py():  # an output counts as done only if it is still there
        prefix = len(output_uri.rstrip("/")) + 1
        rel = pa.array([k[prefix:] if k else None for k in joined["key"].to_pylist()], pa.string())
        skip = pc.and_(skip, pc.fill_null(pc.is_in(rel, value_set=_existing_outputs(output_uri)), False))
    # An earlier output at a key no input writes now is stale (a changed format, a refused input).
    targets = pa.array([w for w in writes if w], pa.string())
    stale = pc.and_(pc.and_(has_prev, pc.invert(same_key)),
                    pc.invert(pc.fill_null(pc.is_in(joined["prev_key"], value_set=targets), False)))
    plan = Plan(skipped=pc.sum(skip).as_py() or 0)
    changed = pc.and_(pc.and_(has_prev, pc.invert(same_fp)), pc.is_valid(joined["key"]))
    plan.redone_changed = 0 if out_cfg.overwrite else (pc.sum(changed).as_py() or 0)
    for f, err, skipped, stale_key, prev_key in zip(files, errors, skip.to_pylist(), stale.to_pylist(),
                                                    joined["prev_key"].to_pylist()):
        if skipped:
            continue
        key, _, note = keys[f.rel_path]
        plan.refused += err is not None
        plan.renamed += note is not None and err is None
        plan.todo.append({"input_uri": f.uri, "rel_path": f.rel_path, "output_uri": None if err else key,
                          "error": err, "notes": note, "stale_output_uri": prev_key if stale_key else None})
    return plan
