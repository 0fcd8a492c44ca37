"""onnxruntime sessions that use the CPUs their process was granted, not every core of the machine."""

from __future__ import annotations

import os


def session_options():
    """onnxruntime's default is one intra-op thread per physical core, spinning while it waits for work. A Ray
    actor granted half a CPU on a 64-core node would then run 64 threads, and so would each of its neighbours.
    Ray sets ``OMP_NUM_THREADS`` in each worker to the whole CPUs it was granted (at least 1), as torch reads it:
    the session takes the same number. Where it is unset (a plain process), onnxruntime's default stands."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    threads = os.environ.get("OMP_NUM_THREADS", "").strip()
    if threads.isdigit() and int(threads) > 0:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options
