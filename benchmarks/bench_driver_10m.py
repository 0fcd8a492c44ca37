"""The whole driver side of a 10M-input run on one machine: each part in its own process (wall, CPU, peak RSS).

Parts, in order (``--parts``):

- ``plan``: ``plan.make_plan`` at ``--inputs`` listed inputs against the manifest of an earlier run (``bench_report``'s
  generator: run A over every input, ~3 faces an input, then a resumed run B over the failed and changed-settings
  ones; ~3.16 rows an input, parts of ~100K rows, every column filled; inputs under ``<root>/in/``). The listing,
  keys, resume join and output listing are the real code; only the file system's answers are stand-ins: the local
  walk (``walk_local``: ``os.scandir``) yields the inputs' and outputs' paths without the files existing, and each
  input's ``stat`` (``listing._local_identities``) returns a fixed size and mtime. (10M empty files, twice, would take 2/3 of
  this disk's free inodes and ~30 min to lay out.)
- ``lister``: the real walk and stat over a real tree of ``--lister-files`` empty files, and the real listing of it
  as an output prefix: the file-system cost that ``plan`` leaves out, per file (add it times ``--inputs``).
- ``ray``: a local Ray (2 CPUs) from ``ray.init`` to the first row back at the driver, with the plan of a first run
  over ``--inputs`` inputs (every one to do) handed to Ray as the job hands it (``dataset.put_blocks``,
  ``dataset.build_dataset`` with the real stage resources) and stand-in stages (one row an input, no image read);
  then rows are streamed for ``--stream-s`` seconds. Phase timestamps are printed as they happen, so a phase that
  never ends still shows how far it got.
- ``summary``: ``summary.Summary`` over every row of the manifest, each row a dict as the driver receives them.
- ``writer``: ``manifest_writer.PartWriter`` over the same rows, writing parts to local disk.

    python benchmarks/bench_driver_10m.py --inputs 10000000 --root /tmp/drv10m --lister-files 200000 --max-rows 1000000
    # (the 31.6M-row manifest takes 6-25 min to lay out, by load; reused from --root)
    python benchmarks/bench_driver_10m.py --inputs 100000 --parts plan,ray

Prints one JSON line per part; results go in BENCHMARKS.md with the machine named. The manifest (~2.5 GiB at 10M
inputs) and the lister's tree stay under ``--root`` for the next run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import rp_distributed.arrow_pool  # noqa: F401  (as rp-anonymize's driver: first, before pyarrow)
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import FINGERPRINT, write_manifest  # noqa: E402

PARTS = ("plan", "lister", "ray", "summary", "writer")
FILES_PER_FOLDER = 1000  # bench_report's shards: shard-<id // 1000>/img_<id>.jpg


def rel_path(i: int) -> str:
    return f"shard-{i // FILES_PER_FOLDER:05d}/img_{i:08d}.jpg"


def _usage(t0: float, cpu0: float) -> dict:
    """Wall and CPU seconds since ``t0``/``cpu0``, peak RSS, and the private memory now (RssAnon)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime - cpu0, 1),
            "peak_rss_mib": ru.ru_maxrss // 1024, "rss_anon_mib_now": int(status["RssAnon"].split()[0]) // 1024,
            "load": round(os.getloadavg()[0], 1)}


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


# -- plan ---------------------------------------------------------------------------------------------------------
def _stand_in_walk(root: str, inputs: int, real_walk):
    """``walk_local`` for the input and output prefixes: their files' paths as ``os.scandir`` would give them (a
    folder at a time, last folder first as the walk's stack pops them), without the files; the output prefix's own
    files (the manifest) are walked for real."""
    in_root, out_root = f"{root}/in", f"{root}/out"

    def walk(top: str, everything: bool = False):
        top = top.rstrip("/")
        if top not in (in_root, out_root):
            yield from real_walk(top, everything)
            return
        if top == out_root:
            yield from real_walk(top, everything)
        for folder in range((inputs - 1) // FILES_PER_FOLDER, -1, -1):
            start = folder * FILES_PER_FOLDER
            for i in range(start, min(start + FILES_PER_FOLDER, inputs)):
                yield f"{top}/{rel_path(i)}", None
    return walk


def part_plan(root: str, inputs: int) -> None:
    from rp_distributed import io, listing, storage
    from rp_distributed.config import load_config
    from rp_distributed.job.plan import make_plan

    walk = _stand_in_walk(root, inputs, storage.walk_local)
    io.walk_local = storage.walk_local = listing.walk_local = walk
    listing._local_identities = lambda paths: ([2_345_678] * len(paths), [1_767_225_600_000_000_000] * len(paths))
    cfg = load_config(None, ["output.format=same"])
    t0, cpu0 = time.perf_counter(), _cpu()
    plan = make_plan(cfg, f"{root}/in", f"{root}/out", FINGERPRINT)
    _emit(part="plan", **_usage(t0, cpu0), todo=plan.num_todo, skipped=plan.skipped,
          redone_changed=plan.redone_changed, unrecorded=plan.unrecorded)


# -- lister -------------------------------------------------------------------------------------------------------
def lay_out_tree(tree: Path, files: int) -> None:
    """``files`` empty files, a folder of ``FILES_PER_FOLDER`` at a time; a folder already full (an earlier layout
    that was stopped) is kept as it is."""
    for start in range(0, files, FILES_PER_FOLDER):
        folder = (tree / rel_path(start)).parent
        count = min(FILES_PER_FOLDER, files - start)
        if folder.is_dir() and len(os.listdir(folder)) == count:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            open(tree / rel_path(i), "wb").close()


def part_lister(tree: str, files: int) -> None:
    from rp_distributed import io

    t0, cpu0 = time.perf_counter(), _cpu()
    listed = io.list_inputs_table(tree, [".jpg"])
    as_input = _usage(t0, cpu0)
    t1, cpu1 = time.perf_counter(), _cpu()
    keys = sum(1 for _ in io.Storage(tree).list())
    as_output = _usage(t1, cpu1)
    assert listed.num_rows == keys == files, (listed.num_rows, keys, files)
    _emit(part="lister", files=files, input_listing=as_input, output_listing=as_output,
          us_per_file=round(1e6 * (as_input["wall_s"] + as_output["wall_s"]) / files, 1))


# -- ray ----------------------------------------------------------------------------------------------------------
def first_run_plan(inputs: int, root: str) -> pa.Table:
    """The plan of a first run over ``inputs`` local inputs (``plan.TODO_SCHEMA``): every input to do."""
    from rp_distributed.job.plan import TODO_SCHEMA

    ids = pa.array(np.arange(inputs))
    pad = lambda width: pc.utf8_lpad(pc.cast(ids, pa.string()), width=width, padding="0")  # noqa: E731
    shard = pc.utf8_lpad(pc.cast(pa.array(np.arange(inputs) // FILES_PER_FOLDER), pa.string()), width=5, padding="0")
    rel = pc.binary_join_element_wise("shard-", shard, "/img_", pad(8), ".jpg", "")
    none = pa.nulls(inputs, pa.string())
    return pa.table({"input_uri": pc.binary_join_element_wise(f"{root}/in/", rel, ""), "rel_path": rel,
                     "output_uri": pc.binary_join_element_wise(f"{root}/out/", rel, ""), "error": none,
                     "notes": none, "stale_output_uri": none, "input_size": pa.array(np.full(inputs, 2_345_678)),
                     "input_version": pc.binary_join_element_wise("mtime_ns:17672256", pad(11), "")},
                    schema=TODO_SCHEMA)


class _NoSettings:
    @staticmethod
    def of(cfg):
        return None


class StandInStage:
    """A stage that does no image work: one row an input, carrying the time its first batch arrived."""

    def __init__(self, settings, *extra):
        self.first = None

    def __call__(self, batch: dict) -> dict:
        if self.first is None:
            self.first = time.time()
        n = len(next(iter(batch.values())))
        key = "input_uri" if "input_uri" in batch else "payload"
        first = batch["t_first"] if "t_first" in batch else np.full(n, self.first)  # the first stage's
        return {"status": np.full(n, "ok"), "payload": batch[key], "t_first": first}


STAND_IN_CONFIG = ["ray.num_cpus=2", "detection.resources.num_cpus=0.5", "anonymizer.resources.num_cpus=0.25",
                   "merge.resources.num_cpus=0.5", "detection.resources.batch_size=16",
                   "anonymizer.resources.batch_size=16", "merge.resources.batch_size=16"]


def _held(ds, t: float) -> dict:
    """What the driver holds while rows stream: its private memory, and the 32-input bundles cut from the plan that
    no first-stage task has taken yet, with the plan blocks cut so far (Ray Data's own queues, read directly so that
    code from before ``job/plan_feed.py`` is measured the same way)."""
    topology = ds._current_executor._topology
    cutter = next(op for op in topology if op.name.startswith("StreamingRepartition"))
    queued = sum(topology[d].total_enqueued_input_blocks() for d in cutter.output_dependencies)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"t_s": round(t, 1), "bundles_queued": queued, "plan_blocks_cut": cutter.metrics.num_tasks_submitted,
            "rss_anon_mib": int(status["RssAnon"].split()[0]) // 1024}


def part_ray(inputs: int, root: str, stream_s: float) -> None:
    import ray

    from rp_distributed.config import load_config
    from rp_distributed.job.dataset import build_dataset, put_blocks, stages

    cfg = load_config(None, STAND_IN_CONFIG)
    table = first_run_plan(inputs, root)
    t0, cpu0, wall0 = time.perf_counter(), _cpu(), time.time()
    mark = lambda phase, **kw: _emit(part="ray", phase=phase, **_usage(t0, cpu0), **kw)  # noqa: E731
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars, ctx.max_errored_blocks = False, -1
        mark("ray.init")
        blocks = put_blocks(table)
        del table
        mark("put_blocks", blocks=len(blocks))
        specs = [dataclasses.replace(s, fn=StandInStage, settings=_NoSettings, extra=())
                 for s in stages("bench", None, None, None)]
        ds = build_dataset(cfg, blocks, specs)
        mark("build_dataset")
        rows = iter(ds.iter_rows())
        first = next(rows)
        mark("first_row", first_batch_at_detect_s=round(first["t_first"] - wall0, 1))
        n, t1, held = 1, time.perf_counter(), [_held(ds, 0.0)]
        for _ in rows:
            n += 1
            if time.perf_counter() - t1 > len(held) * stream_s / 6:
                held.append(_held(ds, time.perf_counter() - t1))
            if time.perf_counter() - t1 > stream_s:
                break
        mark("streamed", rows=n, rows_per_s=round(n / (time.perf_counter() - t1), 1), held=held)
        rows.close()  # the execution stopped before Ray is: its thread would otherwise outlive the shutdown
    finally:
        ray.shutdown()


# -- summary and writer -------------------------------------------------------------------------------------------
def manifest_rows(root: str, max_rows: int, batch_rows: int = 16_384):
    """The manifest's rows (the first ``max_rows``, 0: all) as dicts (as the driver gets rows from Ray), a batch at
    a time, with the CPU seconds spent converting them."""
    left = max_rows or float("inf")
    for part in sorted(Path(root, "out", "_manifest").glob("part-*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=batch_rows):
            if left <= 0:
                return
            t0 = time.process_time()
            rows = batch.slice(0, min(batch.num_rows, left)).to_pylist()
            left -= len(rows)
            yield rows, time.process_time() - t0


def part_rows(root: str, what: str, max_rows: int) -> None:
    from rp_distributed.manifest_writer import PartWriter
    from rp_distributed.summary import Summary

    t0, cpu0 = time.perf_counter(), _cpu()
    summary = Summary()
    writer = PartWriter(f"{root}/written", "_manifest", "20260401T000000-bench0", rows_per_file=100_000,
                        bytes_per_file=64 << 20, flush_s=300.0) if what == "writer" else None
    add = writer.add if writer else summary.add
    convert, rows, own = 0.0, 0, 0.0
    for batch, seconds in manifest_rows(root, max_rows):
        convert += seconds
        t1 = time.process_time()
        for row in batch:
            add(row)
        own += time.process_time() - t1
        rows += len(batch)
    t1 = time.process_time()
    if writer:
        writer.close()
    else:
        result = summary.result()
    own += time.process_time() - t1
    extra = {"parts_written": len(writer.parts)} if writer else {"images": result["images"], "faces": result["faces"]}
    # CPU seconds: of the summary or writer itself, and of making the rows dicts (Ray's part in a run).
    _emit(part=what, rows=rows, **_usage(t0, cpu0), own_cpu_s=round(own, 1), rows_to_dicts_cpu_s=round(convert, 1),
          own_cpu_us_per_row=round(1e6 * own / max(rows, 1), 1), **extra)


# -- driver -------------------------------------------------------------------------------------------------------
def lay_out(root: Path, inputs: int, lister_files: int, parts: list[str]) -> dict:
    counts_file = root / "counts.json"
    counts = json.loads(counts_file.read_text()) if counts_file.exists() else None
    if counts is None or counts["inputs"] != inputs:
        if counts is not None:
            sys.exit(f"{root} holds a manifest of {counts['inputs']} inputs; choose another --root")
        (root / "in").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        counts = write_manifest(root / "out" / "_manifest", inputs, in_prefix=f"{root}/in/")
        counts["layout_s"] = round(time.perf_counter() - t0, 1)
        counts_file.write_text(json.dumps(counts))
    tree = root / f"tree-{lister_files}"
    if "lister" in parts and not tree.with_suffix(".done").exists():
        lay_out_tree(tree, lister_files)
        tree.with_suffix(".done").write_text("")
    return counts


def run_part(args, part: str) -> list[dict]:
    cmd = [sys.executable, __file__, "--inputs", str(args.inputs), "--root", str(args.root), "--run-part", part,
           "--lister-files", str(args.lister_files), "--stream-s", str(args.stream_s), "--max-rows", str(args.max_rows)]
    env = dict(os.environ, PYTHONPATH=args.code or str(Path(__file__).resolve().parents[1]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout_s)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc = (exc.stdout or b"").decode(), (exc.stderr or b"").decode(), f"timeout {args.timeout_s} s"
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if rc:
        lines.append({"part": part, "failed": str(rc), "stderr": err[-2000:]})
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", type=int, default=10_000_000)
    p.add_argument("--root", type=Path, default=Path("/tmp/bench-driver-10m"))
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--lister-files", type=int, default=1_000_000)
    p.add_argument("--stream-s", type=float, default=30.0, help="ray: seconds to stream rows after the first")
    p.add_argument("--max-rows", type=int, default=0, help="summary, writer: the manifest's first rows only (0: all)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per part")
    p.add_argument("--code", default=None, help="PYTHONPATH of the code measured (default: this checkout)")
    p.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.root = args.root.resolve()
    root = str(args.root)
    if args.run_part:
        {"plan": lambda: part_plan(root, args.inputs),
         "lister": lambda: part_lister(f"{root}/tree-{args.lister_files}", args.lister_files),
         "ray": lambda: part_ray(args.inputs, root, args.stream_s),
         "summary": lambda: part_rows(root, "summary", args.max_rows),
         "writer": lambda: part_rows(root, "writer", args.max_rows)}[args.run_part]()
        return
    parts = args.parts.split(",")
    counts = lay_out(args.root, args.inputs, args.lister_files, parts)
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    for part in parts:
        for line in run_part(args, part):
            print(json.dumps({**line, "inputs": args.inputs, "manifest_rows": counts["rows"], "machine": machine}),
                  flush=True)


if __name__ == "__main__":
    main()
