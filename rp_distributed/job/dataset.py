"""The stages declared (in the manner of ray.data.llm's stages and processor): each names its callable, the config
sections it is built from, its resources and the columns it needs, and ``build_dataset`` applies them in order over
the plan's blocks as Ray Data actor pools.

    plan blocks -> DetectFaces (CPU) -> AnonymizeFaces (GPU or CPU) -> MergeAndWrite (CPU) -> manifest rows
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

from .. import io
from ..anonymizer import AnonymizerSettings
from ..config import JobConfig, StageResources
from ..stages.anonymize import AnonymizeFaces
from ..stages.detect import DetectFaces, DetectSettings
from ..stages.merge import MergeAndWrite, MergeSettings

PLAN_COLUMNS = ("input_uri", "rel_path", "output_uri", "stale_output_uri", "error", "notes")


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``fn`` built once per actor from ``settings.of(cfg)`` (its config sections) and ``extra`` (what
    the run adds: storages, run id), with ``resources(cfg)``; ``needs``: the input columns it reads."""

    name: str
    fn: type
    settings: type
    resources: Callable[[JobConfig], StageResources]
    needs: tuple[str, ...]
    extra: tuple = field(default=())

    def constructor_args(self, cfg: JobConfig) -> tuple:
        return (self.settings.of(cfg), *self.extra)


def stages(run_id: str, fingerprint: str | None, inputs: io.Storage | None,
           outputs: io.Storage | None) -> list[StageSpec]:
    return [
        StageSpec("detect", DetectFaces, DetectSettings, lambda c: c.detection.resources, PLAN_COLUMNS, (inputs,)),
        StageSpec("anonymize", AnonymizeFaces, AnonymizerSettings, lambda c: c.anonymizer.resources,
                  ("status", "payload")),
        StageSpec("merge", MergeAndWrite, MergeSettings, lambda c: c.merge.resources, ("status", "payload"),
                  (run_id, fingerprint, outputs)),
    ]


def _pool_args(cfg: JobConfig, res: StageResources, isolate: bool) -> dict:
    """Ray Data arguments of one actor-pool stage.

    A dead actor is restarted (``ray.max_actor_restarts``, unbounded by default) and its in-flight batch retried up
    to ``ray.max_task_retries`` times, not forever: an input that kills its worker every time (a native decoder
    crash, an OOM kill, a device fault) would otherwise stall the job. The run retries the inputs of such a batch
    one by one (``isolate``: one input per batch and one batch in flight per actor) and records the one that still
    fails."""
    import ray

    lo, hi = res.pool_bounds
    pool = ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, max_tasks_in_flight_per_actor=1 if isolate else None)
    return dict(compute=pool, num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
                batch_size=1 if isolate else res.batch_size, batch_format="numpy", zero_copy_batch=False,
                max_restarts=cfg.ray.max_actor_restarts, max_task_retries=cfg.ray.max_task_retries)


# A first-stage task gets at most this many inputs: a worker that dies loses its task's whole input block (retried,
# then redone one by one), so small blocks keep what one poison input costs small and give every stage enough
# blocks to use the whole cluster.
INPUT_ROWS_PER_BLOCK = 32
# The driver puts the plan in the object store in blocks this large, and Ray Data cuts them to INPUT_ROWS_PER_BLOCK
# as the run streams: at 10M inputs 1,221 objects (and as many metadata tasks before the first image), not 312,500.
PLAN_ROWS_PER_BLOCK = 8192
# CPUs of a task cutting one plan block (slicing Arrow, no copy of the rows' work): none, because stages may hold
# every CPU of the cluster (a GPU node's anonymizer at 1 CPU beside detection and merge at 0.5 each), and a cutting
# task waiting for a CPU would then never start: the run would hang before its first image.
SPLIT_NUM_CPUS = 0


def put_blocks(todo: pa.Table, rows_per_block: int = PLAN_ROWS_PER_BLOCK) -> list:
    """The plan's rows as object-store blocks of ``rows_per_block`` rows; the driver keeps only the refs."""
    import numpy as np
    import ray

    return [ray.put(todo.take(pa.array(np.arange(i, min(i + rows_per_block, todo.num_rows)))))
            for i in range(0, todo.num_rows, rows_per_block)]


def _cut(ds, rows_per_block: int):
    """``ds`` with its blocks cut to at most ``rows_per_block`` rows as they stream (Ray Data's streaming
    repartition: no shuffle). Its tasks would take 1 CPU each, and ``repartition`` has no resource arguments: where
    the actor pools hold all the cluster's CPUs but a fraction, or all of them, they would never start, so the
    plan's (logical) operator is given ``SPLIT_NUM_CPUS`` (none) through Ray Data's internal logical plan."""
    ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    ds._logical_plan.dag.ray_remote_args["num_cpus"] = SPLIT_NUM_CPUS
    return ds


def build_dataset(cfg: JobConfig, blocks: list, specs: list[StageSpec], isolate: bool = False):
    """The stages over the plan's ``blocks`` (``put_blocks``), in order, each first-stage task taking at most
    ``INPUT_ROWS_PER_BLOCK`` inputs; ``isolate``: one input per task and batch."""
    import ray

    from . import plan_feed

    first_batch = 1 if isolate or not specs else specs[0].resources(cfg).batch_size
    plan_feed.enable(ray.data.DataContext.get_current(),  # before the dataset: it copies the context
                     batch_bundles=math.ceil(first_batch / INPUT_ROWS_PER_BLOCK),
                     bundles_per_cut=PLAN_ROWS_PER_BLOCK // INPUT_ROWS_PER_BLOCK)
    ds = _cut(ray.data.from_arrow_refs(blocks), 1 if isolate else INPUT_ROWS_PER_BLOCK)
    missing = [c for c in specs[0].needs if c not in ray.get(blocks[0]).column_names] if blocks else []
    if missing:
        raise ValueError(f"the plan's blocks lack the columns the {specs[0].name} stage needs: {missing}")
    with warnings.catch_warnings():
        # max_restarts / max_task_retries have no named parameter in Ray 2.60; they still go through
        # ray_remote_args, which warns that the catch-all is deprecated.
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        for spec in specs:
            ds = ds.map_batches(spec.fn, fn_constructor_args=spec.constructor_args(cfg),
                                **_pool_args(cfg, spec.resources(cfg), isolate))
    return ds


# Per operator: the most recent blocks' statistics. 1,000 a operator held ~16K Python objects (~5 MB): measured as
# the driver's growth over the first 30 minutes of a 100K-image run, which a 1K-image run never reaches.
BLOCK_STATS_KEPT = 100


def forget_block_stats(ds, keep: int = BLOCK_STATS_KEPT) -> int:
    """Drop all but the last ``keep`` per-block statistics that each operator of ``ds``'s running execution holds
    on the driver; returns how many were dropped.

    Ray Data keeps one ``BlockStats`` per output block of every operator until the dataset is done
    (ray-project/ray#66016, open; Ray 2.60 does): a block per batch of each stage, so the driver grows with the run,
    GBs over 10M inputs. They feed only Ray's own statistics (``Dataset.stats()``, the stats actor, the log at the
    end), which then cover the last blocks only; the job's summary is its own. Trimmed in place: Ray's cached stats
    hold the same lists. A Ray without that list, or a dataset not running, is left as it is."""
    executor = getattr(ds, "_current_executor", None)
    dropped = 0
    for op in list(getattr(executor, "_topology", None) or ()):
        held = getattr(op, "_output_blocks_stats", None)
        if isinstance(held, list) and len(held) > keep:
            dropped += len(held) - keep
            del held[:len(held) - keep]  # one C call under the GIL: the executor's thread appends between calls
    return dropped
