"""``rp-anonymize subjects``: the Ray Data job that finds every face under an input prefix, describes it with the
recognizer and clusters the descriptors into subjects, writing the subject table the anonymization job reads.

    listing (the job's) -> DescribeFaces (CPU actor pool, detection.resources) -> driver spool -> cluster -> table

The driver keeps no Python object per face: each batch's descriptors are appended to a float32 file and its face
rows (path, index, box) to a Parquet file, both in a local work folder. At the end the faces are put in table order
(path, face_index), their descriptors rewritten in that order (so the clustering, and the subject names, do not
depend on which worker finished first), clustered (``cluster.cluster``, the descriptors read through a memmap)
and the table written. Inputs that cannot be read, are withheld by detection or have no face are no rows: they are
counted, and their reasons listed (``SubjectsResult.errors``).
"""

from __future__ import annotations

import array
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import io
from ..config import JobConfig
from .cluster import ClusterParams, cluster, subject_names
from .describe import RECOGNIZERS, DescribeFaces, SubjectSettings

TABLE_SCHEMA = pa.schema([("path", pa.string()), ("face_index", pa.int64()), ("x0", pa.float64()),
                          ("y0", pa.float64()), ("x1", pa.float64()), ("y1", pa.float64()), ("subject", pa.string())])
FACE_COLUMNS = ("path", "face_index", "x0", "y0", "x1", "y1")
IMAGE_COLUMNS = ("path", "status", "error", "faces", "undescribed")
LOST = ("lost: its worker died on every retry, with its block and alone (a native crash or an out-of-memory kill; see "
        "the Ray worker logs)")


@dataclass
class SubjectsResult:
    table_uri: str
    listed: int = 0
    with_faces: int = 0
    no_face: int = 0
    errors: int = 0  # unreadable, refused at listing, withheld by detection, or lost
    faces: int = 0  # described faces: the table's rows
    undescribed: int = 0  # faces found with no descriptor: no row (they get a per-face pseudonym)
    subjects: int = 0
    subjects_multi: int = 0  # subjects with two faces or more
    largest: int = 0
    error_rows: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), the first MAX_LISTED
    t_describe_s: float = 0.0
    t_cluster_s: float = 0.0

    def text(self) -> str:
        lines = [f"subjects: {self.table_uri}",
                 f"  inputs listed {self.listed}: with faces {self.with_faces}, no face {self.no_face}, "
                 f"errors {self.errors}",
                 f"  faces {self.faces} (no descriptor: {self.undescribed}, not in the table)",
                 f"  subjects {self.subjects} ({self.subjects_multi} with 2+ faces, largest {self.largest})",
                 f"  time: detection and descriptors {self.t_describe_s:.1f} s, clustering {self.t_cluster_s:.1f} s"]
        lines += [f"  error: {p}: {r}" for p, r in self.error_rows]
        if self.errors > len(self.error_rows):
            lines.append(f"  ... and {self.errors - len(self.error_rows)} more errors")
        return "\n".join(lines)


MAX_LISTED = 50  # errors printed one by one; the rest are counted


class Spool:
    """The stage's output on local disk as it streams in: descriptors (raw float32) and face and input rows."""

    def __init__(self, folder: str, dim: int):
        self.folder, self.dim, self.faces = folder, dim, 0
        self.seen = array.array("q")  # hashes of the finished inputs' paths: 8 bytes an input
        self.vectors = open(os.path.join(folder, "descriptors.f32"), "wb")
        self.face_rows = pq.ParquetWriter(os.path.join(folder, "faces.parquet"), _schema(FACE_COLUMNS))
        self.image_rows = pq.ParquetWriter(os.path.join(folder, "images.parquet"), _schema(IMAGE_COLUMNS))

    def add(self, batch: dict) -> int:
        """Spool one batch; returns the inputs it finished."""
        is_face = np.asarray(batch["face_index"]) >= 0
        vectors = np.asarray(batch["descriptor"], np.float32).reshape(len(is_face), self.dim)[is_face]
        self.vectors.write(np.ascontiguousarray(vectors).tobytes())
        self.faces += len(vectors)
        self.face_rows.write_table(_table(batch, FACE_COLUMNS, is_face))
        self.image_rows.write_table(_table(batch, IMAGE_COLUMNS, ~is_face))
        self.seen.extend(hash(p) for p in np.asarray(batch["path"])[~is_face])
        return int((~is_face).sum())

    def unfinished(self, plan: pa.Table) -> pa.Table:
        """The rows of ``plan`` that no input row came back for (their block's worker died every time)."""
        hashes = np.fromiter((hash(p) for p in plan["rel_path"].to_pylist()), np.int64, plan.num_rows)
        return plan.filter(pa.array(~np.isin(hashes, np.frombuffer(self.seen, np.int64))))

    def close(self) -> None:
        self.vectors.close()
        self.face_rows.close()
        self.image_rows.close()


def _schema(names) -> pa.Schema:
    types = {"path": pa.string(), "status": pa.string(), "error": pa.string(), "face_index": pa.int64(),
             "faces": pa.int64(), "undescribed": pa.int64()}
    return pa.schema([(n, types.get(n, pa.float64())) for n in names])


def _table(batch: dict, names, keep: np.ndarray) -> pa.Table:
    schema = _schema(names)
    return pa.table([pa.array(np.asarray(batch[n])[keep].tolist(), schema.field(n).type) for n in names],
                    schema=schema)


def _listing(cfg: JobConfig, input_uri: str) -> pa.Table:
    """The job's listing as plan rows (``input_uri``, ``rel_path``, ``error``; annotations mode's boxes joined as the
    anonymization job joins them). Prompts and subjects are not read: the subject table may be the one this command
    is about to write (one config for both commands), and its key is no business of this command."""
    from ..annotations import attach

    files = io.list_inputs_table(input_uri, cfg.input.extensions)
    table = pa.table({"input_uri": files["uri"], "rel_path": files["rel_path"], "error": files["skip_reason"]})
    boxes_only = cfg.model_copy(update={"prompts": type(cfg.prompts)(), "pseudonyms": type(cfg.pseudonyms)()})
    return attach(boxes_only, table)[0]


def _describe_on_ray(cfg: JobConfig, plan: pa.Table, inputs: io.Storage, recognizer: str, spool: Spool,
                     progress: bool, verbose: bool) -> None:
    import ray
    from tqdm import tqdm

    from ..job.dataset import StageSpec, build_dataset, put_blocks
    from ..job.ray_session import ensure_ray

    ensure_ray(cfg, verbose)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.max_errored_blocks = -1  # a block whose worker always dies: its inputs are reported lost, the rest go on
    spec = StageSpec("describe", DescribeFaces, SubjectSettings, lambda c: c.detection.resources,
                     ("input_uri", "rel_path", "error"), (inputs, recognizer))
    bar = tqdm(total=plan.num_rows, unit="img", desc="faces", disable=not progress)
    try:
        for batch in build_dataset(cfg, put_blocks(plan), [spec]).iter_batches(batch_format="numpy", batch_size=None):
            bar.update(spool.add(batch))
            bar.set_postfix(faces=spool.faces)
        lost = spool.unfinished(plan)
        if lost.num_rows:  # one by one: a poison input costs only itself (reported lost), not its block
            alone = build_dataset(cfg, put_blocks(lost, rows_per_block=1), [spec], isolate=True)
            for batch in alone.iter_batches(batch_format="numpy", batch_size=None):
                bar.update(spool.add(batch))
    finally:
        bar.close()


def _outcomes(folder: str, plan: pa.Table, result: SubjectsResult) -> None:
    """Counts and reasons from the input rows; a listed input with no row was lost with its worker."""
    images = pq.read_table(os.path.join(folder, "images.parquet"))
    if images.num_rows:  # each input once (a retried task may have delivered its row twice)
        images = images.group_by("path", use_threads=False).aggregate(
            [(c, "first") for c in IMAGE_COLUMNS[1:]]).rename_columns(list(IMAGE_COLUMNS))
    seen = pc.is_in(plan["rel_path"], value_set=images["path"])
    lost = plan["rel_path"].filter(pc.invert(seen)).to_pylist()
    status = images["status"]
    result.with_faces = pc.sum(pc.equal(status, "ok")).as_py() or 0
    result.no_face = pc.sum(pc.equal(status, "no_face")).as_py() or 0
    result.undescribed = pc.sum(images["undescribed"]).as_py() or 0
    bad = images.filter(pc.invert(pc.is_in(status, value_set=pa.array(["ok", "no_face"]))))
    result.errors = bad.num_rows + len(lost)
    listed = [(p, f"{s}: {e}") for p, s, e in zip(*(bad[c].slice(0, MAX_LISTED).to_pylist()
                                                   for c in ("path", "status", "error")))]
    result.error_rows = sorted(listed + [(p, LOST) for p in lost[:MAX_LISTED]])[:MAX_LISTED]


def _table_order(faces: pa.Table) -> np.ndarray:
    """Row numbers of ``faces`` in table order (path, face_index), each face once: a retried task may have
    delivered an input's rows twice (the same face, the same descriptor)."""
    order = pc.sort_indices(faces, sort_keys=[("path", "ascending"), ("face_index", "ascending")]).to_numpy()
    path = faces["path"].take(pa.array(order)).to_numpy(zero_copy_only=False)
    index = faces["face_index"].to_numpy()[order]
    first = np.ones(len(order), bool)
    first[1:] = (path[1:] != path[:-1]) | (index[1:] != index[:-1])
    return order[first]


def cluster_spool(folder: str, dim: int, params: ClusterParams, result: SubjectsResult) -> pa.Table:
    """The subject table of the spooled faces, in table order (path, face_index)."""
    faces = pq.read_table(os.path.join(folder, "faces.parquet"))
    if faces.num_rows == 0:  # nothing to cluster (and no file to map)
        return faces.append_column("subject", pa.array([], pa.string())).cast(TABLE_SCHEMA)
    order = _table_order(faces)
    raw = np.memmap(os.path.join(folder, "descriptors.f32"), np.float32, "r", shape=(faces.num_rows, dim))
    ordered_path = os.path.join(folder, "ordered.f32")
    with open(ordered_path, "wb") as out:  # table order, chunk by chunk: the clustering is the same on a rerun
        for start in range(0, len(order), 65_536):
            out.write(np.ascontiguousarray(raw[order[start:start + 65_536]]).tobytes())
    del raw
    ordered = np.memmap(ordered_path, np.float32, "r", shape=(len(order), dim))
    labels = cluster(ordered, params)
    del ordered
    faces = faces.take(pa.array(order))
    result.faces = faces.num_rows
    if len(labels):
        sizes = np.bincount(labels)
        result.subjects, result.subjects_multi, result.largest = len(sizes), int((sizes >= 2).sum()), int(sizes.max())
    return faces.append_column("subject", pa.array(subject_names(labels), pa.string())).cast(TABLE_SCHEMA)


def write_table(table: pa.Table, uri: str) -> None:
    """The subject table at ``uri`` (Parquet), all or nothing: readers see the old file or the whole new one."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    io.write_atomic(uri, sink.getvalue().to_pybytes())


def run_subjects(cfg: JobConfig, input_uri: str, table_uri: str, recognizer: str = "dlib",
                 threshold: float | None = None, method: str = "chinese_whispers", neighbors: int = 16,
                 work_dir: str | None = None, progress: bool = True, verbose: bool = False) -> SubjectsResult:
    """Detect, describe and cluster every face under ``input_uri``; write the subject table at ``table_uri``."""
    if not table_uri.lower().endswith((".parquet", ".pq")):
        raise ValueError(f"--out {table_uri}: the subject table is Parquet (name it .parquet)")
    rec = RECOGNIZERS[recognizer]
    params = ClusterParams(threshold=rec.threshold(cfg) if threshold is None else threshold, method=method,
                           neighbors=neighbors)
    result = SubjectsResult(table_uri=table_uri)
    plan = _listing(cfg, input_uri)
    result.listed = plan.num_rows
    folder = tempfile.mkdtemp(prefix="rp-subjects-", dir=work_dir)
    try:
        spool = Spool(folder, rec.dim)
        t0 = time.perf_counter()
        try:
            if plan.num_rows:
                _describe_on_ray(cfg, plan, io.input_storage(input_uri), recognizer, spool, progress, verbose)
        finally:
            spool.close()
        result.t_describe_s = time.perf_counter() - t0
        _outcomes(folder, plan, result)
        del plan
        t1 = time.perf_counter()
        table = cluster_spool(folder, rec.dim, params, result)
        result.t_cluster_s = time.perf_counter() - t1
        write_table(table, table_uri)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result
