"""The report's pseudonym consistency (``report/consistency.py``) over many linked faces: wall time and peak memory of
streaming them in the report's batches, and what ``anon_descriptor`` adds to a manifest part on disk.

Subjects get 1 + Poisson(2) faces, descriptors near a centre per subject, in shuffled (manifest) order.

    python benchmarks/bench_consistency.py --faces 1000000

Prints one JSON line; results go in BENCHMARKS.md with the machine named."""

from __future__ import annotations

import argparse
import io
import json
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rp_distributed.report.consistency import Consistency
from rp_distributed.report.latest import BATCH_ROWS


def batches(faces: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    subjects = rng.integers(0, 2**60, faces // 3 + 1)
    ids = np.repeat(subjects, 1 + rng.poisson(2.0, len(subjects)))[:faces]
    rng.shuffle(ids)
    for start in range(0, len(ids), BATCH_ROWS):
        chunk = ids[start:start + BATCH_ROWS]
        d = (rng.normal(0, 0.05, (len(chunk), 128)) + (chunk[:, None] % 97) / 970).astype("<f4")
        cells = pa.FixedSizeBinaryArray.from_buffers(pa.binary(512), len(chunk), [None, pa.py_buffer(d.tobytes())])
        yield pa.table({"pseudonym_id": pa.array([f"{v:016x}" for v in chunk]),
                        "anon_descriptor": cells.cast(pa.binary()),
                        "reid_distance": pa.array(rng.uniform(0.6, 1.2, len(chunk)), pa.float32())})


def part_bytes(table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.tell()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=int, default=1_000_000)
    args = ap.parse_args()
    first = next(batches(BATCH_ROWS))
    per_face = (part_bytes(first) - part_bytes(first.drop_columns(["anon_descriptor"]))) / first.num_rows
    tracemalloc.start()
    for _ in batches(args.faces):  # the synthetic batches alone: the baseline of the peaks below
        pass
    base = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.reset_peak()
    pool = pa.default_memory_pool()
    acc, t0 = Consistency(), time.perf_counter()
    for batch in batches(args.faces):
        acc.add(batch)
    t_stream = time.perf_counter() - t0
    c = acc.result(0.6)
    t_all = time.perf_counter() - t0
    print(json.dumps({"faces": args.faces, "stream_s": round(t_stream, 2), "result_s": round(t_all - t_stream, 2),
                      "held_faces": acc.held.num_rows, "held_mib": round(acc.held.nbytes / 2**20, 1),
                      "python_peak_batches_alone_mib": round(base, 1), "subjects_measured": c.measured, "pairs": len(c.between),
                      "python_peak_mib": round(tracemalloc.get_traced_memory()[1] / 2**20, 1),
                      "arrow_peak_mib": round(pool.max_memory() / 2**20, 1),
                      "manifest_bytes_per_linked_face": round(per_face, 1)}))


if __name__ == "__main__":
    main()
