"""How well a clustering matches the true identities: pairwise precision and recall (over pairs of faces) and
BCubed precision, recall and F1 (per face, averaged), from the contingency table of the two labellings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusterScores:
    pairwise_precision: float  # of the pairs put together, the share that are one person
    pairwise_recall: float  # of the pairs that are one person, the share put together
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f1: float
    clusters: int
    identities: int

    def line(self) -> str:
        return (f"pairwise P {self.pairwise_precision:.3f} R {self.pairwise_recall:.3f}; BCubed P "
                f"{self.bcubed_precision:.3f} R {self.bcubed_recall:.3f} F1 {self.bcubed_f1:.3f}; "
                f"{self.clusters} clusters for {self.identities} identities")


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


def scores(predicted, truth) -> ClusterScores:
    """Scores of ``predicted`` cluster labels against ``truth`` identity labels (any hashable labels, one per face).
    With no pair to judge (every cluster a singleton), the pairwise figure is 1.0."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"{predicted.shape} predicted labels but {truth.shape} true ones")
    n = len(predicted)
    if n == 0:
        return ClusterScores(1.0, 1.0, 1.0, 1.0, 1.0, 0, 0)
    _, p = np.unique(predicted, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    cells, joint = np.unique(p.astype(np.int64) * (t.max() + 1) + t, return_counts=True)
    cell_p, cell_t = cells // (t.max() + 1), cells % (t.max() + 1)
    size_p, size_t = np.bincount(p), np.bincount(t)
    together, same = _pairs(size_p), _pairs(size_t)
    both = _pairs(joint)
    joint = joint.astype(np.float64)
    bp = float((joint ** 2 / size_p[cell_p]).sum() / n)
    br = float((joint ** 2 / size_t[cell_t]).sum() / n)
    return ClusterScores(
        pairwise_precision=both / together if together else 1.0,
        pairwise_recall=both / same if same else 1.0,
        bcubed_precision=bp, bcubed_recall=br, bcubed_f1=2 * bp * br / (bp + br),
        clusters=len(size_p), identities=len(size_t))
