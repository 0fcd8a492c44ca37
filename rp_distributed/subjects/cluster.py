"""Face descriptors into subjects: a k-nearest-neighbour graph at the recognizer's threshold, then a graph clustering.

    labels = cluster(descriptors, ClusterParams(threshold=0.6))   # one int per row, 0.. in order of first member

The graph: each face is joined to those of its ``neighbors`` nearest faces (faiss) that lie closer than
``threshold`` (the recognizer's own same-person distance: dlib 0.6 euclidean), made undirected. Below
``exact_below`` faces the search is exact (``IndexFlatL2``); above, an inverted file (``IndexIVFFlat``, 4·√N lists,
``nprobe`` probed), which holds the descriptors once and no graph of its own. Descriptors are read in chunks from
any array (a ``np.memmap`` of a file works): the index holds the one copy in memory.

The clustering (``METHODS``): ``chinese_whispers`` (dlib's face clustering: each node takes the label most of
its neighbours hold, itself included, in a random order, until no label changes) or ``components`` (connected
components: one chance edge between two people merges them). BENCHMARKS.md ("Subjects") compares them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class ClusterParams:
    threshold: float  # euclidean distance below which two descriptors may be one person
    neighbors: int = 16  # edges looked for per face (the graph has at most this many out of each face)
    method: str = "chinese_whispers"  # a key of METHODS
    exact_below: int = 200_000  # faces below which the kNN search is exact
    nprobe: int = 16  # inverted lists probed per query above exact_below
    iterations: int = 100  # Chinese whispers: most passes over the nodes (stops earlier once stable)
    seed: int = 0
    chunk: int = 16_384  # descriptors per faiss add/search call

    def __post_init__(self):
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if self.neighbors < 1:
            raise ValueError(f"neighbors must be >= 1, got {self.neighbors}")
        if self.method not in METHODS:
            raise ValueError(f"unknown clustering method {self.method!r}; known: {', '.join(METHODS)}")


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def build_index(descriptors, params: ClusterParams):
    """A faiss index holding every row of ``descriptors`` (float32, N x D), exact or IVF by size."""
    import faiss

    n, dim = descriptors.shape
    if n < params.exact_below:
        index = faiss.IndexFlatL2(dim)
    else:
        nlist = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        rng = np.random.default_rng(params.seed)
        sample = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
        index.train(np.ascontiguousarray(descriptors[sample], dtype=np.float32))
        index.nprobe = params.nprobe
    for start, stop in _chunks(n, params.chunk):
        index.add(np.ascontiguousarray(descriptors[start:stop], dtype=np.float32))
    return index


def knn_graph(descriptors, params: ClusterParams):
    """The undirected graph (``scipy.sparse.csr_matrix``, N x N) joining each face to its nearest faces below
    ``params.threshold``, each edge weighted ``1 - distance / threshold`` (in (0, 1]: a close pair weighs more than
    a chance one near the threshold); no self loops."""
    import scipy.sparse as sp

    n = descriptors.shape[0]
    index = build_index(descriptors, params)
    limit = np.float32(params.threshold) ** 2  # faiss reports squared L2
    k = min(params.neighbors + 1, n)  # +1: a face finds itself first
    heads, tails, weights = [], [], []
    for start, stop in _chunks(n, params.chunk):
        dist, found = index.search(np.ascontiguousarray(descriptors[start:stop], dtype=np.float32), k)
        me = np.arange(start, stop, dtype=np.int64)[:, None]
        keep = (found >= 0) & (dist < limit) & (found != me)
        heads.append(np.broadcast_to(me, found.shape)[keep].astype(np.int32))
        tails.append(found[keep].astype(np.int32))
        weights.append((1 - np.sqrt(np.maximum(dist[keep], 0)) / params.threshold).astype(np.float32))
    del index
    heads, tails, weights = np.concatenate(heads), np.concatenate(tails), np.concatenate(weights)
    np.maximum(weights, np.float32(1e-6), out=weights)  # an edge at the threshold's rounding is still an edge
    graph = sp.csr_matrix((weights, (heads, tails)), shape=(n, n))
    del heads, tails, weights
    return graph.maximum(graph.T).tocsr()  # found from either side: the same distance, kept once


def _whispers_kernel():
    """The numba kernel (compiled on first use): Chinese whispers (Biemann 2006) over a weighted CSR graph: each
    node, in a random order, takes the label of the largest summed edge weight among its neighbours (and its own,
    weighted ``self_weight``), ties broken at random."""
    from numba import njit

    @njit(cache=True, nogil=True)
    def whispers(indptr, indices, weights, self_weight, iterations, seed):
        n = len(indptr) - 1
        labels = np.arange(n)
        np.random.seed(seed)
        width = 1
        for v in range(n):
            width = max(width, indptr[v + 1] - indptr[v] + 1)
        votes = np.empty(width, np.int64)
        mass = np.empty(width, np.float64)
        for _ in range(iterations):
            changed = 0
            for v in np.random.permutation(n):
                start, stop = indptr[v], indptr[v + 1]
                if start == stop:
                    continue
                m = stop - start
                for j in range(m):
                    votes[j], mass[j] = labels[indices[start + j]], weights[start + j]
                votes[m], mass[m] = labels[v], self_weight
                order = np.argsort(votes[:m + 1])
                best, best_mass, ties, run = labels[v], -1.0, 0, 0.0
                for j in range(m + 1):
                    label = votes[order[j]]
                    run = run + mass[order[j]] if j > 0 and label == votes[order[j - 1]] else mass[order[j]]
                    if j < m and votes[order[j + 1]] == label:
                        continue  # the run of this label goes on
                    if run > best_mass:
                        best, best_mass, ties = label, run, 1
                    elif run == best_mass:  # a tie: uniformly among the labels tied so far
                        ties += 1
                        if np.random.randint(0, ties) == 0:
                            best = label
                if best != labels[v]:
                    labels[v] = best
                    changed += 1
            if changed == 0:
                break
        return labels

    return whispers


_KERNEL: list = []
SELF_WEIGHT = 0.0  # a node's own label's vote: any more and no node would leave the label it starts with


def chinese_whispers(graph, params: ClusterParams) -> np.ndarray:
    if not _KERNEL:
        _KERNEL.append(_whispers_kernel())
    return _KERNEL[0](graph.indptr.astype(np.int64), graph.indices.astype(np.int64),
                      graph.data.astype(np.float64), SELF_WEIGHT, params.iterations, params.seed)


def connected_components(graph, params: ClusterParams) -> np.ndarray:
    from scipy.sparse.csgraph import connected_components as components

    return components(graph, directed=False)[1]


# The graph clusterings, by name (``ClusterParams.method``): each maps the CSR graph to one label per node.
METHODS: dict[str, Callable[[object, ClusterParams], np.ndarray]] = {
    "chinese_whispers": chinese_whispers,
    "components": connected_components,
}


def first_seen_order(labels: np.ndarray) -> np.ndarray:
    """``labels`` renumbered 0, 1, ... in the order each cluster's first row appears."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def cluster(descriptors, params: ClusterParams) -> np.ndarray:
    """One cluster number per row of ``descriptors`` (N x D float32, an array or memmap), numbered in the order of
    each cluster's first row. Rows with a non-finite value get a cluster of their own."""
    n = descriptors.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    graph = knn_graph(descriptors, params)
    labels = METHODS[params.method](graph, params)
    return first_seen_order(np.asarray(labels))


def subject_names(labels: np.ndarray, width: int = 6) -> list[str]:
    """``s000000``-style names of cluster numbers (wider when there are more clusters than ``width`` digits hold)."""
    width = max(width, len(str(int(labels.max())))) if len(labels) else width
    return [f"s{v:0{width}d}" for v in labels.tolist()]
