"""How far the subject clustering scales on one machine, and how well it clusters real photos.

    python benchmarks/bench_subjects.py --sizes 100000 1000000        # synthetic descriptors
    python benchmarks/bench_subjects.py --photos                       # t1.jpg's variations, real dlib

Synthetic: N 128-d float32 descriptors drawn as clusters around random centres with dlib's geometry (centres
N(0, 0.0625^2) per dimension: two people ~1.0 apart; each cluster's spread drawn in U(0.015, 0.03) per dimension:
two faces of one person 0.24-0.48 apart; cluster sizes geometric with mean 10), written to a file and read through
a memmap as the command reads its spool. Each size runs in a child process (its peak RSS is the clustering's own):
wall and CPU time of the kNN graph (faiss index + search, once) and of each clustering of it, peak RSS after the
graph and at the end, and BCubed F1 against the drawn clusters. Numba's compile time is measured apart (once per process).

Photos: ``subjects_set.described_set`` with the job's dlib descriptors; pairwise and BCubed scores per method and
threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def draw(n: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """``n`` synthetic descriptors (``descriptors.f32``, n x 128) and their cluster ids (``truth.npy``)."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.extend(rng.geometric(0.1, 10_000).tolist())
    sizes = np.array(sizes)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n) + 1]
    sizes[-1] -= sizes.sum() - n
    truth = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))  # faces of one person spread over the set
    centres = rng.normal(0, 0.0625, (len(sizes), 128)).astype(np.float32)
    spread = rng.uniform(0.015, 0.03, len(sizes)).astype(np.float32)
    path = folder / f"descriptors_{n}.f32"
    out = np.memmap(path, np.float32, "w+", shape=(n, 128))
    for start in range(0, n, 100_000):
        t = truth[start:start + 100_000]
        out[start:start + len(t)] = centres[t] + rng.normal(0, 1, (len(t), 128)).astype(np.float32) * spread[t, None]
    out.flush()
    del out
    np.save(folder / f"truth_{n}.npy", truth)
    return path, folder / f"truth_{n}.npy"


def child(path: str, truth: str, n: int, methods: list[str], exact_below: int, threads: int) -> dict:
    """The kNN graph once, then each clustering of it, timed, in this process."""
    import faiss

    from rp_distributed.subjects import METHODS, ClusterParams, scores

    if threads:
        faiss.omp_set_num_threads(threads)
    from rp_distributed.subjects.cluster import first_seen_order, knn_graph

    params = ClusterParams(threshold=0.6, exact_below=exact_below)
    t = time.perf_counter()
    for method in methods:  # numba's compile, apart
        METHODS[method](knn_graph(np.zeros((3, 128), np.float32), params), params)
    row = {"n": n, "search": "exact" if n < exact_below else "ivf", "faiss_threads": faiss.omp_get_max_threads(),
           "numba_compile_s": round(time.perf_counter() - t, 1)}
    x = np.memmap(path, np.float32, "r", shape=(n, 128))
    w0, c0 = time.perf_counter(), time.process_time()
    graph = knn_graph(x, params)
    row.update(edges=graph.nnz // 2, graph_wall_s=round(time.perf_counter() - w0, 1),
               graph_cpu_s=round(time.process_time() - c0, 1),
               graph_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    del x
    truth_labels = np.load(truth)
    for method in methods:
        w1, c1 = time.perf_counter(), time.process_time()
        labels = first_seen_order(METHODS[method](graph, params))
        got = scores(labels, truth_labels)
        row[method] = {"wall_s": round(time.perf_counter() - w1, 1), "cpu_s": round(time.process_time() - c1, 1),
                       "bcubed_f1": round(got.bcubed_f1, 4), "pairwise_precision": round(got.pairwise_precision, 4),
                       "pairwise_recall": round(got.pairwise_recall, 4), "clusters": got.clusters}
    row.update(identities=int(truth_labels.max()) + 1,
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return row


def synthetic(sizes: list[int], methods: list[str], exact_below: int, threads: int, folder: Path) -> None:
    for n in sizes:
        path, truth = draw(n, folder)
        cmd = [sys.executable, __file__, "--child", str(path), str(truth), str(n), ",".join(methods), str(exact_below),
               str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)
        path.unlink()


def photos() -> None:
    from benchmarks.subjects_set import described_set
    from rp_distributed.config import load_config
    from rp_distributed.subjects import ClusterParams, cluster, scores
    from rp_distributed.subjects.describe import DescribeFaces, SubjectSettings

    fast = ["detection.passes=[{member: centerface}]"]
    stage = DescribeFaces(SubjectSettings.of(load_config(None, fast)))
    with tempfile.TemporaryDirectory() as d:
        faces = described_set(stage, Path(d))
    x, truth = np.stack([f.descriptor for f in faces]), [f.identity for f in faces]
    print(f"{len(faces)} faces, {len(set(truth))} identities")
    for method in ("chinese_whispers", "components"):
        for threshold in (0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8):
            s = scores(cluster(x, ClusterParams(threshold=threshold, method=method)), truth)
            print(f"| {method} | {threshold} | {s.pairwise_precision:.3f} | {s.pairwise_recall:.3f} | "
                  f"{s.bcubed_precision:.3f} | {s.bcubed_recall:.3f} | {s.bcubed_f1:.3f} | {s.clusters} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, truth, n, methods, exact_below, threads = sys.argv[2:8]
        print(json.dumps(child(path, truth, int(n), methods.split(","), int(exact_below), int(threads))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--methods", nargs="+", default=["chinese_whispers", "components"])
    ap.add_argument("--exact-below", type=int, default=None, help="ClusterParams.exact_below (default: its own)")
    ap.add_argument("--threads", type=int, default=0, help="faiss's OpenMP threads (0: its default, every core)")
    ap.add_argument("--work-dir", default=None, help="where the synthetic descriptors are written")
    ap.add_argument("--photos", action="store_true", help="the real-photo set instead")
    args = ap.parse_args()
    if args.photos:
        photos()
        return
    from rp_distributed.subjects import ClusterParams

    exact_below = args.exact_below if args.exact_below is not None else ClusterParams(threshold=0.6).exact_below
    with tempfile.TemporaryDirectory(dir=args.work_dir) as d:
        synthetic(args.sizes, args.methods, exact_below, args.threads, Path(d))
    print(f"# cpu: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
