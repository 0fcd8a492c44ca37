"""The consistency of pseudonyms: for each subject with two faces or more, the recognizer distance between its
written faces (one synthetic person: below the threshold) and each face's distance to its own original (the re-ID
gate's, which must stay above it).

The written faces' descriptors come from the manifest's ``anon_descriptor`` (the merge stage's gate made them on the
pixels as written). What is held is bounded whatever the manifest: the faces of the subjects with the smallest
``pseudonym_id`` (a uniform sample of subjects, as the ids are HMAC digests), at most ``FACE_CAP`` faces in all and
``FACES_PER_SUBJECT`` of each subject (its first ones in manifest order). A subject is held with all its faces or not
at all; past the cap, the subjects with the largest ids are let go and no larger id is taken again. The distance of a
written face to a subject's *other* originals is not measured: it needs the originals' descriptors, which the
manifest does not keep (they would identify the person)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .sketch import LinearBins

FACE_CAP = 20_000  # faces held: 512 bytes of descriptor each (about 10 MiB)
FACES_PER_SUBJECT = 100  # a subject's pairs measured: at most 4,950
DIM = 128  # dlib's descriptor


@dataclass
class ConsistencyFacts:
    """What the report's consistency section shows (``Consistency.result``)."""

    linked_faces: int  # faces with a pseudonym_id in the latest view
    subjects: int  # subjects (held) with two faces or more
    faces: int  # their faces
    measured: int  # of those subjects, the ones with two written faces or more that have a descriptor
    consistent: int  # of the measured ones, those whose written faces are all pairwise below the threshold
    undescribed: int  # faces of those subjects without a descriptor (masked, or no descriptor could be made)
    reidentified: int  # faces of those subjects closer to their own original than the threshold
    between: LinearBins  # distances between two written faces of one subject
    to_original: LinearBins  # each face's distance to its own original (reid_distance)
    sampled: bool  # FACE_CAP was reached: the figures are those of a uniform sample of subjects
    capped: int  # faces left out past FACES_PER_SUBJECT
    threshold: float | None

    @property
    def share(self) -> float | None:
        return self.consistent / self.measured if self.measured else None


class Consistency:
    """Streams the face rows' ``pseudonym_id``, ``anon_descriptor`` and ``reid_distance``."""

    def __init__(self, face_cap: int = FACE_CAP, per_subject: int = FACES_PER_SUBJECT):
        self.face_cap, self.per_subject = face_cap, per_subject
        self.held: pa.Table | None = None
        self.cutoff: str | None = None  # subjects with an id at or above it are not held
        self.linked = self.capped = 0

    def add(self, t: pa.Table) -> None:
        """Face rows of the latest view."""
        ids = t["pseudonym_id"]
        linked = pc.is_valid(ids)
        n = pc.sum(linked).as_py() or 0
        if not n:
            return
        self.linked += n
        keep = linked if self.cutoff is None else pc.and_(linked, pc.less(ids, self.cutoff))
        rows = t.filter(keep).select(["pseudonym_id", "anon_descriptor", "reid_distance"])
        held = rows if self.held is None else pa.concat_tables([self.held, rows])
        held = held.take(pc.sort_indices(held, [("pseudonym_id", "ascending")]))  # stable: manifest order kept
        self.held = self._bounded(held.combine_chunks())

    def _bounded(self, held: pa.Table) -> pa.Table:
        ids = held["pseudonym_id"].to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
        rank = np.arange(len(ids)) - np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
        over = rank >= self.per_subject
        if over.any():
            self.capped += int(over.sum())
            held, ids = held.filter(pa.array(~over)), ids[~over]
        if len(ids) > self.face_cap:  # let go of whole subjects, the largest ids first
            self.cutoff = str(ids[self.face_cap])
            held = held.slice(0, int(np.searchsorted(ids, self.cutoff, "left")))
        return held

    def result(self, threshold: float | None) -> ConsistencyFacts:
        between, to_original = LinearBins(4.0, 4001), LinearBins(4.0, 4001)
        pairs, owns = [], []
        subjects = faces = measured = consistent = undescribed = 0
        for ids, cells, own in self._subjects():
            if len(ids) < 2:
                continue
            subjects, faces = subjects + 1, faces + len(ids)
            owns.append(own)
            described = [c for c in cells if c is not None and len(c) == 4 * DIM]
            undescribed += len(ids) - len(described)
            if len(described) < 2:
                continue
            d = np.frombuffer(b"".join(described), "<f4").reshape(-1, DIM).astype(np.float64)
            pairs.append(np.linalg.norm(d[:, None, :] - d[None, :, :], axis=-1)[np.triu_indices(len(d), 1)])
            measured += 1
            consistent += int(threshold is not None and bool((pairs[-1] < threshold).all()))
        own = np.concatenate(owns) if owns else np.zeros(0)
        own = own[np.isfinite(own)]
        between.add(np.concatenate(pairs) if pairs else np.zeros(0))
        to_original.add(own)
        reidentified = int((own < threshold).sum()) if threshold is not None else 0
        return ConsistencyFacts(self.linked, subjects, faces, measured, consistent, undescribed, reidentified, between,
                                to_original, self.cutoff is not None, self.capped, threshold)

    def _subjects(self):
        """(ids, descriptor cells, reid distances) of each held subject."""
        if self.held is None or not self.held.num_rows:
            return
        ids = self.held["pseudonym_id"].to_numpy(zero_copy_only=False)
        cells = self.held["anon_descriptor"].to_pylist()
        own = pc.fill_null(pc.cast(self.held["reid_distance"], pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(ids)]):
            yield ids[a:b], cells[a:b], own[a:b]
