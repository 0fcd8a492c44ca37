"""The job's progress bar: images/s, faces/s and an ETA, and each stage's state, from Ray Data's executor.

``run_job`` makes a ``Progress`` over the plan's inputs, feeds it each manifest row as it streams in
(``add``), and sets ``ACTIVE`` while its datasets run. ``StageMonitor``, an execution callback that Ray Data
instantiates in the driver for every dataset it executes (``register``), hands the executor to
``ACTIVE.observe`` at every scheduling step: each stage's running tasks, queued input blocks and starting
actors. That reads an internal Ray Data structure (checked on Ray 2.60); on anything unexpected the bar
shows no stage states and the rest keeps working.

The class is defined here, at module level, because Ray ships the DataContext (which lists it) to every
worker: it must pickle by reference, never with the bar in it.
"""

from __future__ import annotations

import time
from collections import deque

from tqdm import tqdm

try:
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # pragma: no cover - another Ray: no stage states, the rest of the bar works
    ExecutionCallback = None

STAGE_NAMES = {"DetectFaces": "detect", "AnonymizeFaces": "anonymize", "MergeAndWrite": "merge"}


class Progress:
    """The job's progress bar (tqdm): inputs done of the plan's, with images/s and faces/s over the last
    ``window_s`` seconds (since the start until then), the ETA from that image rate, and each stage's state
    (running tasks, queued input blocks, actors starting) read from Ray Data's streaming executor."""

    def __init__(self, total: int, enabled: bool = True, window_s: float = 60.0):
        self.total, self.images, self.faces = total, 0, 0
        self.window_s = window_s
        self.t0 = time.monotonic()
        self.events = deque([(self.t0, 0, 0)])
        self.stages = ""
        self.stage_error: str | None = None  # why stage states are not shown (an unexpected Ray Data)
        self._shown = 0.0
        self.bar = tqdm(total=total, unit="img", desc="anonymizing", disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} img [{elapsed}{postfix}]")

    def rates(self) -> tuple[float, float]:
        """(images/s, faces/s) over the window."""
        now = time.monotonic()
        t, i, f = self.events[0]
        dt = now - t
        if dt <= 0:
            return 0.0, 0.0
        return (self.images - i) / dt, (self.faces - f) / dt

    def eta_s(self) -> float | None:
        img_rate = self.rates()[0]
        return (self.total - self.images) / img_rate if img_rate > 0 else None

    def postfix(self) -> str:
        img_rate, face_rate = self.rates()
        eta = self.eta_s()
        text = (f"ETA {tqdm.format_interval(eta) if eta is not None else '?'}, {img_rate:.2f} img/s, "
                f"{face_rate:.2f} faces/s, {self.faces} faces")
        return text + (f" | {self.stages}" if self.stages else "")

    def add(self, images: int = 0, faces: int = 0) -> None:
        self.images += images
        self.faces += faces
        now = time.monotonic()
        self.events.append((now, self.images, self.faces))
        while len(self.events) > 2 and now - self.events[1][0] >= self.window_s:
            self.events.popleft()
        if images:
            self.bar.update(images)
        self.refresh(force=bool(images))

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._shown >= 0.5:
            self._shown = now
            self.bar.set_postfix_str(self.postfix(), refresh=True)

    def observe(self, executor) -> None:
        """Each stage's state from Ray Data's executor (an internal API: on any surprise, show none)."""
        try:
            parts = []
            for op, state in executor._topology.items():
                name = op.name
                if not name.startswith("MapBatches("):
                    continue
                short = STAGE_NAMES.get(name[len("MapBatches("):-1], name)
                running, queued = op.num_active_tasks(), state.total_enqueued_input_blocks()
                starting = 0
                if hasattr(op, "get_actor_info"):
                    info = op.get_actor_info()
                    starting = getattr(info, "pending", 0) + getattr(info, "restarting", 0)
                if op.has_execution_finished():
                    parts.append(f"{short} done")
                elif running or queued or starting:
                    parts.append(f"{short} {running} busy {queued} queued" +
                                 (f" {starting} starting" if starting else ""))
                else:
                    parts.append(f"{short} idle")
            self.stages = ", ".join(parts)
        except Exception as exc:  # noqa: BLE001 - progress must never break the job
            self.stages, self.stage_error = "", f"{type(exc).__name__}: {exc}"
        self.refresh()

    def close(self) -> None:
        self.stages = ""
        self.refresh(force=True)  # the final counts (rows after an image's first are shown at most every 0.5 s)
        self.bar.close()


ACTIVE: Progress | None = None  # the running job's bar (run_job sets and clears it)

if ExecutionCallback is not None:
    class StageMonitor(ExecutionCallback):
        """Ray Data calls this in the driver at every scheduling step of a dataset's execution."""

        def on_execution_step(self, executor) -> None:
            bar = ACTIVE
            if bar is not None:
                bar.observe(executor)
else:  # pragma: no cover
    StageMonitor = None


def register(ctx) -> None:
    """Add ``StageMonitor`` to the DataContext's execution callbacks (once)."""
    if StageMonitor is None or not hasattr(ctx, "custom_execution_callback_classes"):
        return
    if StageMonitor not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(StageMonitor)
