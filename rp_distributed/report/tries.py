"""The escalation ladder from ``tries_json`` (a JSON list of ``{guidance, reid_distance}`` per generation of a face),
parsed by Arrow's JSON reader a batch at a time: no Python object per row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from .sketch import LinearBins

TRY = pa.struct([("guidance", pa.float64()), ("reid_distance", pa.float64())])
_LINES = pa.schema([("t", pa.list_(TRY))])
FELL_BACK = "still re-identified after"  # the ladder's own fallback reason (anonymize.py)


def parse(texts: pa.Array) -> pa.ListArray:
    """Each text (a JSON list of tries, not null) as an Arrow list of ``TRY``. The texts are wrapped as one JSON
    object a line, ``{"t": <text>}``, and read as newline-delimited JSON."""
    lines = pc.binary_join_element_wise('{"t": ', texts, "}\n", "")
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    offsets = np.frombuffer(lines.buffers()[1], np.int32)[lines.offset:lines.offset + len(lines) + 1]
    data = lines.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    table = pa_json.read_json(pa.BufferReader(data), read_options=pa_json.ReadOptions(use_threads=False),
                              parse_options=pa_json.ParseOptions(explicit_schema=_LINES,
                                                                 unexpected_field_behavior="ignore"))
    if table.num_rows != len(texts):  # a raw newline inside a text would split it: never from json.dumps
        raise ValueError(f"tries_json: {len(texts)} texts read as {table.num_rows} JSON lines")
    return table.column("t").combine_chunks()


def _floats(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64 with NaN for null, validity)."""
    valid = values.is_valid().to_numpy(zero_copy_only=False)
    return pc.fill_null(values.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False), valid


@dataclass
class Rung:
    number: int  # 1 for the first try
    guidance: float | None
    run: int  # faces run at this rung
    checked: int  # of them, checked by the recognizer (escalation on, a face to compare)
    passed: int  # of them, not re-identified after it


class Ladder:
    """Per rung (try number, guidance): faces run, checked and passed; each face's first try's distance; and the
    summary's first-try figures."""

    def __init__(self):
        self.rungs: dict[tuple[int, float | None], list[int]] = {}
        self.first_try = LinearBins(4.0, 4001)  # distances, 0.001 wide
        self.first_scored = self.first_reid = self.escalated = self.fell_back = 0

    def add(self, texts: pa.Array, threshold: pa.Array, face_error: pa.Array) -> None:
        """The face rows' ``tries_json``, ``reid_threshold`` and ``face_error``."""
        texts = pc.cast(texts, pa.string())
        some = pc.fill_null(pc.and_(pc.greater(pc.utf8_length(texts), 0), pc.not_equal(texts, "[]")), False)
        rows = np.flatnonzero(some.to_numpy(zero_copy_only=False))
        if not len(rows):
            return
        tries = parse(texts.take(pa.array(rows)))
        lengths = pc.list_value_length(tries).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(tries)
        parent = np.repeat(np.arange(len(rows)), lengths)
        number = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        d, d_valid = _floats(pc.struct_field(flat, "reid_distance"))
        thr, thr_valid = _floats(threshold.take(pa.array(rows)))
        checked = d_valid & thr_valid[parent]
        passed = checked & (d >= np.where(checked, thr[parent], np.inf))
        self._count_rungs(number, pc.struct_field(flat, "guidance"), checked, passed)

        first = number == 0
        d0, d0_valid, at = d[first], d_valid[first], parent[first]
        self.first_try.add(d0[d0_valid & np.isfinite(d0)])
        scored = d0_valid & thr_valid[at]
        self.first_scored += int(scored.sum())
        self.first_reid += int((scored & (d0 < np.where(scored, thr[at], -np.inf))).sum())
        self.escalated += int((scored & (lengths[at] > 1)).sum())
        errors = pc.cast(face_error.take(pa.array(rows)), pa.string())
        fell = pc.fill_null(pc.match_substring(errors, FELL_BACK), False).to_numpy(zero_copy_only=False)
        self.fell_back += int((fell & (lengths > 0)).sum())

    def _count_rungs(self, number: np.ndarray, guidance: pa.Array, checked: np.ndarray, passed: np.ndarray) -> None:
        table = pa.table({"k": number, "g": guidance, "checked": checked.astype(np.int64),
                          "passed": passed.astype(np.int64)})
        grouped = table.group_by(["k", "g"], use_threads=False).aggregate(
            [([], "count_all"), ("checked", "sum"), ("passed", "sum")]).to_pydict()
        for k, g, run, chk, ok in zip(grouped["k"], grouped["g"], grouped["count_all"], grouped["checked_sum"],
                                      grouped["passed_sum"]):
            counts = self.rungs.setdefault((k, g), [0, 0, 0])
            counts[0], counts[1], counts[2] = counts[0] + run, counts[1] + chk, counts[2] + ok

    def result(self) -> list[Rung]:
        """The rungs by try number (then guidance)."""
        order = sorted(self.rungs, key=lambda kg: (kg[0], kg[1] is None, kg[1] or 0.0))
        return [Rung(k + 1, g, *self.rungs[(k, g)]) for k, g in order]
