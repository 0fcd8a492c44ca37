"""Everything the report and ``inspect`` show, computed from the manifest's latest view one Arrow batch at a time.

Counts are sums of Arrow compute over each batch; reasons are grouped with their first examples; distributions go
into fixed bins (quantiles from them, within a bin's width: 0.001 for distances, 1.2% for seconds); the gallery is a
uniform random sample of the written faces (the ``GALLERY_CAP`` smallest of a random key per face). No Python
object is made per row, so what ``load`` holds does not grow with the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import io, manifest
from .consistency import Consistency, ConsistencyFacts
from .latest import LatestView
from .runinfo import read_run_info
from .sketch import LinearBins, LogBins, Reasons, Smallest, TopCounts, value_counts
from .tries import Ladder, Rung

FAILED = ("error", "withheld")
STAGES = (("t_read_s", "read + decode", "image"), ("t_detect_s", "detect + align", "image"),
          ("t_anonymize_s", "anonymize", "face"), ("t_merge_s", "merge + score + write", "image"))
NO_METHOD = "none (no crop: image-level fallback)"
NO_REASON = "(no reason recorded)"
GALLERY_CAP = 1000  # report.gallery_size's bound: the sample holds this many, a report shows its first ones
FAILED_LISTED = 200  # failed inputs listed by `inspect --failed`
GALLERY_COLUMNS = ["rel_path", "face_index", "input_uri", "output_uri", "box_x0", "box_y0", "box_x1", "box_y1",
                   "method_applied", "reid_distance", "reidentified", "face_error"]
COLUMNS = list(dict.fromkeys(
    ["run_id", "rel_path", "output_uri", "status", "error", "settings_fingerprint", "face_index", "method_applied",
     "face_error", "params", "attribute_prompt", "model", "tries", "tries_json", "unet_evals", "reid_distance",
     "reidentified", "reid_threshold", "identity_exported", "score_error", "report_reidentified", "pose_diff_deg",
     "landmark_displacement", "audit", "low_confidence", "pseudonym_id", "anon_descriptor",
     *(col for col, _, _ in STAGES), *GALLERY_COLUMNS]))
# Few distinct values: read dictionary-encoded and counted on the dictionary's indices.
DICTIONARY = ("run_id", "status", "settings_fingerprint", "method_applied", "params", "attribute_prompt", "model")


@dataclass
class Facts:
    """The latest view's figures (``load``)."""

    n_rows: int
    n_images: int  # inputs: rows that are image-level, or a face 0
    n_faces: int
    runs: dict  # run_id -> inputs whose latest outcome it holds
    faces_by_run: dict  # run_id -> faces
    summary: dict  # the end-of-run summary's figures, as summary.Summary computes them
    by_status: dict
    by_method: TopCounts
    image_reasons: Reasons  # error / withheld, examples are rel_paths
    face_reasons: Reasons  # face_error
    score_reasons: Reasons  # score_error
    threshold: float | None  # the most frequent reid_threshold
    first_try: LinearBins  # re-ID distance of each face's first generation (reverse personalization)
    final: LinearBins  # re-ID distance of each written face (the exported result)
    ladder: list[Rung]
    fell_back_after_ladder: int
    pose: LinearBins
    drift: LinearBins
    timings: dict  # column -> LogBins
    fingerprints: TopCounts  # settings fingerprint -> inputs
    models: TopCounts  # model JSON -> faces
    params: TopCounts  # params JSON -> faces
    prompts: TopCounts
    unet_evals: int
    tries: int
    failed: list[dict]  # the first FAILED_LISTED failed inputs by rel_path: rel_path, status, error
    gallery: list[dict]  # up to GALLERY_CAP written faces, a uniform sample (GALLERY_COLUMNS), in sample order
    consistency: ConsistencyFacts  # the pseudonyms' subjects: their written faces against each other
    run_infos: dict = field(default_factory=dict)  # run_id -> config-<run_id>.json content (None if absent)


def _np(values: pa.Array) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False)


def _true(values: pa.Array) -> np.ndarray:
    return _np(pc.fill_null(values, False))


def _valid(values: pa.Array) -> np.ndarray:
    return _np(values.is_valid())


def _text(values: pa.Array) -> np.ndarray:
    """Rows with a non-empty string (what ``if row.get(name)`` tests)."""
    return _true(pc.greater(pc.utf8_length(pc.cast(values, pa.string())), 0))


def _rows(table: pa.Table, mask: np.ndarray) -> pa.Table:
    return table.filter(pa.array(mask))


class _Accumulator:
    """The facts of the batches added so far."""

    def __init__(self, seed: int = 0):
        self.n_rows = self.n_images = self.n_faces = 0
        self.status, self.runs, self.faces_by_run = TopCounts(), TopCounts(), TopCounts()
        self.by_method, self.thresholds, self.fingerprints = TopCounts(), TopCounts(), TopCounts()
        self.models, self.params, self.prompts = TopCounts(), TopCounts(), TopCounts()
        self.image_reasons, self.face_reasons, self.score_reasons = Reasons(), Reasons(), Reasons()
        self.ladder = Ladder()
        self.final, self.pose, self.drift = LinearBins(4.0, 4001), LinearBins(180.0, 1801), LinearBins(10.0, 10001)
        self.timings = {col: LogBins() for col, _, _ in STAGES}
        self.failed = Smallest(FAILED_LISTED, [("rel_path", "ascending")])
        self.gallery = Smallest(GALLERY_CAP, [("_key", "ascending")])
        self.rng = np.random.default_rng(seed)
        self.consistency = Consistency()
        self.counts = dict.fromkeys(("fallbacks", "audit", "low_confidence", "exported", "scored", "masked_matches",
                                     "report_scored", "report_reid", "unet_evals", "tries"), 0)

    def add(self, batch: pa.RecordBatch) -> None:
        table = pa.Table.from_batches([batch])
        face = _valid(table["face_index"])
        first = _true(pc.equal(table["face_index"], 0))
        self.n_rows += table.num_rows
        self._images(_rows(table, ~face | first))
        self._faces(_rows(table, face))

    def _images(self, t: pa.Table) -> None:
        self.n_images += t.num_rows
        self.status.add(value_counts(t["status"]))
        self.runs.add(value_counts(t["run_id"]))
        self.fingerprints.add(value_counts(t["settings_fingerprint"]))
        failed = _rows(t, _true(pc.is_in(pc.cast(t["status"], pa.string()), pa.array(FAILED))))
        reason = pc.if_else(pa.array(_text(failed["error"])), failed["error"], NO_REASON)
        self.image_reasons.add(reason, failed["rel_path"], pa.nulls(failed.num_rows, pa.int32()))
        self.failed.add(pa.table({"rel_path": failed["rel_path"], "status": pc.cast(failed["status"], pa.string()),
                                  "error": failed["error"]}))
        for col, _, per in STAGES:
            if per == "image":
                self.timings[col].add(_finite(t[col]))

    def _faces(self, t: pa.Table) -> None:
        c = self.counts
        self.n_faces += t.num_rows
        self.faces_by_run.add(value_counts(t["run_id"]))
        fallback = _text(t["face_error"])
        c["fallbacks"] += int(fallback.sum())
        c["audit"] += int(_true(t["audit"]).sum())
        c["low_confidence"] += int(_true(t["low_confidence"]).sum())
        exported = _true(t["identity_exported"])
        c["exported"] += int(exported.sum())
        scored = _valid(t["reidentified"])
        c["scored"] += int(scored.sum())
        # A recognizer match on a box masked in the written pixels is no identity left (often a false detection).
        not_exported = _valid(t["identity_exported"]) & ~exported
        c["masked_matches"] += int((_true(t["reidentified"]) & not_exported).sum())
        c["report_scored"] += int(_valid(t["report_reidentified"]).sum())
        c["report_reid"] += int(_true(t["report_reidentified"]).sum())
        c["unet_evals"] += int(pc.sum(t["unet_evals"]).as_py() or 0)
        c["tries"] += int(pc.sum(t["tries"]).as_py() or 0)
        self.pose.add(_finite(t["pose_diff_deg"]))
        self.drift.add(_finite(t["landmark_displacement"]))
        self.timings["t_anonymize_s"].add(_finite(t["t_anonymize_s"]))
        written = _rows(t, _text(t["output_uri"]))
        self.final.add(_finite(written["reid_distance"]))
        self.consistency.add(written)
        self.thresholds.add(value_counts(pc.drop_null(t["reid_threshold"])))
        self._labels(t)
        for reasons, col, has in ((self.face_reasons, "face_error", fallback),
                                  (self.score_reasons, "score_error", _text(t["score_error"]))):
            rows = _rows(t, has)
            reasons.add(rows[col], rows["rel_path"], rows["face_index"])
        self.ladder.add(t["tries_json"], t["reid_threshold"], t["face_error"])
        shown = _rows(t, _text(t["output_uri"]) & _valid(t["box_x0"])).select(GALLERY_COLUMNS)
        self.gallery.add(shown.append_column("_key", pa.array(self.rng.random(shown.num_rows))))

    def _labels(self, t: pa.Table) -> None:
        """Faces by applied method, model, parameters and prompt."""
        method = pc.cast(t["method_applied"], pa.string())
        self.by_method.add(value_counts(pc.if_else(pa.array(_text(method)), method, NO_METHOD)))
        for counter, col in ((self.models, "model"), (self.params, "params"), (self.prompts, "attribute_prompt")):
            counter.add((v, n) for v, n in value_counts(t[col]) if v)

    def result(self) -> Facts:
        c, counts = self.counts, self.status.counts
        by_status = dict.fromkeys(manifest.STATUSES, 0)
        for status in sorted(set(counts) - set(by_status), key=str):  # a status this version does not know
            by_status[status] = 0
        by_status.update(counts)
        thresholds = self.thresholds.most_common(1)
        gallery = self.gallery.rows()
        for item in gallery:
            item.pop("_key")
        return Facts(
            n_rows=self.n_rows, n_images=self.n_images, n_faces=self.n_faces,
            runs=dict(sorted(self.runs.counts.items())),
            faces_by_run=dict(self.faces_by_run.counts), summary=self._summary(by_status),
            by_status=by_status, by_method=self.by_method, image_reasons=self.image_reasons,
            face_reasons=self.face_reasons, score_reasons=self.score_reasons,
            threshold=float(thresholds[0][0]) if thresholds else None, first_try=self.ladder.first_try,
            final=self.final, ladder=self.ladder.result(), fell_back_after_ladder=self.ladder.fell_back,
            pose=self.pose, drift=self.drift, timings=self.timings, fingerprints=self.fingerprints,
            models=self.models, params=self.params, prompts=self.prompts, unet_evals=c["unet_evals"],
            tries=c["tries"], failed=self.failed.rows(), gallery=gallery,
            consistency=self.consistency.result(float(thresholds[0][0]) if thresholds else None))

    def _summary(self, by_status: dict) -> dict:
        """``summary.Summary().result()`` of the same rows, key for key."""
        c, lad = self.counts, self.ladder

        def rate(k: int, n: int) -> float | None:
            return k / n if n else None

        return {"images": sum(by_status.values()), "faces": self.n_faces,
                "failures": by_status["error"] + by_status["withheld"], "by_status": dict(by_status),
                "fallbacks": c["fallbacks"], "reid_scored": c["scored"],
                "identity_exported": c["exported"], "reid_rate": rate(c["exported"], c["scored"]),
                "matched_masked": c["masked_matches"], "missed_by_first_pass": c["audit"],
                "low_confidence": c["low_confidence"], "report_reid_rate": rate(c["report_reid"], c["report_scored"]),
                "reid_rate_first_try": rate(lad.first_reid, lad.first_scored), "escalated": lad.escalated,
                "pose_diff_deg_median": self.pose.lower_median(),
                "landmark_displacement_median": self.drift.lower_median()}


def _finite(values) -> np.ndarray:
    a = pc.drop_null(values).to_numpy(zero_copy_only=False).astype(np.float64)
    return a[np.isfinite(a)]


def facts_of(view: LatestView, seed: int = 0) -> Facts:
    acc = _Accumulator(seed)
    for batch in view.batches(COLUMNS, dictionary=DICTIONARY):
        acc.add(batch)
    return acc.result()


def load(output_uri: str, manifest_dir: str = "_manifest") -> Facts:
    """The facts of the latest view of the manifest under ``output_uri``, with each run's recorded config."""
    output_uri = io.normalize_prefix(output_uri)
    facts = facts_of(LatestView.open(output_uri, manifest_dir))
    facts.run_infos = {r: read_run_info(output_uri, manifest_dir, r) for r in facts.runs if r is not None}
    return facts


def faces_per_hour(f: Facts) -> tuple[float | None, float | None]:
    """(wall-clock faces/hour of the latest finished run, faces/hour of one anonymizer from its median per-face
    time)."""
    wall = None
    runs = [r for r in f.runs if r is not None]
    if runs:
        latest = max(runs)
        info = f.run_infos.get(latest) or {}
        n = f.faces_by_run.get(latest, 0)
        if info.get("wall_s") and n:
            wall = n / info["wall_s"] * 3600
    med = f.timings["t_anonymize_s"].quantile(0.5)
    return wall, (3600 / med if med else None)
