"""The job's plan, made on the driver before Ray starts: which inputs to do, and where each output goes.

Fail-closed rules that live here:
- the output prefix may not be the input prefix or contain it (outputs could overwrite inputs); an output
  prefix inside the input prefix is allowed, and the listing excludes it;
- every input gets its own output key. Keys that would collide (a forced format turning ``a.png`` and
  ``a.jpg`` into ``a.jpg``; ``a//b.jpg`` and ``a/b.jpg``; ``a\\b.jpg``) are renamed ``stem~<hash>.ext``,
  where the hash is of the input's own relative path, and the manifest notes it; a key that would leave
  the output prefix or land in the manifest folder, or that holds what the output store's client reads as
  syntax (S3: ``?versionId=``), becomes that input's error row, never a job abort;
- resume skips an input only when its latest manifest row wrote this same key under the same
  anonymization settings (``config.anonymization_fingerprint``) and the output exists; otherwise it is
  redone, and an earlier output at another key is deleted (``stale_output_uri``). An input replaced under
  the same key since it was done (its listed size or change marker, ``input_size``/``input_version``, differs
  from what its manifest row recorded) is redone and counted (``redone_replaced``); a row without them (a
  manifest written before they existed) is unknown, not different: it is trusted. Resume reads only
  six manifest columns, decides in Arrow, and learns which outputs exist from one listing of the
  output prefix, not one request per key. An output with no manifest row (its driver was killed between
  the write and the manifest flush) is redone, and counted (``unrecorded``);
- ``--overwrite`` deletes nothing here: the plan records the manifest folder's keys (``Plan.retire``) and the
  job deletes those once its own run completed.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from .. import annotations, io, manifest
from ..config import JobConfig


class PlanError(ValueError):
    """Input and output prefixes that cannot be used together; the message says why."""


TODO_SCHEMA = pa.schema([("input_uri", pa.string()), ("rel_path", pa.string()), ("output_uri", pa.string()),
                         ("error", pa.string()), ("notes", pa.string()), ("stale_output_uri", pa.string()),
                         ("input_size", pa.int64()), ("input_version", pa.string())])


@dataclass
class Plan:
    table: pa.Table = field(default_factory=TODO_SCHEMA.empty_table)  # rows for the first stage (TODO_SCHEMA)
    skipped: int = 0  # done earlier with the same settings
    redone_changed: int = 0  # done earlier under other anonymization settings: redone
    redone_replaced: int = 0  # done earlier, but the input was replaced since (same key, other content): redone
    renamed: int = 0  # given a distinct output key because their natural keys collide
    unrecorded: int = 0  # an output exists but no manifest row says how it was made (driver killed): redone
    refused: int = 0  # error rows made here (unsafe key, symlink out of the root, collision)
    # Paths the side tables (input.annotations, prompts.table) name that are not in the input listing:
    # {path, table, rows}; the job records one manifest error row for each (annotations.orphan_row), unless
    # the manifest's latest row for that path already says the same.
    orphans: list[dict] = field(default_factory=list)
    # --overwrite: the manifest folder's keys before this run (manifest.earlier_records); the job deletes
    # them once its own run completes, so a failed overwrite leaves the earlier manifest whole.
    retire: list[str] = field(default_factory=list)
    handed_over: int = 0  # rows given away by ``hand_over`` (still counted in ``num_todo``)

    @property
    def num_todo(self) -> int:
        return self.table.num_rows + self.handed_over

    def hand_over(self) -> pa.Table:
        """The rows, given away once: the plan keeps none, only their count. Whoever holds the plan for its
        counts (``run_job``, for the whole run) would otherwise keep every row on the driver: a few hundred bytes an
        input, GBs at 10M inputs, after the rows were put into the object store."""
        table, self.table = self.table, self.table.schema.empty_table()
        self.handed_over += table.num_rows
        return table

    @property
    def todo(self) -> list[dict]:
        """The rows as dicts (small plans and tests; the job hands ``table`` to Ray in blocks)."""
        if self.handed_over:
            raise RuntimeError("the plan's rows were handed over (Plan.hand_over): it keeps only their count")
        return self.table.to_pylist()


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


def _refuse_store_syntax(keys: list[str | None], errors: list[str | None], output_uri: str) -> None:
    """An output key holding what the output store's client reads as syntax (S3: ``?versionId=``) becomes
    that input's error: found in Arrow (join_uri already made every key a plain path under the prefix)."""
    outputs = io.Storage(output_uri)
    if not outputs.syntax:
        return
    column = pa.array(keys, pa.string())
    for mark in outputs.syntax:
        for i in pc.indices_nonzero(pc.fill_null(pc.match_substring(column, mark), False)).to_pylist():
            try:
                outputs.check(outputs.key_of(keys[i]))
            except io.InputError as exc:
                keys[i], errors[i] = None, str(exc)


KEY_CHUNK = 65_536  # inputs turned into output keys per Python pass: the keys live in Arrow, not in 10M str objects


def _chunk_keys(rels: list[str], output_uri: str, out_format: str, manifest_dir: str
                ) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Output key and error of each of ``rels`` (exactly one of the two set), collisions aside, and the key's
    ``hash`` (null without a key)."""
    keys: list[str | None] = [None] * len(rels)
    errors: list[str | None] = [None] * len(rels)
    reserved = io.join_uri(output_uri, manifest_dir).rstrip("/") + "/"
    for i, rel in enumerate(rels):
        try:
            key = io.join_uri(output_uri, io.output_rel_path(rel, out_format))
        except io.InputError as exc:
            errors[i] = str(exc)
            continue
        if key.startswith(reserved):
            errors[i] = f"output key {key} would lie inside the manifest folder {manifest_dir}/"
            continue
        keys[i] = key
    _refuse_store_syntax(keys, errors, output_uri)
    hashes = pa.array([None if key is None else hash(key) for key in keys], pa.int64())
    return pa.array(keys, pa.string()), pa.array(errors, pa.string()), hashes


def _set_at(column: pa.ChunkedArray, at: dict[int, str | None]) -> pa.ChunkedArray:
    """``column`` with the values of the few rows in ``at`` replaced."""
    rows = sorted(at)
    mask = np.zeros(len(column), bool)
    mask[rows] = True
    return pc.replace_with_mask(column, pa.array(mask), pa.array([at[i] for i in rows], pa.string()))


def output_key_columns(rel_paths: list[str] | pa.Array | pa.ChunkedArray, output_uri: str, out_format: str,
                       manifest_dir: str) -> tuple[pa.ChunkedArray, pa.ChunkedArray, pa.ChunkedArray]:
    """Per input (aligned with ``rel_paths``): output key, error, note, as Arrow string arrays. Exactly one of key and
    error is set. Keys are made ``KEY_CHUNK`` inputs at a time (no Python string per input outlives its chunk);
    collisions are found in Arrow and only their members renamed."""
    if isinstance(rel_paths, list):
        rel_paths = pa.array(rel_paths, pa.string())
    made = [_chunk_keys(rel_paths.slice(at, KEY_CHUNK).to_pylist(), output_uri, out_format, manifest_dir)
            for at in range(0, len(rel_paths), KEY_CHUNK)]
    # Chunked, not concatenated: one string array's 32-bit offsets end at 2 GiB of keys (10M long s3:// keys).
    keys = pa.chunked_array([k for k, _, _ in made], pa.string())
    errors = pa.chunked_array([e for _, e, _ in made], pa.string())
    hashes = pa.chunked_array([h for _, _, h in made], pa.int64())
    del made
    notes = pa.chunked_array([pa.nulls(len(k), pa.string()) for k in keys.chunks], pa.string())
    # Keys that repeat are looked for among their 8-byte hashes (a group-by over 10M whole keys held two more copies
    # of them: the plan's peak), then confirmed on the few keys whose hashes repeat.
    counts = pa.table({"h": hashes}).group_by("h").aggregate([("h", "count")])
    repeated = counts.filter(pc.and_(pc.is_valid(counts["h"]), pc.greater(counts["h_count"], 1)))["h"]
    del counts
    holders_of: dict[str, list[int]] = defaultdict(list)
    for i in pc.indices_nonzero(pc.fill_null(pc.is_in(hashes, value_set=repeated), False)).to_pylist():
        holders_of[keys[i].as_py()].append(i)
    del hashes
    size = {key: len(rows) for key, rows in holders_of.items() if len(rows) > 1}
    if not size:
        return keys, errors, notes
    members = sorted(i for key in size for i in holders_of[key])
    natural = {i: keys[i].as_py() for i in members}
    keys = _set_at(keys, {i: distinct_key(key, rel_paths[i].as_py()) for i, key in natural.items()})
    notes = _set_at(notes, {i: f"output key renamed: {size[key]} inputs map to {key}" for i, key in natural.items()})
    # A renamed key that meets another input's key (renamed or not): refuse every input that holds it.
    renamed = pa.array({keys[i].as_py() for i in members}, pa.string())
    holders: dict[str, list[int]] = defaultdict(list)
    for i in pc.indices_nonzero(pc.fill_null(pc.is_in(keys, value_set=renamed), False)).to_pylist():
        holders[keys[i].as_py()].append(i)
    clash = {i: key for key, rows in holders.items() if len(rows) > 1 for i in rows}
    if clash:
        keys = _set_at(keys, {i: None for i in clash})
        errors = _set_at(errors, {i: f"output key {key} collides with another input's key" for i, key in clash.items()})
        notes = _set_at(notes, {i: None for i in clash})
    return keys, errors, notes


def output_keys(rel_paths: list[str], output_uri: str, out_format: str, manifest_dir: str
                ) -> dict[str, tuple[str | None, str | None, str | None]]:
    """rel_path -> (output key, error, note): ``output_key_columns`` keyed by input (small lists: tests, tools)."""
    columns = output_key_columns(rel_paths, output_uri, out_format, manifest_dir)
    return dict(zip(rel_paths, zip(*(c.to_pylist() for c in columns))))


def _existing_outputs(output_uri: str) -> pa.ChunkedArray:
    """Keys of every object under the output prefix: one listing (paged by the store), not one request per
    key. Temporary files of local writes cut short (a merge worker killed mid-write) are deleted on the way
    (no other run writes this prefix now: the job holds its lease, ``lease.py``)."""
    outputs = io.Storage(output_uri)
    chunks, keys = [], []
    for key in outputs.list():
        if io.PARTIAL_WRITE.search(key):  # a write its worker never finished (killed): not an output
            outputs.remove(key)
            continue
        keys.append(key)
        if len(keys) == KEY_CHUNK:  # into Arrow as it goes: 10M keys as Python strings were ~1 GiB
            chunks.append(pa.array(keys, pa.string()))
            keys = []
    chunks.append(pa.array(keys, pa.string()))
    return pa.chunked_array(chunks, pa.string())


PROBE_STEP = 1 << 21  # keys made the value set of one membership test: ~2M strings, not the 10M of a listing


def _present(keys: pa.ChunkedArray, listed: pa.ChunkedArray, strip: int = 0) -> pa.ChunkedArray:
    """Per key (its first ``strip`` characters dropped): whether ``listed`` holds it; null keys are not present.
    A membership test builds a hash table of its value set, and one over 10M listed strings was the plan's peak;
    here the value set is ``PROBE_STEP`` keys at a time, ``listed`` is probed against each, and only what it
    matched is kept."""
    out = []
    for at in range(0, len(keys), PROBE_STEP):
        part = keys.slice(at, PROBE_STEP)
        if strip:
            part = pc.utf8_slice_codeunits(part, strip)
        matched = listed.filter(pc.is_in(listed, value_set=part.drop_null()))
        out.extend(pc.fill_null(pc.is_in(part, value_set=matched), False).chunks)
    return pa.chunked_array(out, pa.bool_())


def _unsaid(orphans: list[dict], said: pa.Table, input_uri: str, fingerprint: str) -> list[dict]:
    """The ``orphans`` whose row (``annotations.orphan_row``) is not already the latest error row of its path."""
    rows = [annotations.orphan_row(o, input_uri, "", fingerprint) for o in orphans]
    hashes = manifest.uri_hashes(pa.array([r["input_uri"] for r in rows], pa.string()))  # as ``said`` holds them
    known = {(u, e) for u, e in zip(*(said.filter(pc.is_in(said["input_hash"], value_set=hashes))[c].to_pylist()
                                      for c in ("input_hash", "error")))}
    return [o for o, r, h in zip(orphans, rows, hashes.to_pylist()) if (h, r["error"]) not in known]


def _differs(recorded: pa.ChunkedArray, listed: pa.Array) -> pa.Array:
    """Whether both are known and differ (a null on either side is unknown: not a difference)."""
    return pc.fill_null(pc.not_equal(recorded, listed), False)


RESUME_STEP = 1 << 20  # listed inputs compared with their done rows at a time


@dataclass
class _Against:
    """Per listed input, against its done row: there is one; it was made under the same settings; it wrote the same
    output key; the input was replaced since (same key, other size or change marker); the earlier output to delete
    (a key no input writes now: a changed format, a refused input), else null."""
    has_prev: pa.ChunkedArray
    same_fp: pa.ChunkedArray
    same_key: pa.ChunkedArray
    replaced: pa.ChunkedArray
    stale_key: pa.ChunkedArray


def _against_done(latest: pa.Table, at: pa.ChunkedArray, writes: pa.ChunkedArray, files: pa.Table,
                  fingerprint: str) -> _Against:
    """``at``: each listed input's done row in ``latest`` (null: none). ``RESUME_STEP`` inputs at a time: the done
    rows' columns taken for 10M inputs at once were ~0.9 GB held beside the listing, the plan's peak."""
    prev = latest.select(["output_uri", "settings_fingerprint", "input_size", "input_version"])
    parts: dict[str, list[pa.ChunkedArray]] = defaultdict(list)
    moved_at, moved_keys = [pa.array([], pa.uint64())], []
    for start in range(0, len(at), RESUME_STEP):
        rows, listed = prev.take(at.slice(start, RESUME_STEP)), files.slice(start, RESUME_STEP)
        has_prev = pc.is_valid(rows["output_uri"])
        same_key = pc.fill_null(pc.equal(rows["output_uri"], writes.slice(start, RESUME_STEP)), False)
        parts["has_prev"].append(has_prev)
        parts["same_key"].append(same_key)
        parts["same_fp"].append(pc.fill_null(pc.equal(rows["settings_fingerprint"], pa.scalar(fingerprint)), False))
        parts["replaced"].append(pc.or_(_differs(rows["input_size"], listed["size"]),
                                        _differs(rows["input_version"], listed["version"])))
        moved = pc.indices_nonzero(pc.and_(has_prev, pc.invert(same_key)))  # few on a resume
        moved_at.append(pc.add(moved, pa.scalar(start, moved.type)))
        moved_keys.extend(rows["output_uri"].take(moved).chunks)
    moved_keys = pa.chunked_array(moved_keys, pa.string())
    stale = pc.invert(_present(moved_keys, writes))  # the earlier key is no input's key now
    stale_key = pa.chunked_array([pa.nulls(len(at), pa.string())])
    if pc.any(stale).as_py():
        mask = np.zeros(len(at), bool)
        mask[pa.concat_arrays(moved_at).filter(stale.combine_chunks()).to_numpy()] = True
        stale_key = pc.replace_with_mask(stale_key, pa.array(mask), moved_keys.filter(stale).combine_chunks())
    return _Against(stale_key=stale_key, **{name: pa.chunked_array([c for part in parts[name] for c in part.chunks],
                                                                    pa.bool_())
                                            for name in ("has_prev", "same_fp", "same_key", "replaced")})


def make_plan(cfg: JobConfig, input_uri: str, output_uri: str, fingerprint: str) -> Plan:
    out_cfg = cfg.output
    exclude = output_exclusion(input_uri, output_uri)
    # The earlier outcomes are read even with --overwrite: an output at a key this run no longer writes
    # is deleted either way. Only the resume columns are read, and the decisions are made in Arrow.
    sides = cfg.input.mode == "annotations" or bool(cfg.prompts.table) or bool(cfg.pseudonyms.table)
    latest = manifest.latest_outcomes(output_uri, out_cfg.manifest_dir,
                                      manifest.RESUME_COLUMNS + (["error"] if sides else []), hashed=True)
    retire = manifest.earlier_records(output_uri, out_cfg.manifest_dir) if out_cfg.overwrite else []
    files = io.list_inputs_table(input_uri, cfg.input.extensions, exclude_uri=exclude or output_uri)
    if exclude is not None:
        inside = pc.starts_with(pc.binary_join_element_wise(files["uri"], "/", ""), exclude.rstrip("/") + "/")
        if pc.any(inside).as_py():
            example = files["uri"].filter(inside)[0].as_py()
            raise PlanError(f"the input listing did not exclude the output prefix {output_uri} (e.g. {example})")
    keys, key_errors, notes = output_key_columns(files["rel_path"], output_uri, out_cfg.format, out_cfg.manifest_dir)
    # Without a listed skip reason (the usual case) the keys are the writes as they are (exactly one of key and
    # error is set): no second copy of 10M keys.
    skipped_in_listing = files["skip_reason"].null_count < files.num_rows
    errors = pc.coalesce(files["skip_reason"], key_errors) if skipped_in_listing else key_errors
    writes = pc.if_else(pc.is_valid(errors), pa.scalar(None, pa.string()), keys) if skipped_in_listing else keys
    del keys, key_errors
    # Each listed input's latest row (null where none), found by a lookup in a hash of the manifest's inputs, in
    # the listing's order; only done rows are taken, and no copy of ``latest`` is made on the way (at 10M inputs the
    # copies were the driver's peak).
    at = pc.index_in(manifest.uri_hashes(files["uri"]), value_set=latest["input_hash"])
    recorded = pc.is_valid(at)  # any manifest row at all
    said = latest.filter(pc.equal(latest["status"], "error")).select(["input_hash", "error"]) if sides else None
    done = pc.and_(pc.is_in(latest["status"], pa.array(manifest.DONE_STATUSES)), pc.is_valid(latest["output_uri"]))
    at = pc.if_else(pc.fill_null(pc.take(done, at), False), at, pa.scalar(None, at.type))
    against = _against_done(latest, at, writes, files, fingerprint)
    del latest, done, at
    has_prev, same_fp, same_key, replaced = against.has_prev, against.same_fp, against.same_key, against.replaced
    skip = (pa.array(np.zeros(files.num_rows, bool)) if out_cfg.overwrite or not pc.any(has_prev).as_py()
            else pc.and_(pc.and_(same_key, same_fp), pc.invert(replaced)))
    # One listing of the output prefix: an output counts as done only if it is still there, and an output
    # with no manifest row (a driver killed between the write and the manifest flush) is redone.
    root = output_uri.rstrip("/") + "/"
    if out_cfg.overwrite:  # everything is redone: nothing to learn from the listing
        exists = pa.array(np.zeros(files.num_rows, bool))
    else:
        exists = _present(writes, _existing_outputs(output_uri), strip=len(root))
    skip = pc.and_(skip, exists)
    unrecorded = pc.and_(exists, pc.invert(recorded))
    changed = pc.and_(pc.and_(has_prev, pc.invert(same_fp)), pc.is_valid(writes))
    keep = pc.invert(skip)
    table = pa.table({"input_uri": files["uri"], "rel_path": files["rel_path"], "output_uri": writes,
                      "error": errors, "notes": notes,
                      "stale_output_uri": against.stale_key,
                      "input_size": files["size"], "input_version": files["version"]},
                     schema=TODO_SCHEMA)
    # The side tables are joined in on the driver, before resume's filter (so rows for inputs that are done
    # are not taken for rows naming missing images): each input row carries its own table rows (annotations.py).
    try:
        table, orphans = annotations.attach(cfg, table)
    except annotations.TableError as exc:
        raise PlanError(str(exc)) from None
    table = table.filter(keep)
    if orphans and not out_cfg.overwrite:  # written once: a resumed run does not repeat (and recount) them
        orphans = _unsaid(orphans, said, input_uri, fingerprint)
    redone_replaced = pc.and_(pc.and_(replaced, same_fp), same_key)
    return Plan(table=table, orphans=orphans, retire=retire, skipped=pc.sum(skip).as_py() or 0,
                redone_changed=0 if out_cfg.overwrite else (pc.sum(changed).as_py() or 0),
                redone_replaced=0 if out_cfg.overwrite else (pc.sum(redone_replaced).as_py() or 0),
                unrecorded=0 if out_cfg.overwrite else (pc.sum(unrecorded).as_py() or 0),
                renamed=pc.sum(pc.and_(pc.is_valid(table["notes"]), pc.is_null(table["error"]))).as_py() or 0,
                refused=pc.sum(pc.is_valid(table["error"])).as_py() or 0)
