"""The report and ``inspect`` stream the manifest: memory bounded in its size, and the same facts as the
per-row computation they replace.

Manifests are synthetic (``benchmarks/bench_report.py``): a run over every input, then a resumed run that redid
some of them, with every column filled as the job fills it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.bench_report import write_manifest
from tests.conftest import REPO

MEASURE = r"""
import json, resource, sys
from rp_distributed import report
small, big = sys.argv[1], sys.argv[2]
report.write_report(small)  # imports, matplotlib, Arrow's pools: what any report costs
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report.write_report(big)
text = report.inspect_text(report.load(big), big, failed=True)
print(json.dumps({"growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def _growth(small, big) -> float:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(small), str(big)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_mib"]


@pytest.mark.slow
def test_report_memory_does_not_grow_with_the_manifest(tmp_path):
    """The peak memory of ``report`` and ``inspect`` over a manifest of 24 parts (240K rows) is within a few MiB of
    one of 3 parts: what is held is a part at a time and fixed-size sketches, not the rows. (Holding the rows as
    Python objects, about 4 KB a row, grows by more than 800 MiB here.)"""
    small, big = tmp_path / "small", tmp_path / "big"
    write_manifest(small / "_manifest", inputs=9_000, part_rows=10_000, resume=False)
    counts = write_manifest(big / "_manifest", inputs=72_000, part_rows=10_000)
    assert counts["rows"] > 200_000 and counts["parts"] >= 24
    base = _growth(small, small)
    growth = _growth(small, big)
    # The big manifest's key table (16 bytes an input) and larger reason groups are a few MiB.
    assert growth - base < 40, (base, growth)
