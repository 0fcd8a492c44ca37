"""How the plan reaches Ray: few large objects on the driver's side (start-up does not grow with the number of
32-input blocks), and still at most ``INPUT_ROWS_PER_BLOCK`` inputs a first-stage task (what a dying worker loses)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rp_distributed.config import load_config
from rp_distributed.job.dataset import (INPUT_ROWS_PER_BLOCK, PLAN_COLUMNS, StageSpec, build_dataset,
                                        forget_block_stats, put_blocks)
from rp_distributed.job.plan import TODO_SCHEMA

POISON = "in/0001/img_01234.jpg"


def _plan(n: int) -> pa.Table:
    rels = [f"{i // 1000:04d}/img_{i:05d}.jpg" for i in range(n)]
    return pa.table({"input_uri": [f"in/{r}" for r in rels], "rel_path": rels, "output_uri": [f"out/{r}" for r in rels],
                     "error": pa.nulls(n, pa.string()), "notes": pa.nulls(n, pa.string()),
                     "stale_output_uri": pa.nulls(n, pa.string()), "input_size": np.arange(n),
                     "input_version": pa.nulls(n, pa.string())}, schema=TODO_SCHEMA)


class _NoSettings:
    @staticmethod
    def of(cfg):
        return None


def test_the_plan_goes_to_ray_in_few_large_objects(ray_session):
    """At 10M inputs, 32-row objects meant 312,500 puts and as many metadata tasks before the first image."""
    n = 100_000
    blocks = put_blocks(_plan(n))
    assert len(blocks) <= 16, f"{len(blocks)} objects for {n} plan rows"
    back = pa.concat_tables(ray_session.get(blocks))
    assert back["input_uri"].to_pylist() == _plan(n)["input_uri"].to_pylist()


@pytest.mark.slow
def test_a_failed_first_stage_task_loses_at_most_one_input_block(ray_session):
    """The plan handed over in 1,000-row objects: the poison input's task still held at most INPUT_ROWS_PER_BLOCK
    inputs, so only those are missing (and redone one by one by the run), not its whole plan object."""
    cfg = load_config(None, ["ray.max_task_retries=0", "detection.resources.num_cpus=0.5",
                             "detection.resources.batch_size=8"])

    class DiesOnPoison:  # defined here: Ray's workers cannot import a test module
        """A first stage whose task fails when its batch holds the poison input (as a native decoder crash would take
        the task down): every input of that task is lost to the run, the rest come through."""

        def __init__(self, settings):
            pass

        def __call__(self, batch: dict) -> dict:
            if POISON in batch["input_uri"]:
                raise RuntimeError("poison input")
            return {"input_uri": batch["input_uri"]}

    ctx = ray_session.data.DataContext.get_current()
    saved, ctx.max_errored_blocks = ctx.max_errored_blocks, -1  # as the job runs: failed blocks are redone after
    try:
        plan = _plan(3000)
        spec = StageSpec("detect", DiesOnPoison, _NoSettings, lambda c: c.detection.resources, PLAN_COLUMNS)
        ds = build_dataset(cfg, put_blocks(plan, rows_per_block=1000), [spec])
        came = [r["input_uri"] for r in ds.iter_rows()]
    finally:
        ctx.max_errored_blocks = saved
    assert len(came) == len(set(came))
    lost = set(plan["input_uri"].to_pylist()) - set(came)
    assert POISON in lost
    assert len(lost) <= INPUT_ROWS_PER_BLOCK, f"a failed task lost {len(lost)} inputs"


def _stats_held(ds) -> dict[str, int]:
    """Per-block statistics the running execution of ``ds`` holds on the driver, by operator (Ray Data's own lists)."""
    return {op.name: len(op._output_blocks_stats) for op in ds._current_executor._topology
            if hasattr(op, "_output_blocks_stats")}


def test_the_driver_does_not_keep_a_statistic_per_block_of_the_run(ray_session):
    """Ray Data keeps one statistics object per output block of every operator until the dataset is done
    (ray-project/ray#66016): a driver streaming 10M inputs in batches of 8 would hold millions. The run drops all
    but the last ones as rows stream in; without that, they pile up one per batch (which also shows this Ray still
    keeps them: when it stops, this test says so and the workaround can go)."""
    class PassThrough:  # defined here: Ray's workers cannot import a test module
        def __init__(self, settings):
            pass

        def __call__(self, batch: dict) -> dict:
            return {"input_uri": batch["input_uri"]}

    cfg = load_config(None, ["detection.resources.num_cpus=0.5", "detection.resources.batch_size=4"])
    spec = StageSpec("detect", PassThrough, _NoSettings, lambda c: c.detection.resources, PLAN_COLUMNS)
    plan = _plan(3200)
    blocks = 3200 // INPUT_ROWS_PER_BLOCK  # the stage's output blocks: one a first-stage task
    ds = build_dataset(cfg, put_blocks(plan), [spec])
    came = [row["input_uri"] for row in ds.iter_rows()]
    assert sorted(came) == sorted(plan["input_uri"].to_pylist())
    stage = max(_stats_held(ds).items(), key=lambda kv: "PassThrough" in kv[0])  # the stage's own operator
    assert "PassThrough" in stage[0] and stage[1] >= blocks, \
        f"Ray Data held {stage} block statistics over {blocks} blocks: the workaround may no longer be needed " \
        "(ray-project/ray#66016)"
    ds = build_dataset(cfg, put_blocks(plan), [spec])
    came, most = [], 0
    for n, row in enumerate(ds.iter_rows(), 1):
        came.append(row["input_uri"])
        if n % 40 == 0:
            if n > 40:  # before the first call an upstream operator may have emitted all its blocks already
                most = max(most, sum(_stats_held(ds).values()))
            forget_block_stats(ds, keep=5)
    assert sorted(came) == sorted(plan["input_uri"].to_pylist())
    most = max(most, sum(_stats_held(ds).values()))
    assert most <= 30, f"{most} block statistics held with the run dropping them"


def test_the_plan_is_cut_for_the_first_stage_as_it_is_consumed(ray_session):
    """The repartition cutting plan blocks into first-stage tasks was held back by nothing (Ray Data's backpressure
    counts bytes, and plan rows are small): it cut every plan block at once, and the driver came to hold every
    32-input bundle until the first stage took it (312,500 at 10M inputs). Now it cuts only while fewer than a bound
    are queued, also while the first stage's actors are still starting (every operator idle: Ray Data then
    dispatches past its backpressure policies)."""
    from rp_distributed.job import plan_feed

    class SlowToStart:  # defined here: Ray's workers cannot import a test module
        def __init__(self, settings):
            import time
            time.sleep(3)  # a model loading

        def __call__(self, batch: dict) -> dict:
            import time
            time.sleep(0.01)
            return {"input_uri": batch["input_uri"]}

    cfg = load_config(None, ["detection.resources.num_cpus=0.5", "detection.resources.batch_size=4"])
    spec = StageSpec("detect", SlowToStart, _NoSettings, lambda c: c.detection.resources, PLAN_COLUMNS)
    per_block = 8192 // INPUT_ROWS_PER_BLOCK
    ds = build_dataset(cfg, put_blocks(_plan(8 * 8192)), [spec])  # 2,048 first-stage bundles in 8 plan blocks
    most_queued = started = came = 0
    for came, _ in enumerate(ds.iter_rows(), 1):
        topology = ds._current_executor._topology
        cutter = plan_feed.cutting_operator(topology)
        most_queued = max(most_queued, plan_feed.queued_for_first_stage(topology, cutter))
        started = cutter.metrics.num_tasks_submitted
        if came == 400:
            break
    assert came == 400
    assert started <= 2, f"{started} of 8 plan blocks cut while the first stage started and took 400 rows"
    bound = plan_feed.QUEUED_FLOOR + per_block  # the bound, and one plan block cut past it
    assert 0 < most_queued <= bound, f"{most_queued} first-stage bundles queued on the driver (bound {bound})"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_driver_lets_go_of_the_plan_rows_once_ray_holds_them(ray_session, tmp_path, astronaut_path, monkeypatch):
    """At 10M inputs the plan's rows are ~2 GB: once they are put into the object store the driver must not also
    keep them for the whole run (``run_job`` holds the plan to the end for its counts)."""
    import shutil
    import weakref

    from rp_distributed.job import plan as plan_mod, run
    from rp_distributed.manifest_writer import PartWriter
    from tests.conftest import FAST_DETECTION

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        shutil.copy(astronaut_path, src / f"a{i}.png")
    planned, alive_while_rows_arrive = [], []
    real_plan, real_add = plan_mod.make_plan, PartWriter.add

    def make_plan(*args, **kwargs):
        made = real_plan(*args, **kwargs)
        planned.append((made, weakref.ref(made.table)))  # the plan as run_job holds it, and its rows as planned
        return made

    def add(self, row):
        made, rows = planned[0]
        alive_while_rows_arrive.append(rows() is not None or made.table.num_rows > 0)
        return real_add(self, row)

    monkeypatch.setattr(plan_mod, "make_plan", make_plan)
    monkeypatch.setattr(PartWriter, "add", add)
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur"])
    result = run.run_job(cfg, str(src), str(tmp_path / "out"), progress=False, report=False)
    assert result.summary["images"] == 3 and len(alive_while_rows_arrive) >= 3
    assert not any(alive_while_rows_arrive), "the plan's rows were still held on the driver while the job ran"
    assert planned[0][0].num_todo == 3
