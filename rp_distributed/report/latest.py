"""The manifest's latest view, read a part at a time: for each input, the rows of the latest run that processed it.

Run ids sort by time, so an input's latest run is the greatest ``run_id`` among its rows (rows without an input or
a run id belong to no view). A resumed run holds only the inputs it redid; the others keep the rows of the run
that did them. Deciding that needs, for every input seen in more than one run, the latest of its runs, and the
inputs of a 10M-image manifest do not fit in memory as strings. So the view is decided in two passes over the
parts, each reading a bounded batch at a time:

1. the run ids (one small dictionary-encoded column); with one run, every row is in the view and nothing else is
   read. Otherwise each input is reduced to 128 bits of a keyed universal hash (``KeyHash``) and its runs: 16
   bytes an input, the inputs seen in more than one run kept with their latest run.
2. the columns asked for, each batch filtered: a row of an older run is left out when its input has a later one.

Two different inputs share a key with probability below 2^-64 whatever their names, since the hash's keys are
drawn afresh for every view; at 10M inputs that is below 10^-5 for the whole manifest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.lib.stride_tricks import sliding_window_view

from .. import io, manifest
from .sketch import value_counts

BATCH_ROWS = 65_536  # rows decoded at a time: what a batch costs is bounded, whatever a part's size
_M32 = np.uint64(0xFFFFFFFF)
_BLOCK_BYTES = 4 << 20  # bytes of padded strings hashed at a time


class KeyHash:
    """Two independent NH hashes (UMAC's universal hash: sums of products of 32-bit words plus random keys, mod
    2^64) of each string's UTF-8 bytes and length, with keys drawn at random; 128 bits a string."""

    def __init__(self, seed: int | None = None):
        self._rng = np.random.default_rng(seed)
        self._length_keys = self._rng.integers(0, 2**32, size=(2, 2), dtype=np.uint64)
        self._keys = np.zeros((2, 0), np.uint64)

    def _word_keys(self, words: int) -> np.ndarray:
        if self._keys.shape[1] < words:  # drawn once per position: a string's hash never depends on its batch
            more = self._rng.integers(0, 2**32, size=(2, words - self._keys.shape[1] + 256), dtype=np.uint64)
            self._keys = np.concatenate([self._keys, more], axis=1)
        return self._keys[:, :words]

    def __call__(self, strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(h0, h1) of each string of ``strings`` (no nulls)."""
        if pa.types.is_string(strings.type) or pa.types.is_binary(strings.type):
            width = np.int32
        else:
            strings, width = strings.cast(pa.large_string()), np.int64
        n = len(strings)
        offsets = np.frombuffer(strings.buffers()[1], width)[strings.offset:strings.offset + n + 1].astype(np.int64)
        data = strings.buffers()[2]
        data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        data = data[offsets[0]:offsets[-1]]
        starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
        out = np.empty((2, n), np.uint64)
        # Strings are hashed in groups of similar padded width (a power of two, at least 8 bytes), so one long
        # name does not pad a whole batch.
        width_class = np.maximum(3, np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64))
        padded = np.concatenate([data, np.zeros(1 << int(width_class.max(initial=3)), np.uint8)])
        for c in np.unique(width_class):
            rows = np.flatnonzero(width_class == c)
            step = max(1, _BLOCK_BYTES >> int(c))
            for i in range(0, len(rows), step):
                r = rows[i:i + step]
                out[:, r] = self._nh(padded, starts[r], lengths[r], 1 << int(c))
        return out[0], out[1]

    def _nh(self, padded: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
        block = sliding_window_view(padded, width)[starts]  # (rows, width) copy of each string, then zeros
        block *= np.arange(width) < lengths[:, None]
        words = block.view("<u4").astype(np.uint64)
        keys = self._word_keys(words.shape[1])
        pairs = np.arange(width // 8) < ((lengths + 7) // 8)[:, None]  # the 8-byte pairs a string covers
        out = np.empty((2, len(starts)), np.uint64)
        for j in range(2):
            a = (words[:, 0::2] + keys[j, 0::2]) & _M32
            b = (words[:, 1::2] + keys[j, 1::2]) & _M32
            length = ((lengths.astype(np.uint64) + self._length_keys[j, 0]) & _M32) * self._length_keys[j, 1]
            out[j] = (a * b * pairs).sum(axis=1, dtype=np.uint64) + length
        return out


class _Parts:
    """The manifest parts under an output prefix, read through its ``Storage`` (keys, never syntax)."""

    def __init__(self, output_uri: str, manifest_dir: str):
        self.storage = io.Storage(output_uri)
        self.keys = [self.storage.key_of(u) for u in manifest.part_uris(output_uri, manifest_dir)]

    def batches(self, columns: list[str], dictionary: tuple[str, ...] = ()) -> Iterator[pa.RecordBatch]:
        """Each part's ``columns`` in batches of at most ``BATCH_ROWS`` rows, typed as ``manifest.SCHEMA`` (a column
        an older part lacks reads as nulls); ``dictionary`` columns come dictionary-encoded."""
        for key in self.keys:
            with self.storage.open(key) as f:
                part = pq.ParquetFile(f, read_dictionary=[c for c in dictionary if c in columns])
                have = [c for c in columns if c in part.schema_arrow.names]
                for batch in part.iter_batches(batch_size=BATCH_ROWS, columns=have, use_threads=True):
                    yield _conform(batch, columns, dictionary)


def _conform(batch: pa.RecordBatch, columns: list[str], dictionary: tuple[str, ...]) -> pa.RecordBatch:
    arrays = []
    for name in columns:
        typ = manifest.SCHEMA.field(name).type
        if name in dictionary:
            typ = pa.dictionary(pa.int32(), typ)
        col = batch.column(name) if name in batch.schema.names else pa.nulls(batch.num_rows, typ)
        arrays.append(col if col.type == typ else col.cast(typ))
    return pa.RecordBatch.from_arrays(arrays, names=columns)


@dataclass
class _Superseded:
    """The inputs seen in more than one run: their keys sorted, and the rank of each one's latest run."""

    h0: np.ndarray
    h1: np.ndarray
    latest: np.ndarray

    def latest_rank(self, h0: np.ndarray, h1: np.ndarray) -> np.ndarray:
        """The latest run's rank of each key, -1 for a key seen in one run only."""
        lo, hi = np.searchsorted(self.h0, h0, "left"), np.searchsorted(self.h0, h0, "right")
        at = np.minimum(lo, max(len(self.h0) - 1, 0))
        found = (hi > lo) & (self.h1[at] == h1) if len(self.h0) else np.zeros(len(h0), bool)
        out = np.where(found, self.latest[at] if len(self.h0) else -1, -1)
        for i in np.flatnonzero(hi - lo > 1):  # two keys with the same first half: compare the second
            match = np.flatnonzero(self.h1[lo[i]:hi[i]] == h1[i])
            out[i] = self.latest[lo[i] + match[0]] if len(match) else -1
        return out


def _ranks(run_ids: pa.Array, runs: list[str]) -> np.ndarray:
    """The rank of each row's run among ``runs`` (sorted), -1 for a null run id."""
    def rank_of(values: pa.Array) -> np.ndarray:
        idx = pc.index_in(values, value_set=pa.array(runs, pa.string()))
        return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    if not pa.types.is_dictionary(run_ids.type):
        return rank_of(run_ids)
    indices = pc.fill_null(run_ids.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.append(rank_of(run_ids.dictionary), -1)[indices]  # index -1 (a null) takes the appended -1


class LatestView:
    """The latest view of the manifest under ``output_uri``, decided once (``open``), then read in batches."""

    def __init__(self, parts: _Parts, runs: list[str], superseded: _Superseded | None, hasher: KeyHash):
        self.parts, self.runs, self.superseded, self.hasher = parts, runs, superseded, hasher

    @classmethod
    def open(cls, output_uri: str, manifest_dir: str) -> LatestView:
        parts = _Parts(output_uri, manifest_dir)
        runs: set[str] = set()
        for batch in parts.batches(["run_id"], dictionary=("run_id",)):
            runs.update(v for v, _ in value_counts(batch.column(0)) if v is not None)
        runs_sorted, hasher = sorted(runs), KeyHash()
        superseded = _superseded(parts, runs_sorted, hasher) if len(runs_sorted) > 1 else None
        return cls(parts, runs_sorted, superseded, hasher)

    def batches(self, columns: list[str], dictionary: tuple[str, ...] = ()) -> Iterator[pa.RecordBatch]:
        """The view's rows, ``columns`` of them (in the parts' order, not sorted)."""
        read = list(dict.fromkeys([*columns, "input_uri", "run_id"]))
        for batch in self.parts.batches(read, dictionary=tuple(set(dictionary) | {"run_id"})):
            keep = self._keep(batch)
            if keep is not None:
                batch = batch.filter(pa.array(keep))
            if batch.num_rows:
                yield _conform(batch, columns, dictionary)

    def _keep(self, batch: pa.RecordBatch) -> np.ndarray | None:
        rank = _ranks(batch.column("run_id"), self.runs)
        keep = (rank >= 0) & batch.column("input_uri").is_valid().to_numpy(zero_copy_only=False)
        if self.superseded is not None:
            older = np.flatnonzero(keep & (rank < len(self.runs) - 1))  # the newest run's rows are always latest
            if len(older):
                uris = pc.dictionary_encode(batch.column("input_uri").take(pa.array(older)))
                h0, h1 = self.hasher(uris.dictionary)
                latest = self.superseded.latest_rank(h0, h1)[uris.indices.to_numpy(zero_copy_only=False)]
                keep[older] = (latest < 0) | (latest == rank[older])
        return None if keep.all() else keep


def _superseded(parts: _Parts, runs: list[str], hasher: KeyHash) -> _Superseded:
    """Pass 1: every input's key and runs (16 bytes and a rank per input and batch), reduced to the inputs seen in
    more than one run."""
    h0s, h1s, ranks = [], [], []
    for batch in parts.batches(["input_uri", "run_id"], dictionary=("run_id",)):
        rank = _ranks(batch.column("run_id"), runs)
        valid = np.flatnonzero((rank >= 0) & batch.column("input_uri").is_valid().to_numpy(zero_copy_only=False))
        if not len(valid):
            continue
        uris = pc.dictionary_encode(batch.column("input_uri").take(pa.array(valid)))
        pair = np.unique(uris.indices.to_numpy(zero_copy_only=False).astype(np.int64) * len(runs) + rank[valid])
        h0, h1 = hasher(uris.dictionary)
        h0s.append(h0[pair // len(runs)])
        h1s.append(h1[pair // len(runs)])
        ranks.append((pair % len(runs)).astype(np.int32))
    # Only a key seen twice can be in two runs: find the first halves seen twice with one sorted copy of them, keep
    # those entries (a few percent after a resume), and sort only them. Peak: the entries and one array of halves.
    repeated = _repeated(h0s)
    for b, h0 in enumerate(h0s):
        keep = _member(h0, repeated)
        h0s[b], h1s[b], ranks[b] = h0[keep], h1s[b][keep], ranks[b][keep]
    h0, h1, rank = (np.concatenate(a) if a else np.zeros(0, t) for a, t in
                    ((h0s, np.uint64), (h1s, np.uint64), (ranks, np.int32)))
    order = np.lexsort((rank, h1, h0))
    h0, h1, rank = h0[order], h1[order], rank[order]
    start = np.flatnonzero(np.append(True, (h0[1:] != h0[:-1]) | (h1[1:] != h1[:-1])))
    end = np.append(start[1:], len(h0)) - 1
    multi = rank[start] != rank[end]  # sorted by rank inside a key: first is oldest, last is latest
    return _Superseded(h0[start[multi]], h1[start[multi]], rank[end[multi]])


def _repeated(chunks: list[np.ndarray]) -> np.ndarray:
    """The values found more than once across ``chunks``, sorted."""
    if not chunks:
        return np.zeros(0, np.uint64)
    values = np.concatenate(chunks)
    values.sort()
    return np.unique(values[1:][values[1:] == values[:-1]])


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    return sorted_set[np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)] == values
