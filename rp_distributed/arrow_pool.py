"""The driver's Arrow memory through jemalloc: imported first by ``rp-anonymize`` (and the benchmarks that stand for
its driver), before anything imports pyarrow, because Arrow chooses its allocator once, when it loads.

jemalloc hands freed pages back to the system within about a second; mimalloc (pyarrow's default) keeps them for
reuse, and the plan's phases (the manifest's parts, then the listing, then the output keys) stacked up: the plan of
10M inputs peaked ~0.8 GiB higher (BENCHMARKS.md, the driver at 10M). Only this process: the variable is removed
again once Arrow has read it, so the Ray workers and other processes the driver starts keep their default (their
memory was not measured under it). A pool the user chose (``ARROW_DEFAULT_MEMORY_POOL``) is kept, and passed on; a
wheel without jemalloc falls back to its default (Arrow says so once).
"""

import os

_CHOSEN_HERE = "ARROW_DEFAULT_MEMORY_POOL" not in os.environ
if _CHOSEN_HERE:
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"

import pyarrow  # noqa: E402  (loads Arrow, which reads the variable now)

pyarrow.default_memory_pool()
if _CHOSEN_HERE:
    del os.environ["ARROW_DEFAULT_MEMORY_POOL"]
