"""``rp-anonymize inspect``: the report's facts in the terminal."""

from __future__ import annotations

from .facts import FAILED_LISTED, STAGES, Facts, faces_per_hour
from .sketch import Reasons


def _fmt(v, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def _figures(f: Facts) -> list[str]:
    s = f.summary
    lines = ["  runs             " + ", ".join(f"{r} ({n} inputs)" for r, n in sorted(f.runs.items())),
             f"  images           {f.n_images}: " + ", ".join(f"{k} {v}" for k, v in f.by_status.items()),
             f"  faces            {f.n_faces}: " + (", ".join(f"{k} {v}" for k, v in f.by_method.most_common())
                                                   or "none"),
             f"  fallbacks        {s['fallbacks']} faces not by the requested method"
             + (f" ({len(f.face_reasons) + f.face_reasons.others} distinct reasons)" if f.face_reasons else "")]
    return lines


def _privacy(f: Facts, failed: bool) -> list[str]:
    s = f.summary
    rate = ("n/a" if s["reid_rate"] is None
            else f"{100 * s['reid_rate']:.1f}% ({s['identity_exported']}/{s['reid_scored']})")
    lines = [f"  failures         {s['failures']} images (error or withheld)"
             + ("" if failed or not s["failures"] else "; --failed lists them"),
             f"  identity exported {rate} (must be 0); first pass missed {s['missed_by_first_pass']} faces "
             "(found by the output audit, anonymized)"]
    threshold = _fmt(f.threshold, "g")
    if len(f.first_try):
        lines.append(f"  re-ID            first try: median distance {f.first_try.quantile(0.5):.3f}, "
                     f"{100 * (s['reid_rate_first_try'] or 0):.1f}% re-identified; {s['escalated']} escalated; "
                     f"output check: median {_fmt(f.final.quantile(0.5), '.3f')} (threshold {threshold})")
    elif len(f.final):
        lines.append(f"  re-ID            output check: median distance {f.final.quantile(0.5):.3f} "
                     f"(threshold {threshold})")
    if f.unet_evals:
        lines.append(f"  diffusion        {f.tries} tries, {f.unet_evals} UNet image evaluations")
    c = f.consistency
    if c.linked_faces:
        share = "n/a" if c.share is None else f"{100 * c.share:.1f}%"
        lines.append(f"  pseudonyms       {c.linked_faces} linked faces; consistent subjects {share} ({c.consistent} of "
                     f"{c.measured} measured, median pair distance {_fmt(c.between.quantile(0.5), '.3f')})"
                     + (" in a sample of subjects" if c.sampled else ""))
    if len(f.pose):
        lines.append(f"  utility          median head-pose change {f.pose.quantile(0.5):.1f} deg, landmark shift "
                     f"{_fmt(f.drift.quantile(0.5), '.3f')} inter-ocular")
    return lines


def _speed(f: Facts) -> list[str]:
    lines = []
    med = ", ".join(f"{label} {_fmt(f.timings[col].quantile(0.5))} s/{per}" for col, label, per in STAGES
                    if len(f.timings[col]))
    if med:
        lines.append(f"  median times     {med}")
    wall_fph, actor_fph = faces_per_hour(f)
    if wall_fph or actor_fph:
        lines.append(f"  faces per hour   {_fmt(wall_fph, '.4g')} wall-clock (latest run), {_fmt(actor_fph, '.4g')} "
                     "per anonymizer actor")
    lines.append("  fingerprints     " + ", ".join(f"{k} ({n} inputs)" for k, n in f.fingerprints.most_common()))
    return lines


def _failed(f: Facts, limit: int) -> list[str]:
    n_failed = f.summary["failures"]
    lines = ["", f"failed inputs ({n_failed}):" if n_failed else "failed inputs: none"]
    for r in f.failed[:limit]:
        lines.append(f"  {r['status']:<8} {r['rel_path']}: {r.get('error') or '(no reason recorded)'}")
    if n_failed > min(limit, len(f.failed)):
        lines.append(f"  ... {n_failed - min(limit, len(f.failed))} more in the manifest")
    for title, reasons in (("face fallbacks", f.face_reasons), ("re-ID check errors", f.score_reasons)):
        lines += _by_reason(title, reasons, limit)
    return lines


def _by_reason(title: str, reasons: Reasons, limit: int) -> list[str]:
    if not reasons:
        return []
    lines = ["", f"{title} by reason:"]
    for reason, group in reasons.top(limit):
        ex = ", ".join(group.tags()) + (", ..." if group.count > len(group.examples) else "")
        lines.append(f"  {group.count:>5} x {reason}  [{ex}]")
    return lines


def inspect_text(f: Facts, output_uri: str, failed: bool = False, limit: int = FAILED_LISTED) -> str:
    head = f"rp-anonymize inspect {output_uri}"
    if not f.n_rows:
        return head + "\n  no manifest rows (nothing has run here, or the first manifest part was not written yet)"
    lines = [head, *_figures(f), *_privacy(f, failed), *_speed(f)]
    if failed:
        lines += _failed(f, limit)
    return "\n".join(lines)
