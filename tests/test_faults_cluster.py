"""Issue 8: fault tolerance with real processes. Nothing is mocked: real Ray processes are SIGKILLed and a
real node leaves a real (three-node, one-machine) cluster, and the job must still finish with every input
done exactly once and every face anonymized.

1. ``test_actor_kill_and_node_loss_on_a_three_node_cluster``: ``ray.cluster_utils.Cluster`` (head + two
   workers on 127.0.0.1) runs the job (``tests/fault_drivers.py cluster``); mid-job an anonymizer actor's
   process is SIGKILLed while it runs a batch, then a worker node whose stage actors are running batches is
   removed.
2. ``test_driver_sigkill_then_rerun_redoes_only_what_has_no_manifest_row``: the real CLI is SIGKILLed (its
   whole process group) once manifest parts exist and outputs were written whose rows were not flushed;
   the rerun skips exactly the inputs with done rows and redoes the rest.
3. ``test_driver_sigkill_after_a_part_cut_inside_an_image``: the same where a part cut every 4 rows would
   end inside an image's face rows.

Every driver runs in its own process group (``start_new_session``); whatever Ray started is found by pid
(/proc: the driver's descendants and every process whose environment names one of its raylets) and must be
gone at the end. ``ray stop`` is never used: it would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rp_distributed import manifest
from rp_distributed.config import load_config
from tests.conftest import (
    FAST_DETECTION,
    REPO,
    _free_port,
    insightface_image,
    skimage_image,
)
from tests.fault_drivers import (
    alive,
    descendants,
    kill_all,
    output_files,
    ray_processes_of,
    wait_gone,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Face rows the job writes for each kind of input below (every copy of a kind is the same image), measured with
# the test's detection (CenterFace at 1x, the output audit at 0.5x): t1's six people and one region of the blurred
# output the audit takes for a face (anonymized, so a row); the astronaut; the camera's cameraman (17 px).
FACES = {"t1": 7, "astronaut": 1, "camera": 1, "coffee": 0}


# -- inputs -----------------------------------------------------------------------------------------------


def _sources() -> dict[str, Image.Image]:
    """Small versions of the real photos, to keep the jobs fast on 2 cores."""
    return {
        "t1": Image.open(insightface_image("t1.jpg")).convert("RGB").resize((640, 443), Image.LANCZOS),
        "astronaut": Image.open(skimage_image("astronaut.png")).convert("RGB").resize((256, 256), Image.LANCZOS),
        "camera": Image.open(skimage_image("camera.png")).resize((128, 128), Image.LANCZOS),  # grayscale
        "coffee": Image.open(skimage_image("coffee.png")).convert("RGB").resize((150, 100), Image.LANCZOS),
    }


def write_inputs(folder: Path, names: list[str]) -> dict[str, str]:
    """One file per name (``<sortkey>_<kind>``, kind from ``FACES`` or ``empty``), in listing order (the job
    lists inputs sorted by path and puts them in blocks of 32). Returns rel_path -> kind."""
    folder.mkdir(parents=True, exist_ok=True)
    src = _sources()
    kinds = {}
    for name in names:
        kind = name.rsplit("_", 1)[1]
        if kind == "empty":  # unreadable: an error row and no output
            rel = name + ".jpg"
            (folder / rel).write_bytes(b"")
        elif kind in ("t1", "coffee"):
            rel = name + ".jpg"
            src[kind].save(folder / rel, quality=92)
        else:
            rel = name + ".png"
            src[kind].save(folder / rel)
        kinds[rel] = kind
    assert sorted(kinds) == list(kinds), "names must be given in listing order"
    return kinds


def expected_output(rel: str) -> str | None:
    return None if rel.rsplit(".", 1)[0].endswith("_empty") else rel.rsplit(".", 1)[0] + ".png"


def _cfg_json(*overrides: str) -> str:
    return load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png", "alignment.face_size=256",
                              *overrides]).model_dump_json()


# -- processes --------------------------------------------------------------------------------------------


def _env(**extra) -> dict:
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray keeps node addresses on 127.0.0.1 instead of swapping in the
    # machine's IP (its gRPC servers still listen on every interface: Ray 2.60 has no setting for that).
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **extra)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # never join (or ask) another Ray on this machine
        env.pop(key, None)
    return env


def _raylets(procs) -> set[int]:
    out = set()
    for pid in procs:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet"):
                out.add(pid)
        except OSError:
            pass
    return out


class Driver:
    """A driver process in its own process group, with what it started tracked by pid."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self.out = open(log.with_suffix(".out"), "w")
        self.err = open(log.with_suffix(".err"), "w")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, stdout=self.out,
                                     stderr=self.err)
        self.seen: dict[int, int | None] = {}  # every descendant seen, pid -> start time
        self.raylets: set[int] = set()  # the raylets among them (known while they ran)

    def watch(self) -> None:
        """Remember the driver's descendants now (Ray starts and ends workers as it goes)."""
        now = descendants(self.proc.pid)
        self.raylets |= _raylets(set(now) - set(self.seen))
        self.seen.update(now)

    def ray_leftovers(self) -> dict[int, int | None]:
        """What still runs of everything the driver started: its process group, its descendants, and every
        process whose environment names one of its raylets (Ray workers have process groups of their own)."""
        return alive({**self.seen, **ray_processes_of(self.raylets, {self.proc.pid})})

    def kill_group(self) -> None:
        """SIGKILL the driver's whole process group (the driver, and the raylet, GCS, ... its Ray started)."""
        self.watch()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"{self.log.name}: the driver did not finish in {timeout} s; killed. stderr:\n"
                            + self.stderr()[-4000:])
            self.watch()
            time.sleep(0.5)
        return self.proc.returncode

    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text()

    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text()

    def close(self) -> None:
        """However the test ends: nothing of this driver may keep running."""
        if self.proc.poll() is None:
            self.kill_group()
        kill_all(self.ray_leftovers())
        self.out.close()
        self.err.close()


def assert_no_ray_leftovers(driver: Driver, extra: dict[int, int | None] = None, timeout: float = 30) -> None:
    """Everything the driver's Ray started is gone (by pid), within ``timeout`` s."""
    left = wait_gone({**driver.ray_leftovers(), **(extra or {})}, timeout)
    if left:
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left
                 if Path(f"/proc/{pid}/cmdline").exists()}
        kill_all(left)
        pytest.fail(f"Ray processes outlived their driver (now killed by pid): {names}")


# -- the manifest and the outputs -------------------------------------------------------------------------


def by_input(rows: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[r["input_uri"]].append(r)
    return out


def latest_run_rows(rows: list[dict]) -> list[dict]:
    """An input's rows of the latest run that wrote any (run ids are time-ordered)."""
    last = max(r["run_id"] for r in rows)
    return [r for r in rows if r["run_id"] == last]


def check_one_set(rel: str, rows: list[dict], kind: str) -> None:
    """One run's rows of one input are exactly one set: one image-level row, or one row per face with
    face_index 0..n-1 each exactly once, and the number of faces this input has."""
    assert len({r["run_id"] for r in rows}) == 1, rel
    if any(r["face_index"] is None for r in rows):
        assert len(rows) == 1, f"{rel}: an image-level row and other rows: {rows}"
        (row,) = rows
        if kind == "empty":
            assert row["status"] == "error" and row["output_uri"] is None, row
        else:
            assert FACES[kind] == 0 and row["status"] == "no_face" and row["num_faces"] == 0, row
        return
    indices = sorted(r["face_index"] for r in rows)
    n = rows[0]["num_faces"]
    assert len(set(indices)) == len(indices), f"{rel}: duplicate face rows {indices}"
    assert indices == list(range(n)), f"{rel}: face rows {indices} for num_faces={n}: rows lost"
    assert n == FACES[kind], f"{rel}: {n} faces, expected {FACES[kind]}"
    assert {r["status"] for r in rows} == {"ok"} and len({r["output_uri"] for r in rows}) == 1, rel


def check_outputs(src: Path, out: Path, kinds: dict[str, str], final: dict[str, list[dict]]) -> None:
    """Every input that has an output has exactly its one file, which is what its manifest rows say: faces
    changed, everything else byte-identical to the decoded input (PNG outputs); nothing else was written."""
    expected = sorted(filter(None, (expected_output(rel) for rel in kinds)))
    assert output_files(out) == expected  # one file per input (none for the unreadable one), no stray files
    originals = {}
    for rel, kind in kinds.items():
        rows = final[str(src / rel)]
        key = expected_output(rel)
        if key is None:
            continue
        assert {r["output_uri"] for r in rows} == {str(out / key)}, rel
        if kind not in originals:
            originals[kind] = np.asarray(Image.open(src / rel).convert("RGB")).astype(int)
        before = originals[kind]
        after = np.asarray(Image.open(out / key).convert("RGB")).astype(int)
        assert after.shape == before.shape and (rows[0]["image_height"], rows[0]["image_width"]) == before.shape[:2]
        keep = np.ones(before.shape[:2], bool)
        for r in rows:
            if r["face_index"] is None:
                continue
            x0, y0, x1, y1 = (int(r[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
            changed = np.abs(before[y0:y1, x0:x1] - after[y0:y1, x0:x1]).mean()
            assert changed > 8, f"{rel}: face {r['face_index']} not anonymized"
            w, h = x1 - x0, y1 - y0
            keep[max(int(y0 - h), 0):int(y1 + h), max(int(x0 - w), 0):int(x1 + w)] = False
        assert keep.mean() > 0.3, rel
        assert np.array_equal(before[keep], after[keep]), f"{rel}: pixels away from the faces changed"


def _block(prefix: str, size: int) -> list[str]:
    """Names for one block of inputs: a t1 (six faces) first, then astronauts (one face) and faceless ones."""
    cycle = ["camera", "astronaut", "camera", "coffee"]
    return [f"{prefix}_{i:02d}_{'t1' if i == 0 else cycle[i % 4]}" for i in range(size)]


# -- 1. an actor killed and a node lost, mid-job, on a three-node cluster ---------------------------------


def check_faults(result: dict, total_outputs: int) -> None:
    """The faults happened, mid-job: an anonymizer actor's process died running a batch while outputs were
    still missing, and Ray restarted it; then a worker node left with stage actors running batches on it."""
    assert "error" not in result, result["error"]
    kill = result["actor_kill"]
    assert kill["existed"] and kill["pid_gone"] and kill["task"] == "MapWorker(MapBatches(AnonymizeFaces)).submit", kill
    assert kill["outputs_before"] < total_outputs and kill["restarted_pid"] != kill["pid"], kill
    removal = result["node_removal"]
    assert removal["node_id"] in result["nodes"] and removal["node_id"] != result["head_node_id"], removal
    assert removal["running"] and all(t.endswith(".submit") for t in removal["running"]), removal
    assert removal["actors"] and removal["outputs_before"] < total_outputs, removal
    actors = {a["actor_id"]: a for a in result["stage_actors"]}
    assert actors[kill["actor_id"]]["num_restarts"] >= 1, actors[kill["actor_id"]]
    # The removed node's actors were restarted on the other worker (the head has no CPU for them).
    assert all(actors[a]["num_restarts"] >= 1 and actors[a]["node_id"] != removal["node_id"]
               for a in removal["actor_ids"]), [actors[a] for a in removal["actor_ids"]]


@pytest.mark.timeout(600)
def test_actor_kill_and_node_loss_on_a_three_node_cluster(tmp_path):
    # 72 inputs: three blocks of (at most) 32, so the stages stream: while one block is anonymized the next
    # is detected and the one before merged.
    names = _block("b0", 32) + _block("b1", 32) + _block("b2", 8)
    names[-1] = "b2_07_empty"
    src, out = tmp_path / "in", tmp_path / "out"
    kinds = write_inputs(src, names)
    total_outputs = sum(expected_output(rel) is not None for rel in kinds)
    cfg = _cfg_json(*(f"{stage}.resources={{concurrency: 2, num_cpus: 0.25, batch_size: 4}}"
                      for stage in ("detection", "anonymizer", "merge")),
                    "ray.max_task_retries=3", "ray.max_actor_restarts=-1")
    env = _env(RP_TEST_ANONYMIZE_DELAY_S="1.0",  # the anonymizer stage is the slow one: room to kill it mid-batch
               RP_TEST_DASHBOARD_PORT=str(_free_port()), RP_TEST_AGENT_PORT=str(_free_port()))
    driver = Driver([sys.executable, "-m", "tests.fault_drivers", "cluster", cfg, str(src), str(out),
                     str(total_outputs)], env, tmp_path / "cluster")
    try:
        rc = driver.wait(540)
        assert rc == 0, driver.stderr()[-4000:]
        result = json.loads(driver.stdout().split("RESULT ", 1)[1].splitlines()[0])
        node_procs = {int(pid): start for pid, start in result["node_processes"].items()}
        # The cluster is gone with its driver: every node's processes and every worker (by pid).
        assert_no_ray_leftovers(driver, {**node_procs,
                                         **ray_processes_of(set(result["raylet_pids"]))})
    finally:
        driver.close()

    check_faults(result, total_outputs)

    # The job finished with every input done exactly once.
    rows = manifest.read_manifest(str(out), "_manifest").to_pylist()
    assert {r["run_id"] for r in rows} == {result["run_id"]}
    final = by_input(rows)
    assert sorted(final) == sorted(str(src / rel) for rel in kinds)
    for rel, kind in kinds.items():
        check_one_set(rel, final[str(src / rel)], kind)
    summary = result["summary"]
    assert summary["images"] == len(kinds) and summary["failures"] == 1 and summary["identity_exported"] == 0
    assert summary["faces"] == sum(FACES.get(k, 0) for k in kinds.values())
    check_outputs(src, out, kinds, final)


# -- 2. the driver SIGKILLed mid-job, then the same job again ---------------------------------------------


def _read_rows(out: Path) -> list[dict]:
    return manifest.read_manifest(str(out), "_manifest").to_pylist()


def _run_cli(src: Path, out: Path, overrides: list[str], log: Path) -> Driver:
    args = [sys.executable, "-m", "rp_distributed.cli", "run", str(src), str(out), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    return Driver(args, _env(), log)


def _summary(text: str) -> dict:
    run_id = re.search(r"rp-anonymize\s+run (\S+)", text).group(1)
    m = re.search(r"images\s+(\d+) processed .*, (\d+) skipped as already done", text)
    unrecorded = re.search(r"unrecorded\s+(\d+) outputs", text)
    return {"run_id": run_id, "images": int(m.group(1)), "skipped": int(m.group(2)),
            "unrecorded": int(unrecorded.group(1)) if unrecorded else 0}


def kill_mid_job(src: Path, out: Path, kinds: dict[str, str], overrides: list[str], tmp_path: Path, ready):
    """Run the CLI; once ``ready(rows, outputs)`` holds (and some input still has no output), SIGKILL its
    process group, then make sure nothing it started is left. Returns the manifest rows and the output files
    (with their inodes) as the kill left them."""
    total_outputs = sum(expected_output(rel) is not None for rel in kinds)
    driver = _run_cli(src, out, overrides, tmp_path / "run1")
    try:
        deadline = time.monotonic() + 240
        while True:
            assert driver.proc.poll() is None, "run 1 ended before it could be killed:\n" + driver.stderr()[-3000:]
            assert time.monotonic() < deadline, "the state to kill run 1 in never came"
            driver.watch()
            outputs = output_files(out)
            parts = manifest.part_uris(str(out), "_manifest")
            if parts and len(outputs) < total_outputs and ready(_read_rows(out), outputs):
                break
            time.sleep(0.1)
        driver.kill_group()
        assert driver.proc.returncode == -signal.SIGKILL
        assert_no_ray_leftovers(driver)
    finally:
        driver.close()
    outputs = {rel: (out / rel).stat().st_ino for rel in output_files(out)}
    assert len(outputs) < total_outputs  # the job was killed with inputs unfinished
    return _read_rows(out), outputs


def unflushed_outputs(src: Path, kinds: dict[str, str], rows: list[dict], outputs) -> dict[str, str]:
    """Output files (key -> input uri) whose input has no manifest row: written, but the driver died before it
    wrote their rows."""
    with_rows = {r["input_uri"] for r in rows}
    return {expected_output(rel): str(src / rel) for rel in kinds
            if expected_output(rel) in outputs and str(src / rel) not in with_rows}


def rerun_and_check(src: Path, out: Path, kinds: dict[str, str], overrides: list[str], tmp_path: Path,
                    rows1: list[dict], outputs1: dict[str, int]) -> None:
    driver = _run_cli(src, out, overrides, tmp_path / "run2")
    try:
        assert driver.wait(240) == 0, driver.stderr()[-4000:]
        assert_no_ray_leftovers(driver)
    finally:
        driver.close()
    check_rerun(src, out, kinds, rows1, outputs1, _summary(driver.stdout()))


def check_rerun(src: Path, out: Path, kinds: dict[str, str], rows1: list[dict], outputs1: dict[str, int],
                run2: dict) -> None:
    """After the rerun (``run2``: its summary): it redid exactly what run 1 (``rows1``: its manifest rows,
    ``outputs1``: its output files' inodes, both as the kill left them) had not recorded as done, and the
    manifest's latest view and the outputs are complete."""
    run1 = {r["run_id"] for r in rows1}
    assert len(run1) == 1
    latest1 = {uri: latest_run_rows(rs) for uri, rs in by_input(rows1).items()}
    done1 = {uri for uri, rs in latest1.items() if rs[-1]["status"] in manifest.DONE_STATUSES}
    unflushed = unflushed_outputs(src, kinds, rows1, outputs1)

    # The rerun skipped exactly the inputs that run 1 had recorded as done, and redid all the others.
    assert run2["skipped"] == len(done1) and run2["images"] == len(kinds) - len(done1), (run2, len(done1))
    assert run2["unrecorded"] == len(unflushed), run2  # the summary counts the outputs that had no row
    rows = _read_rows(out)
    redone = {r["input_uri"] for r in rows if r["run_id"] == run2["run_id"]}
    assert redone == {str(src / rel) for rel in kinds} - done1
    assert {r["run_id"] for r in rows} == run1 | {run2["run_id"]}

    # The latest view is complete: every input has exactly one set of rows in its latest run.
    final = {uri: latest_run_rows(rs) for uri, rs in by_input(rows).items()}
    assert sorted(final) == sorted(str(src / rel) for rel in kinds)
    for rel, kind in kinds.items():
        check_one_set(rel, final[str(src / rel)], kind)
    check_outputs(src, out, kinds, final)

    # Outputs run 1 wrote without a flushed manifest row were simply written again by run 2.
    for key, uri in unflushed.items():
        assert final[uri][0]["run_id"] == run2["run_id"]
        assert (out / key).stat().st_ino != outputs1[key], f"{key} was not written again"


def _unflushed(src: Path, kinds: dict[str, str]):
    """``ready`` for ``kill_mid_job``: some output exists whose input has no manifest row yet."""
    return lambda rows, outputs: bool(unflushed_outputs(src, kinds, rows, outputs))


SIGKILL_OVERRIDES = [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png", "alignment.face_size=256",
                     "ray.num_cpus=2",
                     # Parts are cut every 4 rows; the timer is out of the way, so where they are cut is known.
                     "output.manifest_rows_per_file=4", "output.manifest_flush_s=600"]


def sigkill_and_rerun(tmp_path: Path, names: list[str]) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    kinds = write_inputs(src, names)
    rows1, outputs1 = kill_mid_job(src, out, kinds, SIGKILL_OVERRIDES, tmp_path, _unflushed(src, kinds))
    assert unflushed_outputs(src, kinds, rows1, outputs1), "no output was waiting for its row when the driver died"
    rerun_and_check(src, out, kinds, SIGKILL_OVERRIDES, tmp_path, rows1, outputs1)


def _singles(prefix: str, start: int, stop: int) -> list[str]:
    """Inputs with one manifest row each (one face, or none)."""
    cycle = ["camera", "astronaut", "coffee", "camera", "coffee", "camera", "coffee", "camera"]
    return [f"{prefix}{i:02d}_{cycle[i % 8]}" for i in range(start, stop)]


# Block C (8 inputs, three of them t1) is the last; it is still running when the driver is killed. (The rows
# of a block reach the driver only after the next block is merged: run 1 has flushed block A's rows, and
# written block B's outputs without their rows.)
BLOCK_C = [f"c{i}_{k}" for i, k in enumerate(["t1", "astronaut", "t1", "coffee", "t1", "astronaut", "camera",
                                               "coffee"])]


@pytest.mark.timeout(600)
def test_driver_sigkill_then_rerun_redoes_only_what_has_no_manifest_row(tmp_path):
    """The real CLI is SIGKILLed (its whole process group) once manifest parts exist and outputs were written
    whose rows were not flushed; the rerun skips exactly the inputs with done rows and redoes the rest.

    The inputs are ordered so that a part cut by row count would end inside an image: with t1's face 5 left
    in the buffer of a driver that dies, the rerun skipped t1 (its latest row is ok and its output exists)
    and face 5's row was never written (the manifest's PartWriter now keeps an image's face rows together)."""
    # Block A's rows are 31 + 6 (t1 last, rows 32-37): 4-row parts would hold rows 29-32 (t1's face 0) and
    # 33-36 (faces 1-4), and leave face 5 (row 37) in the driver's buffer when it dies.
    names = ["a00_empty"] + _singles("a", 1, 31) + ["a31_t1"] + ["b00_t1"] + _singles("b", 1, 32) + BLOCK_C
    sigkill_and_rerun(tmp_path, names)
