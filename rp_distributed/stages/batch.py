"""Ray Data batches (a dict of columns, ``batch_format="numpy"``) to typed ``records.ImageRow`` and back: the one
place a stage's input is unpacked, with the one rule for what Ray's conversion does to missing values.

The payload crosses a boundary as the bytes of one pickle (``pack``): an Arrow binary column that Ray stores as it
is. Handed the ``ImagePayload`` objects themselves, Ray first tries to make them an Arrow column, and the error it
builds on the way spells out every row's arrays as text before it falls back to pickling them one by one: that
attempt cost more than the pickles and more than the mask method itself.
"""

from __future__ import annotations

import pickle

import numpy as np

from ..records import STAGE_COLUMNS, ImagePayload, ImageRow

PAYLOAD = "payload"

_FIELDS = set(ImageRow.__dataclass_fields__)


def value(v):
    """A cell as Python: Ray hands a column that was all ``None`` back as NaN floats (restore ``None``), and numpy
    scalars as numpy scalars (plain Python values)."""
    if isinstance(v, (float, np.floating)) and np.isnan(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def pack(payload: ImagePayload) -> bytes:
    return pickle.dumps(payload, protocol=5)


def unpack(cell) -> ImagePayload:
    """A payload cell as the stages shipped it (``pack``); an ``ImagePayload`` as it is."""
    return pickle.loads(cell) if isinstance(cell, bytes) else cell


def rows(batch: dict) -> list[ImageRow]:
    keys = [k for k in batch if k in _FIELDS]
    n = len(batch[keys[0]]) if keys else 0
    out = [ImageRow.of({k: value(batch[k][i]) for k in keys if k != PAYLOAD}) for i in range(n)]
    if PAYLOAD in batch:
        for row, cell in zip(out, batch[PAYLOAD]):
            row.payload = unpack(cell)
    return out


def columns(items: list, keys: list[str] | None = None) -> dict:
    """``ImageRow`` records (the stages' contract: ``STAGE_COLUMNS``) or manifest row dicts (``keys``) as a batch
    of object columns."""
    keys = keys or STAGE_COLUMNS
    get = (lambda r, k: r.get(k)) if items and isinstance(items[0], dict) else getattr
    cols = {}
    for k in keys:
        col = np.empty(len(items), dtype=object)
        col[:] = [pack(r.payload) for r in items] if k == PAYLOAD and get is getattr else [get(r, k) for r in items]
        cols[k] = col
    return cols


def dicts(batch: dict) -> list[dict]:
    """A batch of plain rows (the merge stage's manifest rows) as dicts, with the same rule for missing values."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: value(batch[k][i]) for k in keys} for i in range(n)]
