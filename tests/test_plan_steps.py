"""The plan's resume decisions are made a slice of the listing at a time (``RESUME_STEP``) and its membership tests a
value set at a time (``PROBE_STEP``), to keep 10M inputs in bounded memory. Whatever the step sizes, each decision
must equal the formula over the whole table that the plan used before (kept here as the reference): slices that
cross chunk edges, null keys, empty keys, repeated keys, inputs without a done row, and nulls in the recorded sizes
and change markers."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rp_distributed.job import plan as P

KEYS = [f"k{i}" for i in range(8)] + [""]


def _whole_table(latest: pa.Table, at, writes, files: pa.Table, fingerprint: str) -> dict:
    joined = latest.take(at)
    prev = joined["output_uri"]
    has_prev = pc.is_valid(prev)
    same_key = pc.fill_null(pc.equal(prev, writes), False)
    moved_out = pc.invert(pc.fill_null(pc.is_in(prev, value_set=writes.drop_null()), False))
    stale = pc.and_(pc.and_(has_prev, pc.invert(same_key)), moved_out)
    return {"has_prev": has_prev, "same_key": same_key,
            "same_fp": pc.fill_null(pc.equal(joined["settings_fingerprint"], pa.scalar(fingerprint)), False),
            "replaced": pc.or_(P._differs(joined["input_size"], files["size"]),
                               P._differs(joined["input_version"], files["version"])),
            "stale_key": pc.if_else(stale, prev, pa.scalar(None, pa.string()))}


def _chunked(values: list, type_: pa.DataType, rng: random.Random) -> pa.ChunkedArray:
    cut = sorted(rng.sample(range(len(values) + 1), k=min(2, len(values) + 1)))
    return pa.chunked_array([values[a:b] for a, b in zip([0] + cut, cut + [len(values)])], type_)


@pytest.mark.parametrize("seed", range(4))
def test_the_decisions_do_not_depend_on_the_step_sizes(monkeypatch, seed):
    monkeypatch.setattr(P, "RESUME_STEP", 3)
    monkeypatch.setattr(P, "PROBE_STEP", 2)
    rng = random.Random(seed)
    for _ in range(75):
        n, m = rng.randint(0, 12), rng.randint(1, 10)
        latest = pa.table({"output_uri": [rng.choice(KEYS) for _ in range(m)],
                           "settings_fingerprint": [rng.choice(["f", "g", None]) for _ in range(m)],
                           "input_size": pa.array([rng.choice([1, 2, None]) for _ in range(m)], pa.int64()),
                           "input_version": pa.array([rng.choice(["v", "w", None]) for _ in range(m)], pa.string())})
        at = _chunked([rng.choice(list(range(m)) + [None]) for _ in range(n)], pa.int32(), rng)
        writes = _chunked([rng.choice(KEYS + [None]) for _ in range(n)], pa.string(), rng)
        files = pa.table({"size": pa.array([rng.choice([1, 2, None]) for _ in range(n)], pa.int64()),
                          "version": pa.array([rng.choice(["v", "w", None]) for _ in range(n)], pa.string())})
        stepped = P._against_done(latest, at, writes, files, "f")
        for name, expected in _whole_table(latest, at, writes, files, "f").items():
            assert getattr(stepped, name).to_pylist() == expected.to_pylist(), (name, latest, at, writes)
        listed = pa.chunked_array([[rng.choice(KEYS) for _ in range(rng.randint(0, 6))]], pa.string())
        rooted = pa.chunked_array([[None if k is None else "R/" + k for k in writes.to_pylist()]], pa.string())
        whole = pc.fill_null(pc.is_in(pc.utf8_slice_codeunits(rooted, 2), value_set=listed), False)
        assert P._present(rooted, listed, strip=2).to_pylist() == whole.to_pylist(), (rooted, listed)
