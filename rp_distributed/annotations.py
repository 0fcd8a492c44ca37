"""Side tables keyed by input path: face annotations (``input.mode: annotations``), attribute
prompts per image or per face (``prompts.table``) and subjects (``pseudonyms.table``).

Both are read once, on the driver, with pyarrow (Parquet, CSV or JSON lines, through fsspec, so ``s3://``
works), and **joined into the plan**: each plan row carries its own table rows as a small ``list<struct>``
column (``annotations``, ``prompts``, ``subjects``; null when the table has no row for it), shipped with it in the plan's
32-input blocks. At 10M images this costs the driver one vectorized join (index_in, a stable sort, offsets)
and a few tens of bytes per face in the object store, where reading the table in every DetectFaces actor
would cost each actor the whole table's memory and a full read. Table rows that name no listed input are
returned apart (``Joined.orphans``); the job records one manifest row per such path.

Keys: a table's path column is matched against the input's ``rel_path`` (relative to the input prefix, with a
leading ``./`` or ``/`` ignored) and against its full URI. Row numbers in reasons count the table's data rows
from 0 (a CSV's header is not a row).

What is checked where: the driver checks what needs no image (numbers that do not parse, a template field that
is missing); the worker (``faces.annotated.faces_from_rows``) checks what needs the image (a box outside it). A bad row never
fails the job: it is reported in the image's ``notes`` (or, when it names a face we cannot locate, the image is
withheld: fail closed).
"""

from __future__ import annotations

import posixpath
import re
import string
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import io, manifest
from .faces.annotated import BOX
from .records import Status

ANNOTATION = pa.struct([("row", pa.int64()), ("x0", pa.float64()), ("y0", pa.float64()), ("x1", pa.float64()),
                        ("y1", pa.float64()), ("score", pa.float64()), ("landmarks", pa.list_(pa.float64())),
                        ("error", pa.string())])
PROMPT = pa.struct([("row", pa.int64()), ("face_index", pa.int64()), ("x0", pa.float64()), ("y0", pa.float64()),
                    ("x1", pa.float64()), ("y1", pa.float64()), ("prompt", pa.string()), ("error", pa.string())])
# A subject table's row: the subject itself stays on the driver; the plan carries HMAC(key, subject) only.
SUBJECT = pa.struct([("row", pa.int64()), ("face_index", pa.int64()), ("x0", pa.float64()), ("y0", pa.float64()),
                     ("x1", pa.float64()), ("y1", pa.float64()), ("pseudonym", pa.string()), ("error", pa.string())])


class TableError(ValueError):
    """A side table that cannot be used at all (unreadable, no path column): a start-up error naming it."""


# -- reading ----------------------------------------------------------------------------------------------

def read_table(uri: str, what: str, text_columns: tuple[str, ...] = (), secret_cells: bool = False) -> pa.Table:
    """The table at ``uri`` by its extension: ``.parquet``/``.pq``, ``.csv``, ``.jsonl``/``.ndjson``/``.json``
    (JSON lines). ``what`` names the config key in errors; ``text_columns`` are read as text from a CSV (a path
    such as ``007`` must not become the integer 7). ``secret_cells``: a parser's error (which can quote the offending
    row) is reported by its kind only, so that no cell reaches a log."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    name = uri.lower().rsplit("?", 1)[0]
    try:
        fs, path = io.filesystem(uri)
        with fs.open(path, "rb") as f:
            if name.endswith((".parquet", ".pq")):
                return pq.read_table(f)
            if name.endswith(".csv"):
                types = {c: pa.string() for c in text_columns}
                return pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=types))
            if name.endswith((".jsonl", ".ndjson", ".json")):
                return pajson.read_json(f)
    except Exception as exc:  # noqa: BLE001 - say which key and file
        detail = type(exc).__name__ if secret_cells else f"{type(exc).__name__}: {exc}"
        raise TableError(f"{what}: cannot read {uri}: {detail}"[:500]) from None
    raise TableError(f"{what}: {uri} is not a .parquet, .csv or .jsonl table")


# -- columns ----------------------------------------------------------------------------------------------

def _floats(table: pa.Table, name: str, errors: list) -> pa.Array:
    """Column ``name`` as float64 (nulls where absent); a text value that is not a number is an error of its row."""
    n = table.num_rows
    if name not in table.column_names:
        return pa.nulls(n, pa.float64())
    col = table[name].combine_chunks()
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_null(col.type):
        return pc.cast(col, pa.float64())
    out = []
    for i, v in enumerate(col.to_pylist()):  # text (a CSV column with a bad cell): row by row
        try:
            out.append(None if v is None or v == "" else float(v))
        except (TypeError, ValueError):
            errors[i] = _join(errors[i], f"{name}={v!r} is not a number")
            out.append(None)
    return pa.array(out, pa.float64())


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", re.IGNORECASE)


def _landmarks(table: pa.Table, errors: list) -> pa.Array:
    """The optional ``landmarks`` column as one flat ``list<float64>`` per row: a list of numbers, a list of
    [x, y] points (Parquet, JSON lines), or text of numbers ("x y x y ...", "[[x, y], ...]": CSV)."""
    n = table.num_rows
    typ = pa.list_(pa.float64())
    if "landmarks" not in table.column_names:
        return pa.nulls(n, typ)
    col = table["landmarks"].combine_chunks()
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if pa.types.is_fixed_size_list(t):
            col = pc.cast(col, pa.list_(t.value_type))
        inner = col.type.value_type
        if pa.types.is_list(inner) or pa.types.is_large_list(inner) or pa.types.is_fixed_size_list(inner):
            if pa.types.is_fixed_size_list(inner):
                col = pc.cast(col, pa.list_(pa.list_(inner.value_type)))
            # [[x, y], ...]: point lists flattened per row, vectorized (outer offsets into inner offsets)
            outer = np.asarray(col.offsets)
            points = col.values
            offsets = np.asarray(points.offsets)[outer]
            flat = pc.cast(points.values, pa.float64())
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat, mask=col.is_null())
        return pc.cast(col, typ)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        out = []
        for v in col.to_pylist():
            out.append(None if not v else [float(x) for x in _NUMBER.findall(v)])
        return pa.array(out, typ)
    for i in range(n):
        errors[i] = _join(errors[i], f"landmarks column of type {t} is not numbers: ignored")
    return pa.nulls(n, typ)


def _join(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None


def annotation_structs(table: pa.Table) -> pa.Array:
    """``ANNOTATION`` structs of an annotations table's rows, in table order."""
    errors: list[str | None] = [None] * table.num_rows
    for k in BOX:
        if k not in table.column_names:
            raise TableError(f"input.annotations: the table has no {k} column (needs x0, y0, x1, y1)")
    cols = {k: _floats(table, k, errors) for k in BOX}
    score = _floats(table, "score", errors)
    lms = _landmarks(table, errors)
    return pa.StructArray.from_arrays(
        [pa.array(np.arange(table.num_rows)), *cols.values(), score, lms, pa.array(errors, pa.string())],
        fields=list(ANNOTATION))


def prompt_structs(table: pa.Table, prompt_column: str, template: str | None) -> pa.Array:
    """``PROMPT`` structs of a prompt table's rows: the prompt column, or ``template`` filled per row."""
    n = table.num_rows
    errors: list[str | None] = [None] * n
    if template is None:
        if prompt_column not in table.column_names:
            raise TableError(f"prompts.table: no {prompt_column!r} column (prompts.prompt_column) and no "
                             "prompts.template")
        prompts = pc.cast(table[prompt_column].combine_chunks(), pa.string()).to_pylist()
        for i, p in enumerate(prompts):
            if p is None:
                errors[i] = f"{prompt_column} is empty"
    else:
        names = sorted({f for _, f, _, _ in string.Formatter().parse(template) if f})
        absent = [k for k in names if k not in table.column_names]
        if absent:
            raise TableError(f"prompts.template names column(s) {absent} the table does not have")
        values = {k: table[k].to_pylist() for k in names}
        prompts = []
        for i in range(n):
            row = {k: values[k][i] for k in names}
            missing = [k for k, v in row.items() if v is None or v == ""]
            if missing:
                errors[i] = f"template field(s) {missing} empty"
                prompts.append(None)
            else:
                prompts.append(template.format_map(row))
    face_index = _face_indexes(table, errors)
    boxes = [_floats(table, k, errors) for k in BOX]
    return pa.StructArray.from_arrays(
        [pa.array(np.arange(n)), face_index, *boxes, pa.array(prompts, pa.string()), pa.array(errors, pa.string())],
        fields=list(PROMPT))


def _face_indexes(table: pa.Table, errors: list) -> pa.Array:
    """The optional ``face_index`` column as int64; a cell that is not a whole number >= 0 is an error of its row
    (the row is then ignored, never applied to every face)."""
    n = table.num_rows
    if "face_index" not in table.column_names:
        return pa.nulls(n, pa.int64())
    col = table["face_index"].combine_chunks()
    if pa.types.is_integer(col.type) or pa.types.is_null(col.type):
        values = pc.cast(col, pa.int64()).to_pylist()
    else:
        values = col.to_pylist()
    out = []
    for i, v in enumerate(values):
        if v is None or v == "" or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
            continue
        try:
            f = float(v)
            ok = f.is_integer() and f >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            errors[i] = _join(errors[i], f"face_index={v!r} is not a face number (0, 1, ...)")
        out.append(int(f) if ok else None)
    return pa.array(out, pa.int64())


def subject_structs(table: pa.Table, subject_column: str, key: bytes) -> pa.Array:
    """``SUBJECT`` structs of a subject table's rows: each subject as ``HMAC-SHA256(key, subject)`` (computed once
    per distinct subject), a row without one reported."""
    from .pseudonyms import subject_digest

    n = table.num_rows
    if subject_column not in table.column_names:
        raise TableError(f"pseudonyms.table: no {subject_column!r} column (pseudonyms.subject_column)")
    errors: list[str | None] = [None] * n
    subjects = pc.cast(table[subject_column].combine_chunks(), pa.string())
    distinct = pc.unique(subjects).to_pylist()
    digests = pa.array([subject_digest(key, s) if s and s.strip() else None for s in distinct], pa.string())
    pseudonym = digests.take(pc.index_in(subjects, value_set=pa.array(distinct, pa.string())))
    for i in np.flatnonzero(pc.is_null(pseudonym).to_numpy(zero_copy_only=False)):
        errors[i] = f"{subject_column} is empty"
    face_index = _face_indexes(table, errors)
    boxes = [_floats(table, k, errors) for k in BOX]
    return pa.StructArray.from_arrays(
        [pa.array(np.arange(n)), face_index, *boxes, pseudonym, pa.array(errors, pa.string())], fields=list(SUBJECT))


# -- the join into the plan -------------------------------------------------------------------------------

@dataclass
class Joined:
    column: pa.Array  # list<struct> per input (null: the table has no row for it)
    orphans: list[tuple[str, list[int]]] = field(default_factory=list)  # (path as written, rows) not listed
    more_orphans: int = 0  # further such paths, beyond MAX_ORPHAN_PATHS, counted only


# Paths named by a table but not in the input get a manifest row each, up to this many per table; the last row
# counts the rest (a table keyed the wrong way would otherwise add a row per image it names).
MAX_ORPHAN_PATHS = 10_000


def _key(path: str) -> str:
    p = path.replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return posixpath.normpath(p.lstrip("/")) if not re.match(r"^[a-z][a-z0-9+.-]*://", p) else p


def join(keys: pa.ChunkedArray | pa.Array, structs: pa.Array, rel_paths: pa.Array, input_uris: pa.Array) -> Joined:
    """Group ``structs`` (aligned with ``keys``) by the input they name: a ``list<struct>`` column aligned with
    ``rel_paths``/``input_uris`` (the plan's listing), and the rows that name no listed input."""
    n = len(rel_paths)
    keys = pc.cast(keys, pa.string())
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    by_uri = pc.index_in(keys, value_set=input_uris)  # full URIs (and local absolute paths) as listed
    by_rel = pc.index_in(keys, value_set=rel_paths)
    at = pc.coalesce(by_uri, by_rel)
    loose = pc.is_null(at)
    if pc.any(loose).as_py():  # "./a.jpg", "/a.jpg", "a//b.jpg": normalised, then matched again
        fixed = pa.array([_key(k) if k is not None else None for k in keys.filter(loose).to_pylist()], pa.string())
        refound = pc.index_in(fixed, value_set=rel_paths).to_numpy(zero_copy_only=False)
        full = at.to_numpy(zero_copy_only=False).astype(float)
        full[np.flatnonzero(loose.to_numpy(zero_copy_only=False))] = refound
        at = pa.array(full, mask=np.isnan(full)).cast(pa.int64())
    valid = pc.is_valid(at)
    orphans: list[tuple[str, list[int]]] = []
    missing = pc.invert(valid)
    more = 0
    if pc.any(missing).as_py():  # grouped in Arrow: a table keyed the wrong way can miss every image
        lost = pa.table({"k": keys.filter(missing), "row": pa.array(np.flatnonzero(missing.to_numpy(zero_copy_only=False)))})
        groups = lost.group_by("k", use_threads=False).aggregate([("row", "list")])
        more = max(groups.num_rows - MAX_ORPHAN_PATHS, 0)
        groups = groups.slice(0, MAX_ORPHAN_PATHS)
        orphans = [(k if k is not None else "(empty path)", rows)
                   for k, rows in zip(groups["k"].to_pylist(), groups["row_list"].to_pylist())]
    idx = at.filter(valid).to_numpy()
    kept = structs.filter(valid)
    order = np.argsort(idx, kind="stable")  # table order within an input
    counts = np.bincount(idx, minlength=n) if len(idx) else np.zeros(n, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets), kept.take(pa.array(order)), mask=pa.array(counts == 0))
    return Joined(column=column, orphans=orphans, more_orphans=more)


def attach(cfg, table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """The plan's listing ``table`` (``input_uri``, ``rel_path``) with the side tables the config names joined
    in as columns, and one record per path the tables name that is not listed (``{path, table, rows}``)."""
    orphans: list[dict] = []
    sides = []
    if cfg.input.mode == "annotations":
        key = cfg.input.annotations_path_column
        t = read_table(cfg.input.annotations, "input.annotations", (key,))
        if key not in t.column_names:
            raise TableError(f"input.annotations: {cfg.input.annotations} has no {key!r} column "
                             "(input.annotations_path_column)")
        sides.append(("annotations", cfg.input.annotations, t[key], annotation_structs(t)))
    if cfg.prompts.table and cfg.anonymizer.method == "reverse_personalization":
        p = cfg.prompts
        t = read_table(p.table, "prompts.table", (p.path_column, p.prompt_column))
        if p.path_column not in t.column_names:
            raise TableError(f"prompts.table: {p.table} has no {p.path_column!r} column (prompts.path_column)")
        sides.append(("prompts", p.table, t[p.path_column], prompt_structs(t, p.prompt_column, p.template)))
    if cfg.pseudonyms.table:  # any method: destructive ones still record pseudonym_id
        from .pseudonyms import read_key

        q = cfg.pseudonyms
        t = read_table(q.table, "pseudonyms.table", (q.path_column, q.subject_column), secret_cells=True)
        if q.path_column not in t.column_names:
            raise TableError(f"pseudonyms.table: {q.table} has no {q.path_column!r} column (pseudonyms.path_column)")
        sides.append(("subjects", q.table, t[q.path_column], subject_structs(t, q.subject_column, read_key(q))))
    for name, uri, keys, structs in sides:
        joined = join(keys, structs, table["rel_path"].combine_chunks(), table["input_uri"].combine_chunks())
        table = table.append_column(name, joined.column)
        found = [{"path": k, "table": uri, "rows": rows} for k, rows in joined.orphans]
        if joined.more_orphans:
            found[-1]["more"] = joined.more_orphans
        orphans.extend(found)
    return table, orphans


def orphan_row(orphan: dict, input_uri: str, run_id: str, fingerprint: str) -> dict:
    """The manifest row of a path a side table names that is not in the input (status error, nothing written)."""
    path = orphan["path"]
    uri = path
    if not re.match(r"^[a-z][a-z0-9+.-]*://", path) and not path.startswith("/"):
        try:
            uri = io.join_uri(input_uri, _key(path))
        except io.InputError:  # a path leaving the input prefix: recorded as written
            pass
    rows = orphan["rows"]
    shown = ", ".join(map(str, rows[:20])) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
    error = f"{orphan['table']}: row(s) {shown} name an image that is not in the input: ignored"
    if orphan.get("more"):
        error += f"; {orphan['more']} more paths of this table are not in the input (not listed one by one)"
    return manifest.image_row(run_id, fingerprint, uri, path, Status.ERROR, error)
