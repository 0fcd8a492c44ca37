"""The end-of-job summary: counters accumulated row by row on the driver (no rows kept), and the one-screen text
the CLI and the demo print."""

from __future__ import annotations

import json
from collections.abc import Iterable

from .manifest import STATUSES


class _Histogram:
    """Fixed-bin counts for a streaming median (values clipped to ``[0, top]``)."""

    def __init__(self, top: float, bins: int):
        self.top, self.counts = top, [0] * bins

    def add(self, value: float) -> None:
        i = int(min(max(value, 0.0), self.top) / self.top * (len(self.counts) - 1))
        self.counts[i] += 1

    def median(self) -> float | None:
        n = sum(self.counts)
        if not n:
            return None
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen > n // 2:
                return i * self.top / (len(self.counts) - 1)
        return self.top  # pragma: no cover


class Summary:
    """The end-of-job summary, accumulated row by row: the driver keeps counters, not rows.

    An image is counted on its first row: its image-level row (``face_index`` null) or its face 0.
    Medians come from fixed bins (0.1 degree, 0.001 inter-ocular distance)."""

    def __init__(self):
        self.by_status = dict.fromkeys(STATUSES, 0)
        self.faces = self.exported = self.masked_matches = self.scored = self.fallbacks = 0
        self.first_scored = self.first_reid = self.escalated = 0
        self.report_scored = self.report_reid = 0
        self.audit_found = self.low_confidence = 0
        self.pose = _Histogram(180.0, 1801)
        self.drift = _Histogram(10.0, 10001)

    def add(self, r: dict) -> None:
        if r.get("face_index") in (None, 0):
            self.by_status[r["status"]] = self.by_status.get(r["status"], 0) + 1
        if r.get("face_index") is None:
            return
        self.faces += 1
        self.fallbacks += bool(r.get("face_error"))
        self.audit_found += bool(r.get("audit"))
        self.low_confidence += bool(r.get("low_confidence"))
        # Counted whether or not the check produced a distance: an unverifiable face that was not masked is exported.
        leaked = r.get("identity_exported")
        self.exported += bool(leaked)
        if r.get("reidentified") is not None:
            self.scored += 1
            # A recognizer match on a box masked in the written pixels is no identity left (often a false detection).
            self.masked_matches += bool(r["reidentified"]) and leaked is False
        if r.get("report_reidentified") is not None:
            self.report_scored += 1
            self.report_reid += bool(r["report_reidentified"])
        tries = json.loads(r["tries_json"]) if r.get("tries_json") else []
        if tries and tries[0].get("reid_distance") is not None and r.get("reid_threshold") is not None:
            self.first_scored += 1
            self.first_reid += tries[0]["reid_distance"] < r["reid_threshold"]
            self.escalated += len(tries) > 1
        if r.get("pose_diff_deg") is not None:
            self.pose.add(r["pose_diff_deg"])
        if r.get("landmark_displacement") is not None:
            self.drift.add(r["landmark_displacement"])

    def result(self) -> dict:
        def rate(k: int, n: int) -> float | None:
            return k / n if n else None

        return {"images": sum(self.by_status.values()), "faces": self.faces,
                "failures": self.by_status["error"] + self.by_status["withheld"], "by_status": dict(self.by_status),
                "fallbacks": self.fallbacks, "reid_scored": self.scored,
                # Faces written with identity information: re-identified by the recognizer and not masked (must
                # be 0 with privacy.fallback_if_reidentified); their rate among the scored faces.
                "identity_exported": self.exported, "reid_rate": rate(self.exported, self.scored),
                "matched_masked": self.masked_matches,
                # Faces the first detection pass missed: found on the output by the audit, anonymized there (their
                # rows have audit=true). Low-confidence detections got the fallback, not generation.
                "missed_by_first_pass": self.audit_found, "low_confidence": self.low_confidence,
                # The second recognizer's rate (reporting only), masked boxes included.
                "report_reid_rate": rate(self.report_reid, self.report_scored),
                # Re-ID rate of the first generation, before the escalation ladder (reverse personalization).
                "reid_rate_first_try": rate(self.first_reid, self.first_scored),
                "escalated": self.escalated,
                "pose_diff_deg_median": self.pose.median(),
                "landmark_displacement_median": self.drift.median()}


def summarize(rows: Iterable[dict]) -> dict:
    """The summary of a list of manifest rows (``Summary`` fed one row at a time)."""
    summary = Summary()
    for r in rows:
        summary.add(r)
    return summary.result()


def _missed_text(s: dict, cfg) -> str:
    """The output audit's count, shown beside identity exported."""
    if not cfg.merge.audit.enabled:
        return "not audited (merge.audit.enabled: false): faces the detector missed are exported untouched"
    return (f"{s['missed_by_first_pass']} faces: found on the output by the audit, {cfg.anonymizer.fallback} applied "
            "(manifest rows with audit=true)")


def summary_text(result, cfg, input_uri: str, output_uri: str) -> str:
    """The one-screen summary of a run (``job.run.JobResult``) as the CLI prints it."""
    s = result.summary
    rate = "n/a" if s["reid_rate"] is None else f"{100 * s['reid_rate']:.1f}% ({s['identity_exported']}/{s['reid_scored']})"
    by = ", ".join(f"{k} {v}" for k, v in s["by_status"].items() if v)
    lines = [
        "",
        f"rp-anonymize  run {result.run_id}",
        f"  input            {input_uri}",
        f"  output           {output_uri}",
        f"  method           {cfg.anonymizer.method} (fallback: {cfg.anonymizer.fallback})",
        f"  images           {s['images']} processed ({by or 'none'}), {result.skipped} skipped as already done",
        f"  faces            {s['faces']} ({s['fallbacks']} not by the requested method: fallback or mask, "
        "reasons in the manifest)",
        f"  failures         {s['failures']} images (error or withheld; reasons in the manifest)",
        f"  identity exported {rate}: written faces the recognizer still matches (distance < "
        f"{cfg.privacy.reid_threshold}), not masked",
        f"  first pass missed {_missed_text(s, cfg)}",
    ]
    if s["report_reid_rate"] is not None:
        lines.append(f"  second opinion   {100 * s['report_reid_rate']:.1f}% matched by {cfg.privacy.report_recognizer} "
                     f"(reporting only, 1 - cosine < {cfg.privacy.report_threshold})")
    if s["matched_masked"]:
        lines.append(f"  masked matches   {s['matched_masked']} boxes matched by the recognizer after masking: no "
                     "identity left in them (typically a false detection)")
    if result.redone_changed:
        lines.append(f"  redone           {result.redone_changed} inputs done earlier under other anonymization "
                     f"settings (fingerprint now {result.settings_fingerprint})")
    if result.redone_replaced:
        lines.append(f"  replaced         {result.redone_replaced} inputs were replaced under the same key since they "
                     "were done (their listed size or version changed): redone")
    if result.unrecorded:
        lines.append(f"  unrecorded       {result.unrecorded} outputs had no manifest row (an earlier driver was killed "
                     "before flushing it): redone")
    if result.renamed:
        lines.append(f"  renamed          {result.renamed} inputs got a distinct output key (their keys collided; "
                     "see notes in the manifest)")
    if result.isolated:
        lines.append(f"  retried alone    {result.isolated} inputs of batches whose worker died")
    if s["reid_rate_first_try"] is not None:
        lines.append(f"  before escalation {100 * s['reid_rate_first_try']:.1f}% re-identified at the first try; "
                     f"{s['escalated']} faces escalated")
    if s["pose_diff_deg_median"] is not None:
        lines.append(f"  utility          median head-pose change {s['pose_diff_deg_median']:.1f} deg, "
                     f"landmark shift {s['landmark_displacement_median']:.2f} inter-ocular")
    lines += [
        f"  wall time        {result.wall_s:.1f} s",
        f"  manifest         {len(result.manifest_parts)} new part(s) under {output_uri.rstrip('/')}/{cfg.output.manifest_dir}/",
    ]
    if getattr(result, "report_error", None):
        lines.append(f"  report           not written: {result.report_error}")
    if getattr(result, "report_uri", None):
        lines.append(f"  report           {result.report_uri}")
    return "\n".join(lines)
