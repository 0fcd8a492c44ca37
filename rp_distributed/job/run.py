"""The run, top to bottom: the plan (``plan.make_plan``: listing, output keys, resume), the stages over its blocks
(``dataset``), the manifest written as rows stream in (``manifest_writer``), inputs of batches whose worker died
redone one by one, and report.html at the end. The driver keeps no rows: a streaming summary, the manifest buffer,
and 8 bytes per finished input.
"""

from __future__ import annotations

import array
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .. import annotations, io, manifest
from ..config import JobConfig
from ..driver_memory import Trim
from ..manifest_writer import PartWriter
from ..faults import describe
from ..records import ImageRow, Status, join_reasons
from ..stages.batch import value
from ..stages.merge import remove_stale_outputs
from ..summary import Summary, summarize
from .dataset import build_dataset, forget_block_stats, put_blocks, stages
from .ray_session import ensure_ray


@dataclass
class JobResult:
    run_id: str
    summary: dict
    skipped: int
    manifest_parts: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    redone_changed: int = 0  # done earlier under other anonymization settings, redone now
    redone_replaced: int = 0  # done earlier, but the input was replaced since under the same key: redone now
    unrecorded: int = 0  # outputs found with no manifest row (an earlier driver killed before its flush), redone
    renamed: int = 0  # inputs given a distinct output key (their natural keys collided)
    isolated: int = 0  # inputs of failed batches retried one by one
    settings_fingerprint: str = ""
    report_uri: str | None = None  # report.html beside the manifest (None: not written, see report_error)
    report_error: str | None = None


def lost_input_row(row: dict, run_id: str, fingerprint: str, retries: int, outputs: io.Storage | None = None) -> dict:
    """The manifest row of an input whose batch failed every time, also alone (a poison input): ``row`` is its
    plan row."""
    reason = (f"its worker died {2 * (retries + 1)} times, with its block and alone (a native crash, an "
              f"out-of-memory kill or a device fault; see the Ray worker logs); retries are bounded by "
              f"ray.max_task_retries={retries}")
    plan_row = ImageRow.of(row)
    return manifest.image_row(run_id, fingerprint, row["input_uri"], row["rel_path"], Status.ERROR,
                              join_reasons(reason, remove_stale_outputs(plan_row, True, outputs)), row.get("notes"))


def _finished(seen: array.array) -> np.ndarray:
    """The distinct hashes of finished inputs, sorted."""
    return np.unique(np.frombuffer(seen, dtype=np.int64))


def _unfinished(blocks: list, seen: array.array, total: int) -> pa.Table:
    """The plan rows in ``blocks`` (``total`` rows) whose input produced no manifest row (``seen``: hashes of
    finished inputs), read back from the object store only when some are missing."""
    import ray

    done = _finished(seen)
    if len(done) >= total:
        return pa.table({})
    lost = []
    for ref in blocks:
        block = ray.get(ref)
        hashes = np.fromiter((hash(u) for u in block["input_uri"].to_pylist()), np.int64, block.num_rows)
        at = np.minimum(np.searchsorted(done, hashes), max(len(done) - 1, 0))
        finished = (done[at] == hashes) if len(done) else np.zeros(len(hashes), bool)
        if not finished.all():
            lost.append(block.filter(pa.array(~finished)))
    return pa.concat_tables(lost) if lost else pa.table({})


def _run_info(cfg: JobConfig, run_id: str, input_uri: str, output_uri: str, fingerprint: str, plan) -> dict:
    from ..config import config_to_dict

    return {"run_id": run_id, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "input_uri": input_uri,
            "output_uri": output_uri, "settings_fingerprint": fingerprint, "inputs_planned": plan.num_todo,
            "inputs_skipped": plan.skipped, "inputs_replaced": plan.redone_replaced, "config": config_to_dict(cfg)}


def end_of_run(result: JobResult, cfg: JobConfig, output_uri: str, info: dict | None, report: bool) -> None:
    """Record the run's wall time beside its config, then write ``report.html``. A failure to write either is
    kept in ``result.report_error`` and never fails the job: the manifest is what counts."""
    from .. import report as report_mod

    try:
        if info is not None:
            info.update(wall_s=round(result.wall_s, 3), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        summary=result.summary)
            report_mod.write_run_info(output_uri, cfg.output.manifest_dir, result.run_id, info)
        if report:  # this run's report.* settings decide (include_originals, gallery), never an earlier run's
            result.report_uri = report_mod.write_report(output_uri, cfg.output.manifest_dir, **cfg.report.model_dump())
    except Exception as exc:  # noqa: BLE001
        result.report_error = describe(exc)


def run_job(cfg: JobConfig, input_uri: str, output_uri: str, progress: bool = True, verbose: bool = False,
            report: bool = True) -> JobResult:
    """Run the whole job; returns the summary. Manifest parts are written as rows stream in, and at the end
    ``report.html`` beside them (``report``). ``verbose``: Ray's own logging as Ray has it.

    The run holds the output prefix's lease (``lease.py``) from before its plan to its end: a second run into
    the same prefix is refused (``lease.LeaseHeld``). With ``--overwrite`` the earlier manifest is retired only
    once this run completed: a failed overwrite leaves it whole beside the new run's parts."""
    from ..config import anonymization_fingerprint
    from .lease import Lease
    from .plan import make_plan

    t0 = time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    output_uri = io.normalize_prefix(output_uri)
    outputs = io.Storage(output_uri)
    fingerprint = anonymization_fingerprint(cfg)
    with Lease(outputs, cfg.output.manifest_dir, run_id) as lease:
        plan = make_plan(cfg, input_uri, output_uri, fingerprint)
        result = JobResult(run_id=run_id, summary=summarize([]), skipped=plan.skipped,
                           redone_changed=plan.redone_changed, redone_replaced=plan.redone_replaced,
                           unrecorded=plan.unrecorded, renamed=plan.renamed,
                           settings_fingerprint=fingerprint)
        info = None
        if plan.num_todo or plan.orphans:
            from ..report import write_run_info

            info = _run_info(cfg, run_id, input_uri, output_uri, fingerprint, plan)
            write_run_info(output_uri, cfg.output.manifest_dir, run_id, info)  # the report shows the run's config
            if plan.num_todo:
                ensure_ray(cfg, verbose)
            _execute(cfg, plan, result, io.input_storage(input_uri), outputs, input_uri, lease, progress)
        lease.check()
        manifest.retire(output_uri, plan.retire)  # --overwrite: the earlier manifest, now that this run completed
        result.wall_s = time.perf_counter() - t0
        if info is not None or (report and manifest.part_uris(output_uri, cfg.output.manifest_dir)):
            end_of_run(result, cfg, output_uri, info, report)
    return result


def _execute(cfg: JobConfig, plan, result: JobResult, inputs: io.Storage, outputs: io.Storage, input_uri: str,
             lease, progress: bool) -> None:
    """Stream the plan through the stages into the manifest; fills ``result``'s summary, parts and counts."""
    import ray

    from . import progress as progress_mod

    run_id, fingerprint = result.run_id, result.settings_fingerprint
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our bar (Progress) shows each stage's state
    progress_mod.register(ctx)
    ctx.max_errored_blocks = -1  # a batch that failed all its retries is redone below, input by input
    # The driver keeps no rows: a streaming summary, the manifest buffer, and one 64-bit hash per finished
    # input (to find the inputs of failed blocks), 8 bytes an input instead of its rows.
    summary, seen = Summary(), array.array("q")
    total = plan.num_todo
    orphans = plan.orphans  # side-table rows naming images that are not in the input: one error row per path
    blocks = put_blocks(plan.hand_over())  # the plan's rows now live in the object store, not on the driver
    bar = progress_mod.ACTIVE = progress_mod.Progress(total, enabled=progress)
    out_cfg = cfg.output
    writer = PartWriter(output_uri=outputs.uri, manifest_dir=out_cfg.manifest_dir, run_id=run_id,
                                 rows_per_file=out_cfg.manifest_rows_per_file,
                                 bytes_per_file=out_cfg.manifest_bytes_per_file, flush_s=out_cfg.manifest_flush_s)

    def take(row: dict) -> None:
        lease.check()  # another run took the prefix over: stop here
        summary.add(row)
        writer.add(row)
        first = row.get("face_index") in (None, 0)  # an input's first row
        if first:
            seen.append(hash(row["input_uri"]))
        bar.add(images=int(first), faces=int(row.get("face_index") is not None))

    trim = Trim()

    def stream(ds) -> None:
        for n, row in enumerate(ds.iter_rows(), 1):
            take({k: value(v) for k, v in row.items()})
            if n % 1_000 == 0:
                forget_block_stats(ds)  # Ray Data's per-block statistics would grow with the run
            trim()

    try:
        for orphan in orphans:  # not take(): they are no plan input, so not counted as finished inputs
            row = annotations.orphan_row(orphan, input_uri, run_id, fingerprint)
            summary.add(row)
            writer.add(row)
        specs = stages(run_id, fingerprint, inputs, outputs)
        if blocks:
            stream(build_dataset(cfg, blocks, specs))
        lost = _unfinished(blocks, seen, total)
        del blocks
        if lost.num_rows > cfg.ray.max_isolated_inputs:
            raise RuntimeError(f"{lost.num_rows} inputs were lost to failed batches (more than "
                               f"ray.max_isolated_inputs={cfg.ray.max_isolated_inputs}): a systemic failure, see "
                               "the Ray logs. What finished is in the manifest; rerun to resume.")
        if lost.num_rows:
            result.isolated = lost.num_rows
            alone = put_blocks(lost, rows_per_block=1)
            finished_before = len(_finished(seen))
            stream(build_dataset(cfg, alone, specs, isolate=True))
            for r in _unfinished(alone, seen, finished_before + lost.num_rows).to_pylist():
                take(lost_input_row(r, run_id, fingerprint, cfg.ray.max_task_retries, outputs))
    finally:
        bar.close()
        progress_mod.ACTIVE = None
        writer.close()
        result.manifest_parts = writer.parts
    result.summary = summary.result()
