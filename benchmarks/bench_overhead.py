"""The pipeline's own cost per image: the real job against its stage functions in a plain loop (issue 21).

Both sides run the same work on the same small real images (64-160 px; one in ``--face-every`` shows a face,
from insightface's t1.jpg and Tom Hanks, scikit-image's astronaut and matplotlib's Grace Hopper; the rest are
crops of scikit-image's coffee and rocket) with a method whose own cost is about nothing (``mask``) and the
re-ID gate and the output audit on, as a user runs them:

- loop: one process builds the plan (``plan.make_plan``), the three stages as the job declares them
  (``dataset.stages``), and calls ``DetectFaces.process``, the anonymizer, ``MergeAndWrite.process`` per image,
  with the manifest written by the same ``PartWriter``;
- job: ``run_job`` in a fresh driver with its own local Ray (127.0.0.1, 2 CPUs), shut down at the end.

The difference is the framework: Ray Data's scheduling, the batch adapters, what crosses each stage boundary
and the driver's streaming. CPU time is what matters on shared cores: the benchmark samples the CPU time of
every process below each side (the driver, Ray's GCS and raylet, every worker) every 0.2 s and sums it.
Ray's start-up (``ray.init``) is reported apart, and counted in neither per-image figure.

    python benchmarks/bench_overhead.py --images 2000
    python benchmarks/bench_overhead.py --images 10000 --sides job   # one side only
    python benchmarks/bench_overhead.py --boundary   # one stage boundary's CPU per row, by batch size

The images are made once under ``--cache`` (default /tmp/rp-overhead-images). Prints one JSON line; results go
in BENCHMARKS.md with the commit and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's code, not an installed copy
LAYOUT_VERSION = "v1"


def _face_sources():
    """Real photos with a face, as RGB arrays cropped around the face."""
    import importlib.util

    import numpy as np
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    ins = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / "data/images"
    t1 = np.asarray(Image.open(ins / "t1.jpg").convert("RGB"))
    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    return [np.asarray(Image.open(ins / "Tom_Hanks_54745.png").convert("RGB")),
            hopper[40:440, 60:460],  # her face and shoulders
            data.astronaut()[0:260, 100:360],  # her face
            t1[60:330, 0:270], t1[90:360, 860:1130]]  # two of the six people


def lay_out(src: Path, n: int, face_every: int) -> None:
    """``n`` images under ``src`` in folders of 1,000, 64-160 px, JPEG (three in four) or PNG."""
    import numpy as np
    from PIL import Image
    from skimage import data

    faces, backgrounds = _face_sources(), [data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        d = src / f"{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        side = int(rng.integers(64, 161))
        if i % face_every == 0:
            picture = faces[(i // face_every) % len(faces)]
        else:
            bg = backgrounds[i % 2]
            crop = int(rng.integers(side, min(bg.shape[:2]) // 2))
            y, x = int(rng.integers(0, bg.shape[0] - crop)), int(rng.integers(0, bg.shape[1] - crop))
            picture = bg[y:y + crop, x:x + crop]
        image = Image.fromarray(np.ascontiguousarray(picture)).resize((side, side), Image.BILINEAR)
        if i % 4 == 3:
            image.save(d / f"{i:06d}.png")
        else:
            image.save(d / f"{i:06d}.jpg", quality=90)


def images(cache: Path, n: int, face_every: int) -> Path:
    src = cache / f"{LAYOUT_VERSION}-{n}-every{face_every}"
    done = src / ".complete"
    if not done.exists():
        lay_out(src / "in", n, face_every)
        done.touch()
    return src / "in"


def config():
    from rp_distributed.config import load_config

    # A near-free method with the re-ID gate on, and the cheapest detection (one CenterFace pass, no output audit):
    # detection costs the same on both sides and only adds noise to their difference. With the default detection
    # (five passes and the audit's sixth) the loop alone costs ~250 ms of CPU per image here.
    return load_config(None, ["anonymizer.method=mask", "ray.num_cpus=2", "detection.backend=centerface",
                              "merge.audit.enabled=false"])


def run_loop(src: str, out: str) -> dict:
    """The stages as the job declares them, called image by image in this process."""
    from rp_distributed import io
    from rp_distributed.config import anonymization_fingerprint
    from rp_distributed.job.dataset import stages
    from rp_distributed.job.plan import make_plan
    from rp_distributed.manifest_writer import PartWriter
    from rp_distributed.records import ImageRow
    from rp_distributed.summary import Summary

    cfg = config()
    fingerprint, run_id = anonymization_fingerprint(cfg), "loop"
    t0 = time.time()
    detect, anonymize, merge = [spec.fn(*spec.constructor_args(cfg)) for spec in
                                stages(run_id, fingerprint, io.input_storage(src), io.Storage(out))]
    t_built = time.time()  # the models loaded (the job's actors load theirs inside its timed part too)
    plan = make_plan(cfg, src, out, fingerprint)
    writer = PartWriter(out, cfg.output.manifest_dir, run_id, cfg.output.manifest_rows_per_file,
                        cfg.output.manifest_bytes_per_file, cfg.output.manifest_flush_s)
    summary = Summary()
    for plan_row in plan.table.to_pylist():
        row = detect.process(ImageRow.of(plan_row))
        if row.pending:
            anonymize.anonymizer(row.payload.faces)
        for face in row.payload.faces:
            face.crop = None
        for manifest_row in merge.process(row):
            summary.add(manifest_row)
            writer.add(manifest_row)
    writer.close()
    return {"t_start": t0, "t_work": t0, "t_end": time.time(), "build_s": round(t_built - t0, 1),
            "summary": summary.result()}


def run_job_side(src: str, out: str) -> dict:
    """``run_job`` with its own local Ray (127.0.0.1, 2 CPUs)."""
    import ray

    from rp_distributed.job.run import run_job

    cfg = config()
    t0 = time.time()
    for attempt in range(20):  # Ray waits 30 s for its raylet, too short on shared cores under load
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
            break
        except Exception as exc:  # noqa: BLE001
            ray.shutdown()
            if attempt == 19 or "timed out during startup" not in str(exc):
                raise
    t_up = time.time()
    try:
        result = run_job(cfg, src, out, progress=False, report=False)
    finally:
        t_end = time.time()
        ray.shutdown()
    return {"t_start": t0, "t_work": t_up, "t_end": t_end, "summary": result.summary}


def boundary(src: Path, sizes=(1, 2, 4, 8, 16, 32)) -> dict:
    """CPU ms per row of one stage boundary as Ray Data runs it, without Ray's scheduling: the stage's output batch
    (``batch.columns``) to an Arrow block, the block to the next stage's numpy batch, and that to records
    (``batch.rows``), over 32 detected rows, at each batch size."""
    from ray.data.block import BlockAccessor

    from rp_distributed import io
    from rp_distributed.job.dataset import stages
    from rp_distributed.records import ImageRow
    from rp_distributed.stages.batch import columns, rows

    cfg = config()
    detect = stages("b", None, io.input_storage(str(src)), None)[0]
    detect = detect.fn(*detect.constructor_args(cfg))
    paths = sorted(p for p in src.rglob("*") if p.is_file())[:32]
    detected = [detect.process(ImageRow(str(p), str(p.relative_to(src)), "/nonexistent/" + p.name)) for p in paths]
    out = {}
    for size in sizes:
        reps = max(10, 256 // size)
        t0 = time.process_time()
        for _ in range(reps):
            block = BlockAccessor.batch_to_block(columns(detected[:size]))
            rows(BlockAccessor.for_block(block).to_batch_format("numpy"))
        out[size] = round(1000 * (time.process_time() - t0) / reps / size, 3)
    return out


class TreeCPU:
    """The CPU seconds (user + system) of a process and everything below it, sampled every ``every`` s: a process
    that ends between two samples loses at most its last ``every`` s."""

    def __init__(self, pid: int, every: float = 0.2):
        self.root, self.every = pid, every
        self.last: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seconds at its last sample
        self.names: dict[tuple[int, float], str] = {}  # what each process is: driver, a stage's actor, raylet...
        self.timeline: list[tuple[float, float]] = []  # (time, total CPU seconds so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return
        for p in procs:
            try:
                with p.oneshot():
                    t, key = p.cpu_times(), (p.pid, p.create_time())
                    self.last[key] = t.user + t.system
                    if not self.names.get(key, "").startswith("stage "):  # a worker takes its title once it runs
                        self.names[key] = self._name(p)
            except psutil.Error:
                pass
        self.timeline.append((time.time(), sum(self.last.values())))

    def _name(self, p) -> str:
        if p.pid == self.root:
            return "driver"
        title = (p.cmdline() or [p.name()])[0]
        if title.startswith("ray::"):  # a Ray worker names what it runs: ray::MapWorker(MapBatches(X)).method
            title = title.split(").", 1)[0] + ")" if ")." in title else title
            return title.replace("ray::MapWorker(MapBatches(", "stage ").rstrip(")")
        return Path(title).name

    def by_name(self) -> dict[str, float]:
        """CPU seconds per kind of process over the whole run."""
        out: dict[str, float] = {}
        for key, cpu in self.last.items():
            out[self.names[key]] = out.get(self.names[key], 0.0) + cpu
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.5}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        """Total CPU seconds at time ``t`` (the last sample before it)."""
        before = [cpu for when, cpu in self.timeline if when <= t]
        return before[-1] if before else 0.0


def measure(side: str, src: Path, out: Path) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--side-run", side, str(src), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), RAY_BACKEND_LOG_LEVEL="fatal"))
    cpu = TreeCPU(proc.pid)
    stdout, stderr = proc.communicate()
    cpu.stop()
    if proc.returncode:
        sys.exit(f"{side} failed:\n{stderr[-3000:]}")
    marks = json.loads(stdout.strip().splitlines()[-1])
    n = marks["summary"]["images"]
    wall, cpu_s = marks["t_end"] - marks["t_work"], cpu.at(marks["t_end"]) - cpu.at(marks["t_work"])
    return {"images": n, "faces": marks["summary"]["faces"], "by_status": marks["summary"]["by_status"],
            "start_wall_s": round(marks["t_work"] - marks["t_start"], 1),
            "start_cpu_s": round(cpu.at(marks["t_work"]), 1),
            "wall_s": round(wall, 1), "cpu_s": round(cpu_s, 1),
            "wall_ms_per_image": round(1000 * wall / n, 2), "cpu_ms_per_image": round(1000 * cpu_s / n, 2),
            "cpu_s_by_process": cpu.by_name()}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--face-every", type=int, default=20)
    p.add_argument("--sides", default="loop,job")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "rp-overhead-images")
    p.add_argument("--side-run", nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--boundary", action="store_true", help="only the CPU ms per row of one stage boundary, by "
                   "batch size (no Ray cluster)")
    args = p.parse_args()
    if args.side_run:
        side, src, out = args.side_run
        print(json.dumps((run_loop if side == "loop" else run_job_side)(src, out)))
        return
    src = images(args.cache, args.images, args.face_every)
    if args.boundary:
        print(json.dumps({"boundary_cpu_ms_per_row_by_batch_size": boundary(src), "load": load()}))
        return
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "commit": commit,
              "images": args.images, "face_every": args.face_every, "load_before": load()}
    for side in args.sides.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            result[side] = measure(side, src, Path(tmp) / "out")
    result["load_after"] = load()
    if "loop" in result and "job" in result:
        loop, job = result["loop"], result["job"]
        result["overhead_ms_per_image"] = {
            "wall": round(job["wall_ms_per_image"] - loop["wall_ms_per_image"], 2),
            "cpu": round(job["cpu_ms_per_image"] - loop["cpu_ms_per_image"], 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
