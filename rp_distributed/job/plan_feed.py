"""The plan fed to the first stage as it is consumed, not all at once.

The plan reaches Ray in a few large blocks (``dataset.PLAN_ROWS_PER_BLOCK`` rows), cut to first-stage tasks of
``INPUT_ROWS_PER_BLOCK`` inputs by a streaming repartition. Ray Data's backpressure is counted in object-store
bytes, and a plan block is small (~300 bytes a row): nothing held the cutting back, so it cut the whole plan at the
start and the driver kept every 32-input bundle (a ref, its metadata, its schema: ~40 Python objects) queued until
the first stage took it: 3,125 bundles at 100K inputs, 312,500 at 10M. Now the cutting operator starts a task only
while the bundles queued for the first stage, and those its running tasks will add, number fewer than
``QUEUED_FLOOR`` or ``QUEUED_PER_SLOT`` per task the first stage can run at once (and always enough for one first-stage
batch), so the driver holds what the cluster can use, not what the dataset holds.

The gate is the operator's own ``can_add_input``, not only a backpressure policy: when every operator is idle Ray
Data dispatches past its policies to stay live, and while the first stage's actors start (minutes for a GPU model
on a growing cluster) every operator is idle, so a policy alone let the cutting run through the plan then.
"""

from __future__ import annotations

from ray.data._internal.execution.backpressure_policy import (ENABLED_BACKPRESSURE_POLICIES,
                                                              ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                                                              BackpressurePolicy)
from ray.data._internal.execution.operators.input_data_buffer import InputDataBuffer

# Bundles queued for the first stage before the next plan block is cut: one plan block's worth at least (8,192
# inputs ready: minutes of work for a small pool), and more where the first stage runs many tasks at once.
QUEUED_FLOOR = 256
QUEUED_PER_SLOT = 4
CUTTING_OPERATOR = "StreamingRepartition"  # the physical operator ``dataset._cut`` plans, by Ray Data's name
# Set by ``enable``: the bundles one first-stage batch takes (the queue is never held below two batches, or the stage
# could wait for rows the gate will not cut) and the bundles one cutting task adds (a plan block's).
BUNDLES = "rp_distributed.plan_feed.bundles"


def _is_cutting(op) -> bool:
    """The operator that cuts the plan's blocks: a repartition fed straight from the plan's refs."""
    return op.name.startswith(CUTTING_OPERATOR) and any(isinstance(d, InputDataBuffer) for d in op.input_dependencies)


def queued_for_first_stage(topology, op) -> int:
    """Bundles the cutting operator ``op`` made that no first-stage task has taken yet: the first stage's input
    queues (the cutter's output queue is one of them) and its own bundler, and what the cutter holds back."""
    held = op.internal_output_queue_num_blocks() if hasattr(op, "internal_output_queue_num_blocks") else 0
    return held + sum(topology[d].total_enqueued_input_blocks() for d in op.output_dependencies if d in topology)


def cutting_operator(topology):
    """The plan-cutting operator of a running execution's ``topology`` (None if it has none)."""
    return next((op for op in topology if _is_cutting(op)), None)


class PlanFeed(BackpressurePolicy):
    """Gates the plan-cutting operator of the execution it is made for (see the module's docstring); every other
    operator is left to Ray Data's own policies."""

    def __init__(self, data_context, topology, resource_manager):
        super().__init__(data_context, topology, resource_manager)
        batch_bundles, self._per_cut = data_context.get_config(BUNDLES)
        self._floor = max(QUEUED_FLOOR, 2 * batch_bundles)
        for op in topology:
            if _is_cutting(op):
                own = op.can_add_input
                op.can_add_input = lambda op=op, own=own: own() and self.may_cut(op)

    @property
    def name(self) -> str:
        return "PlanFeed"

    def limit(self, op) -> int:
        slots = sum(d.get_max_concurrency_limit() or 0 for d in op.output_dependencies)
        return max(self._floor, QUEUED_PER_SLOT * slots)

    def may_cut(self, op) -> bool:
        """Whether one more cutting task keeps the queue within the limit (a first cut is always allowed)."""
        queued = queued_for_first_stage(self._topology, op)
        return queued + op.num_active_tasks() * self._per_cut < self.limit(op)


def enable(ctx, batch_bundles: int, bundles_per_cut: int) -> None:
    """Add ``PlanFeed`` to the backpressure policies of ``ctx`` (a ``DataContext``), once, with the bundles one
    first-stage batch takes and one cutting task adds; a dataset takes its context's policies when it is created."""
    ctx.set_config(BUNDLES, (max(1, int(batch_bundles)), int(bundles_per_cut)))
    policies = list(ctx.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES))
    if PlanFeed not in policies:
        ctx.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [*policies, PlanFeed])
