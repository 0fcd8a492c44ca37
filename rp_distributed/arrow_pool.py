"""The driver's Arrow memory through jemalloc: imported first by ``rp-anonymize`` (and the benchmarks that stand for
its driver), before anything imports pyarrow, because Arrow reads the choice once, when it first allocates.

jemalloc hands freed pages back to the system within about a second; mimalloc (pyarrow's default) keeps them for
reuse, and the plan's phases (the manifest's parts, then the listing, then the output keys) stacked up: the plan of
10M inputs peaked ~0.7 GiB higher (BENCHMARKS.md, the driver at 10M). A pool the user chose is kept; a wheel
without jemalloc falls back to its default (Arrow says so once).
"""

import os

os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
