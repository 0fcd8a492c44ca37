"""The report's plots: matplotlib figures drawn from the facts' bins, embedded as base64 PNG."""

from __future__ import annotations

import base64
import io as _io

import numpy as np

from .facts import STAGES, Facts
from .sketch import Bins


def _figure(width: float = 7.5, height: float = 3.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # counts of faces are whole numbers
        if ax.get_ylabel() == "faces":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def _edges(*sketches: Bins, extra: float | None = None, lo: float = 0.0, n: int = 30) -> np.ndarray:
    """``n`` display bins from ``lo`` to the largest value (or ``extra``, a line drawn on the plot)."""
    tops = [s.hi for s in sketches if len(s)] + ([extra] if extra is not None else [])
    top = max(tops) if tops else lo
    return np.linspace(lo, top if top > lo else lo + 1e-3, n + 1)


def _hist(ax, sketch: Bins, edges: np.ndarray, **kw) -> None:
    """A histogram of the sketch's values on ``edges`` (each fine bin counted where its middle falls)."""
    at, counts = sketch.centers()
    ax.hist(at, bins=edges, weights=counts, **kw)


def _two_histograms(series: list[tuple[Bins, str, str]], threshold: float | None, threshold_label: str,
                    xlabel: str) -> str | None:
    """Up to two distance histograms (sketch, colour, label) on shared bins, with the threshold's line."""
    drawn = [(sketch, color, label) for sketch, color, label in series if len(sketch)]
    if not drawn:
        return None
    fig = _figure(7.5, 3.2)
    ax = fig.add_subplot()
    edges = _edges(*(sketch for sketch, _, _ in series), extra=threshold)
    for sketch, color, label in drawn:
        _hist(ax, sketch, edges, alpha=0.55, color=color, label=label)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.5,
                   label=f"threshold {threshold:g} ({threshold_label})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("faces")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def plot_reid(f: Facts) -> str | None:
    return _two_histograms(
        [(f.first_try, "#d95f02", f"first try ({len(f.first_try)} faces)"),
         (f.final, "#1b9e77", f"output check ({len(f.final)} written faces)")],
        f.threshold, "re-identified below",
        "re-ID distance, original vs anonymized (dlib recognizer; higher = less alike)")


def plot_consistency(f: Facts) -> str | None:
    c = f.consistency
    return _two_histograms(
        [(c.between, "#7570b3", f"between two written faces of one subject ({len(c.between)} pairs)"),
         (c.to_original, "#1b9e77", f"written face to its own original ({len(c.to_original)} faces)")],
        c.threshold, "one person below", "recognizer distance (dlib; lower = more alike)")


def plot_ladder(f: Facts) -> str | None:
    if not any(r.checked for r in f.ladder):
        return None
    fig = _figure(7.5, 2.8)
    ax = fig.add_subplot()
    labels = [f"try {r.number}\ng = {r.guidance:g}" if r.guidance is not None else f"try {r.number}"
              for r in f.ladder]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [r.run for r in f.ladder], width=0.4, color="#7570b3", label="faces run at this rung")
    ax.bar(x + 0.2, [r.passed for r in f.ladder], width=0.4, color="#1b9e77", label="not re-identified after it (done)")
    ax.set_xticks(x, labels)
    ax.set_ylabel("faces")
    ax.legend(fontsize=8)
    ax.set_title(f"{f.fell_back_after_ladder} faces still re-identified after the last rung: fallback", fontsize=9)
    return _png(fig)


def plot_utility(f: Facts) -> str | None:
    if not len(f.pose) and not len(f.drift):
        return None
    fig = _figure(7.5, 2.8)
    for i, (sketch, label, color) in enumerate(
            [(f.pose, "head-pose change, degrees (max of yaw, pitch, roll)", "#e7298a"),
             (f.drift, "landmark shift, inter-ocular distances (mean of 5 points)", "#66a61e")]):
        ax = fig.add_subplot(1, 2, i + 1)
        if len(sketch):
            _hist(ax, sketch, _edges(sketch, n=20), color=color)
            median = sketch.quantile(0.5)
            ax.axvline(median, color="black", linestyle=":", linewidth=1, label=f"median {median:.2f}")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("faces")
    return _png(fig)


def plot_timings(f: Facts) -> str | None:
    data = [(label + f" (per {per})", f.timings[col]) for col, label, per in STAGES if len(f.timings[col])]
    if not data:
        return None
    from matplotlib.ticker import NullFormatter

    fig = _figure(7.5, 0.5 + 0.55 * len(data))
    ax = fig.add_subplot()
    # Box: quartiles and median; whiskers: 5th and 95th percentiles; points: the fastest and the slowest.
    stats = [{"label": label, "med": s.quantile(0.5), "q1": s.quantile(0.25), "q3": s.quantile(0.75),
              "whislo": s.quantile(0.05), "whishi": s.quantile(0.95), "fliers": [v for v in (s.lo, s.hi) if v > 0]}
             for label, s in data]
    ax.bxp(stats, orientation="horizontal", showfliers=True)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("seconds (box: quartiles, whiskers: 5th-95th percentile, points: min and max)")
    return _png(fig)
