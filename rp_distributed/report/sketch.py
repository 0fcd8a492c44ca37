"""Fixed-size summaries of columns that stream by, one Arrow batch at a time: bin counts with quantiles, capped value
counts, reasons grouped with their first examples, and the rows with the smallest sort keys. Each holds what it
shows, never the rows: its size does not depend on how many rows went through it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class Bins:
    """Counts of values in fixed bins, with exact count, sum, min and max; quantiles interpolated inside a bin.

    Subclasses say where a value falls (``index``) and where bin ``i`` starts (``edges``: one more than the bins)."""

    edges: np.ndarray

    def __init__(self, bins: int):
        self.counts = np.zeros(bins, np.int64)
        self.n, self.total, self.lo, self.hi = 0, 0.0, float("inf"), float("-inf")

    def index(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def add(self, values) -> None:
        """Add an Arrow or numpy array of numbers; nulls and NaN are not values."""
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            values = pc.drop_null(values).to_numpy(zero_copy_only=False)
        values = np.asarray(values, np.float64)
        values = values[~np.isnan(values)]
        if not len(values):
            return
        self.counts += np.bincount(self.index(values), minlength=len(self.counts))
        self.n += len(values)
        self.total += float(values.sum())
        self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))

    def __len__(self) -> int:
        return self.n

    def quantile(self, q: float) -> float | None:
        """About ``np.quantile(values, q)``: the value at rank ``q * (n - 1)``, placed inside its bin as if the bin's
        values were spread evenly across it (within a bin's width of the exact one), clamped to [min, max]."""
        if not self.n:
            return None
        rank = q * (self.n - 1)
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, rank, side="right"))
        before = cum[i - 1] if i else 0
        frac = (rank - before + 0.5) / self.counts[i]
        a, b = self.edges[i], self.edges[i + 1]
        return float(min(max(self._between(a, b, frac), self.lo), self.hi))

    def _between(self, a: float, b: float, frac: float) -> float:
        return a + (b - a) * frac

    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """(value standing for each non-empty bin, its count): a histogram of the values on any coarser bins."""
        nz = np.nonzero(self.counts)[0]
        mid = np.array([self._between(self.edges[i], self.edges[i + 1], 0.5) for i in nz])
        return np.clip(mid, self.lo, self.hi), self.counts[nz]


class LinearBins(Bins):
    """Bins of width ``top / (bins - 1)`` from 0, values clipped to [0, top]: the rule of the run summary's medians
    (``lower_median`` equals it exactly)."""

    def __init__(self, top: float, bins: int):
        super().__init__(bins)
        self.top = top
        self.edges = np.append(np.arange(bins) * (top / (bins - 1)), top)

    def index(self, values: np.ndarray) -> np.ndarray:
        # The summary's arithmetic, in the same order: int(min(max(v, 0), top) / top * (bins - 1)).
        return (np.clip(values, 0.0, self.top) / self.top * (len(self.counts) - 1)).astype(np.int64)

    def lower_median(self) -> float | None:
        """The start of the bin holding the value of rank ``n // 2`` (the run summary's median)."""
        if not self.n:
            return None
        i = int(np.searchsorted(np.cumsum(self.counts), self.n // 2, side="right"))
        return i * self.top / (len(self.counts) - 1)


class LogBins(Bins):
    """``per_decade`` bins a decade from ``low`` to ``high`` (relative width 10^(1/per_decade) - 1), one bin below
    ``low`` (zero included) and one above ``high``: for seconds, from microseconds to a day."""

    def __init__(self, low: float = 1e-6, high: float = 1e5, per_decade: int = 200):
        self.low, self.per_decade = low, per_decade
        inner = int(round(np.log10(high / low) * per_decade))
        super().__init__(inner + 2)
        self.edges = np.concatenate([[0.0], low * 10.0 ** (np.arange(inner + 1) / per_decade), [np.inf]])

    def index(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            i = np.floor(np.log10(np.maximum(values, self.low * 1e-3) / self.low) * self.per_decade) + 1
        return np.clip(np.nan_to_num(i, nan=0.0), 0, len(self.counts) - 1).astype(np.int64)

    def _between(self, a: float, b: float, frac: float) -> float:
        if a <= 0 or not np.isfinite(b):  # the open-ended bins: linear up to the edge, geometric beyond
            b = b if np.isfinite(b) else max(self.hi, a)
            return a + (b - a) * frac
        return float(a * (b / a) ** frac)


def value_counts(values) -> list[tuple[object, int]]:
    """(value, count) of each distinct value of an Arrow array, null included; a dictionary array is counted on its
    indices (one count per dictionary entry, no string is compared)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not len(values):
        return []
    if pa.types.is_dictionary(values.type):
        idx = pc.fill_null(values.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        counts = np.bincount(idx[idx >= 0], minlength=len(values.dictionary))
        pairs = [(v, int(c)) for v, c in zip(values.dictionary.to_pylist(), counts) if c]
        nulls = int((idx < 0).sum())
        return pairs + ([(None, nulls)] if nulls else [])
    vc = pc.value_counts(values)
    return list(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))


def _order(item: tuple) -> tuple:
    key, count = item
    return -count, key is not None, str(key)


class TopCounts:
    """Counts per value. Past ``cap`` distinct values only the ``cap`` most frequent are kept: ``others`` counts the
    values let go (a value seen again later starts over, so counts are then lower bounds)."""

    def __init__(self, cap: int = 1000):
        self.cap, self.counts, self.others = cap, {}, 0

    def add(self, pairs) -> None:
        for value, count in pairs:
            self.counts[value] = self.counts.get(value, 0) + count
        if len(self.counts) > self.cap:
            keep = sorted(self.counts.items(), key=_order)[:self.cap]
            self.others += len(self.counts) - len(keep)
            self.counts = dict(keep)

    def most_common(self, n: int | None = None) -> list[tuple[object, int]]:
        """Most frequent first; ties by value."""
        return sorted(self.counts.items(), key=_order)[:n]

    def get(self, value, default: int = 0) -> int:
        return self.counts.get(value, default)

    def __len__(self) -> int:
        return len(self.counts)

    def __bool__(self) -> bool:
        return bool(self.counts)


def _example_key(example: tuple) -> tuple:
    rel, face = example  # the manifest's latest-view order: rel_path, then face_index with nulls last
    return rel, face is None, face or 0


@dataclass
class Reason:
    count: int = 0
    examples: list[tuple[str, int | None]] = field(default_factory=list)  # (rel_path, face_index), first ones

    def tags(self) -> list[str]:
        return [rel if face is None else f"{rel}#{face}" for rel, face in self.examples]


class Reasons:
    """Rows grouped by their reason text: a count and the first ``examples`` rows (in rel_path, face_index order)
    of each. Past ``cap`` distinct reasons the least frequent are let go (``others``)."""

    def __init__(self, examples: int = 3, cap: int = 2000):
        self.n_examples, self.cap, self.groups, self.others = examples, cap, {}, 0

    def add(self, reason: pa.Array, rel_path: pa.Array, face_index: pa.Array) -> None:
        table = pa.table({"r": reason, "p": rel_path, "f": face_index})
        if not table.num_rows:
            return
        table = table.sort_by([("r", "ascending"), ("p", "ascending"), ("f", "ascending")]).combine_chunks()
        codes = pc.dictionary_encode(table["r"].combine_chunks()).indices.to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.diff(codes, prepend=-1) != 0)
        sizes = np.diff(np.append(starts, len(codes)))
        rank = np.arange(len(codes)) - np.repeat(starts, sizes)  # position of each row inside its reason
        first = table.filter(pa.array(rank < self.n_examples)).to_pydict()
        reasons = table["r"].take(pa.array(starts)).to_pylist()
        for text, size in zip(reasons, sizes):
            self.groups.setdefault(text, Reason()).count += int(size)
        fresh: dict[str, list] = {}
        for text, rel, face in zip(first["r"], first["p"], first["f"]):
            fresh.setdefault(text, []).append((rel, face))
        for text, examples in fresh.items():
            group = self.groups[text]
            group.examples = sorted(group.examples + examples, key=_example_key)[:self.n_examples]
        if len(self.groups) > self.cap:
            keep = self.top(self.cap)
            self.others += len(self.groups) - len(keep)
            self.groups = dict(keep)

    def top(self, n: int | None = None) -> list[tuple[str, Reason]]:
        """Most frequent first; ties by reason."""
        return sorted(self.groups.items(), key=lambda kv: (-kv[1].count, kv[0]))[:n]

    def __len__(self) -> int:
        return len(self.groups)

    def __bool__(self) -> bool:
        return bool(self.groups)


class Smallest:
    """The ``k`` rows with the smallest ``sort_keys`` seen so far, as one small Arrow table."""

    def __init__(self, k: int, sort_keys: list[tuple[str, str]]):
        self.k, self.sort_keys, self.table = k, sort_keys, None

    def add(self, table: pa.Table) -> None:
        if not table.num_rows or not self.k:
            return
        if self.table is not None:
            table = pa.concat_tables([self.table, table])
        if table.num_rows > self.k:
            table = table.take(pc.select_k_unstable(table, self.k, self.sort_keys))
        self.table = table

    def rows(self) -> list[dict]:
        """The rows, sorted by the keys."""
        return [] if self.table is None else self.table.sort_by(self.sort_keys).to_pylist()
