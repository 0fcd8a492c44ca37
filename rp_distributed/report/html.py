"""``report.html``: one self-contained page (no network, no CDN; a Content-Security-Policy forbids any load that is
not a ``data:`` image), a section a function, built from the facts, the plots and the gallery."""

from __future__ import annotations

import html
import json
import time

from .. import io
from .consistency import FACE_CAP, FACES_PER_SUBJECT
from .facts import STAGES, Facts, faces_per_hour, load
from .gallery import gallery
from .plots import plot_consistency, plot_ladder, plot_reid, plot_timings, plot_utility
from .runinfo import report_uri
from .sketch import Reasons

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222;
     padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h3{font-size:1em;margin:14px 0 4px}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
     vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;font-size:.88em}.warn{background:#fff3cd;border:1px solid #e0c060;padding:6px 10px;border-radius:4px}
.bad{background:#f8d7da;border:1px solid #d08088;padding:6px 10px;border-radius:4px}
.ok{background:#e6f4ea;border:1px solid #8cc59a;padding:6px 10px;border-radius:4px}
img.plot{display:block;max-width:100%;margin:6px 0}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0;width:min-content;font-size:.78em;text-align:center}
.gallery img{display:block;border:1px solid #ccc}.pair{display:flex;gap:2px}
pre{background:#f7f7f7;border:1px solid #e2e2e2;padding:8px;font-size:.8em;overflow-x:auto;max-height:420px}
code{font-size:.92em}pre.cell{margin:0;max-height:none;border:0;background:none;padding:0}
"""

# Counts the images that really rendered (naturalWidth > 0) and any resource the page tried to load from
# elsewhere, and writes them into #render-check: a headless browser's --dump-dom reads them back.
_SCRIPT = """
(function(){var blocked=0;document.addEventListener('securitypolicyviolation',function(){blocked++;});
window.addEventListener('load',function(){var imgs=document.images,ok=0;
for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0){ok++;}}
var res=(performance.getEntriesByType?performance.getEntriesByType('resource'):[]).filter(function(e){
return e.name.indexOf('data:')!==0;}).length;
var el=document.getElementById('render-check');el.setAttribute('data-images',imgs.length);
el.setAttribute('data-rendered',ok);el.setAttribute('data-external',res);el.setAttribute('data-blocked',blocked);
el.textContent=ok+' of '+imgs.length+' images rendered; '+res+' external resources loaded';});})();
"""

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'")


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _pre(x) -> str:
    """Text content (not an attribute): quotes stay readable in the page source."""
    return html.escape("" if x is None else str(x), quote=False)


def _table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td class=\"n\">{_e(v)}</td>" if i in numeric else f"<td>{_e(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def _img(b64: str | None, kind: str, alt: str) -> str:
    if b64 is None:
        return f"<p class=\"note\">No data for this plot ({_e(alt)}).</p>"
    return f"<img class=\"plot\" data-plot=\"{kind}\" alt=\"{_e(alt)}\" src=\"data:image/png;base64,{b64}\">"


def _reasons(title: str, reasons: Reasons, limit: int = 50) -> str:
    if not reasons:
        return f"<p>{_e(title)}: none.</p>"
    items = reasons.top()
    rows = [[g.count, k, ", ".join(g.tags()) + (f", … ({g.count - len(g.examples)} more)" if g.count > len(g.examples)
                                                else "")] for k, g in items[:limit]]
    more = len(items) - limit + reasons.others
    note = f"<p class=\"note\">{more} more reasons in the manifest.</p>" if more > 0 else ""
    return f"<h3>{_e(title)}</h3>" + _table(["count", "reason", "examples"], rows, {0}) + note


def _fmt(v, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def _pct(rate: float | None, suffix: str = "") -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%{suffix}"


def privacy_line(s: dict) -> str:
    """Identity exported, and beside it the faces the first detection pass missed (found by the output audit)."""
    exported = s["identity_exported"]
    return (f"<p class=\"{'bad' if exported else 'ok'}\">Faces exported with identity information: "
            f"<b>{exported}</b> of {s['reid_scored']} scored (must be 0). Faces the first detection pass missed, "
            f"found on the output by the audit and anonymized: <b>{s['missed_by_first_pass']}</b>.</p>")


def _latest_info(f: Facts) -> tuple[str | None, dict]:
    latest = max(f.runs) if f.runs else None
    return latest, ((f.run_infos.get(latest) or {}) if latest else {})


def _head(f: Facts, output_uri: str, include_originals: bool) -> list[str]:
    runs = ", ".join(f"{r} ({n} inputs)" for r, n in sorted(f.runs.items())) or "none"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>rp-anonymize report: {_e(output_uri)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Anonymization report</h1><p class=\"note\">{_e(output_uri)} — generated "
             f"{_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by rp-anonymize from the manifest's latest view "
             f"({f.n_images} inputs, {f.n_faces} faces; runs: {_e(runs)})</p>"]
    if include_originals:
        parts.append("<p class=\"bad\"><b>This report embeds ORIGINAL faces</b> (report.include_originals: true): "
                     "it contains identifiable people. Handle it like the raw data.</p>")
    else:
        parts.append("<p class=\"ok\">Originals are <b>not embedded</b>: the gallery shows anonymized output "
                     "only (report.include_originals: false).</p>")
    parts.append(privacy_line(f.summary))
    parts.append("<p id=\"render-check\" class=\"note\">(render check runs on load)</p>")
    return parts


def _outcomes(f: Facts) -> list[str]:
    s = f.summary
    return ["<h2>Outcomes</h2>",
            _table(["images by status", "count"], [[k, v] for k, v in f.by_status.items()], {1}),
            _table(["faces by applied method", "count"], f.by_method.most_common(), {1}),
            f"<p>{s['fallbacks']} faces did not get the requested method (fallback or mask); "
            f"{s['failures']} images failed (error or withheld: nothing written).</p>",
            _reasons("Image failures (error / withheld)", f.image_reasons),
            _reasons("Face fallbacks (why the requested method is not what was applied)", f.face_reasons),
            _reasons("Re-ID check / utility signal errors (box masked)", f.score_reasons)]


def _reid(f: Facts) -> list[str]:
    s = f.summary
    rows = [["first try (reverse personalization, before escalation)", len(f.first_try),
             _fmt(f.first_try.quantile(0.5)), _pct(s["reid_rate_first_try"])],
            ["output check (written image)", len(f.final), _fmt(f.final.quantile(0.5)),
             _pct(s["reid_rate"], " exported")]]
    second = (f" Second recognizer (reporting only): {_pct(s['report_reid_rate'])} matched."
              if s["report_reid_rate"] is not None else "")
    return ["<h2>Re-identification</h2>",
            _img(plot_reid(f), "reid-histogram", "re-ID distances: first try and exported result"),
            _table(["distances", "faces", "median", "re-identified"], rows, {1, 2}),
            f"<p class=\"note\">Threshold {_fmt(f.threshold, 'g')}: a face closer than this to its original "
            f"counts as re-identified; on the written image such a face is masked "
            f"(privacy.fallback_if_reidentified), and the output check records the distance that decided it. "
            f"Recognizer matches on boxes that were masked: {s['matched_masked']}.{second}</p>"]


def _ladder(f: Facts) -> list[str]:
    parts = ["<h3>Escalation ladder</h3>"]
    png = plot_ladder(f)
    if png is None and f.ladder:
        parts.append("<p class=\"note\">No escalation: every face had one try, not checked between tries "
                     "(privacy.escalate: false).</p>")
    elif png is None:
        parts.append("<p class=\"note\">No diffusion tries (the method is not reverse personalization).</p>")
    else:
        parts.append(_img(png, "ladder", "faces per rung of the escalation ladder"))
    if f.ladder:
        parts.append(_table(["try", "guidance", "faces run", "checked by the recognizer", "not re-identified after it"],
                            [[r.number, r.guidance, r.run, r.checked, r.passed] for r in f.ladder], {0, 2, 3, 4}))
        parts.append(f"<p class=\"note\">{f.summary['escalated']} faces escalated past the first try; "
                     f"{f.unet_evals} UNet image evaluations over {f.tries} tries.</p>")
    return parts


def _consistency(f: Facts) -> list[str]:
    """Pseudonyms: whether each subject's written faces are one person, and none is its original."""
    c = f.consistency
    if not c.linked_faces:
        return []
    share = _pct(c.share)
    sample = (f" The figures are those of a uniform sample of subjects (the report holds at most {FACE_CAP} faces)."
              if c.sampled else "")
    capped = f" {c.capped} faces past the first {FACES_PER_SUBJECT} of a subject are not measured." if c.capped else ""
    rows = [["subjects with 2 written faces or more", c.subjects, c.faces],
            ["measured (2 faces or more with a descriptor)", c.measured, ""],
            ["consistent (every pair below the threshold)", c.consistent, ""],
            ["faces without a descriptor (masked, or none could be made)", "", c.undescribed],
            ["faces closer to their own original than the threshold", "", c.reidentified]]
    return ["<h2>Pseudonym consistency</h2>",
            f"<p>{c.linked_faces} written faces carry a pseudonym_id. Subjects whose written faces are one person "
            f"to the recognizer: <b>{share}</b> ({c.consistent} of {c.measured} measured).</p>",
            _img(plot_consistency(f), "consistency", "recognizer distances within a subject and to the originals"),
            _table(["", "subjects", "faces"], rows, {1, 2}),
            f"<p class=\"note\">Threshold {_fmt(c.threshold, 'g')} (privacy.reid_threshold). Between the written "
            "faces of one subject the distance should fall below it (one synthetic person); to its own original each "
            "face must stay above it (the re-ID gate masks it otherwise). The distance to a subject's other originals "
            "is not measured: the manifest keeps no descriptor of an original. With a destructive method the share "
            "says little (the recognizer finds blurred faces alike whoever they are)." + sample + capped + "</p>"]


def _utility_and_timings(f: Facts) -> list[str]:
    parts = ["<h2>Utility</h2>", _img(plot_utility(f), "utility", "head-pose change and landmark shift"),
             f"<p class=\"note\">Median head-pose change {_fmt(f.pose.quantile(0.5), '.1f')} degrees, median landmark "
             f"shift {_fmt(f.drift.quantile(0.5), '.3f')} inter-ocular distances ({len(f.pose)} faces measured).</p>",
             "<h2>Timings</h2>", _img(plot_timings(f), "timings", "seconds per stage")]
    rows = []
    for col, label, per in STAGES:
        s = f.timings[col]
        rows.append([label, f"per {per}", len(s), _fmt(s.quantile(0.5)), _fmt(s.quantile(0.9)),
                     _fmt(s.total if len(s) else None, ".4g")])
    parts.append(_table(["stage", "unit", "n", "median s", "p90 s", "total s"], rows, {2, 3, 4, 5}))
    wall_fph, actor_fph = faces_per_hour(f)
    wall = _latest_info(f)[1].get("wall_s")
    parts.append(f"<p>Faces per hour: <b>{_fmt(wall_fph, '.4g')}</b> wall-clock in the latest run"
                 + (f" ({_fmt(wall, '.1f')} s)" if wall else " (n/a: the run did not finish or recorded no wall time)")
                 + f"; <b>{_fmt(actor_fph, '.4g')}</b> per anonymizer actor from its median time per face.</p>")
    return parts


def _figure(it: dict) -> str:
    if "error" in it:
        return f"<figure><figcaption>{_e(it['tag'])}: {_e(it['error'])}</figcaption></figure>"
    imgs = ""
    if "before" in it:
        imgs += (f"<img class=\"thumb original\" alt=\"original {_e(it['tag'])}\" "
                 f"src=\"data:image/jpeg;base64,{it['before']}\">")
    imgs += f"<img class=\"thumb\" alt=\"anonymized {_e(it['tag'])}\" src=\"data:image/jpeg;base64,{it['after']}\">"
    cap = f"{_e(it['tag'])}<br>{_e(it['method'])}<br>d = {_fmt(it['distance'], '.3f')}"
    if it.get("reidentified"):
        cap += " (re-identified: masked)" if "mask" in it["method"] else " (re-identified)"
    title = f" title=\"{_e(it['face_error'])}\"" if it.get("face_error") else ""
    return f"<figure{title}><div class=\"pair\">{imgs}</div><figcaption>{cap}</figcaption></figure>"


def _gallery(f: Facts, size: int, px: int, include_originals: bool) -> list[str]:
    items = gallery(f.gallery, size, px, include_originals)
    parts = [f"<h2>Gallery: {len(items)} anonymized faces"
             + (" (original | anonymized)" if include_originals else " (anonymized output only)") + "</h2>"]
    if not items:
        parts.append("<p class=\"note\">No written faces.</p>")
    parts += ["<div class=\"gallery\">", *(_figure(it) for it in items), "</div>"]
    if f.n_faces > len(items):
        parts.append(f"<p class=\"note\">{f.n_faces - len(items)} more faces are not shown (report.gallery_size; "
                     "the faces shown are a random sample of the written ones).</p>")
    return parts


def _settings(f: Facts) -> list[str]:
    parts = ["<h2>Settings</h2>", _table(["settings fingerprint", "inputs"], f.fingerprints.most_common(), {1})]
    for title, counter in (("model identifiers", f.models), ("method parameters", f.params),
                           ("attribute prompts", f.prompts)):
        if counter:
            rows = []
            for k, n in counter.most_common(10):
                try:
                    k = json.dumps(json.loads(k), indent=1, sort_keys=True)
                except (TypeError, ValueError):
                    pass
                rows.append(f"<tr><td><pre class=\"cell\">{_pre(k)}</pre></td><td class=\"n\">{n}</td></tr>")
            head = f"<h3>{_e(title)}</h3><table><tr><th>{_e(title)}</th><th>faces</th></tr>"
            parts.append(head + "".join(rows) + "</table>")
    latest, info = _latest_info(f)
    if latest:
        parts.append(f"<h3>Config of run {_e(latest)}</h3>")
        if info.get("config"):
            meta = {k: v for k, v in info.items() if k != "config"}
            parts.append("<pre>" + _pre(json.dumps(meta, indent=2, default=str)) + "</pre>")
            parts.append("<pre>" + _pre(json.dumps(info["config"], indent=2, default=str)) + "</pre>")
        else:
            parts.append("<p class=\"note\">Not recorded (no config-" + _e(latest) + ".json beside the manifest: "
                         "the run was made by an older version).</p>")
    return parts


def render(f: Facts, output_uri: str, include_originals: bool, gallery_size: int = 24, thumbnail_px: int = 112) -> str:
    """The report's HTML."""
    parts = [*_head(f, output_uri, include_originals), *_outcomes(f), *_reid(f), *_ladder(f), *_consistency(f),
             *_utility_and_timings(f), *_gallery(f, gallery_size, thumbnail_px, include_originals), *_settings(f),
             f"<script>{_SCRIPT}</script></body></html>"]
    return "\n".join(parts)


def write_report(output_uri: str, manifest_dir: str = "_manifest", include_originals: bool = False,
                 gallery_size: int | None = None, thumbnail_px: int | None = None) -> str:
    """Build ``report.html`` from the manifest under ``output_uri``; returns its URI.

    Originals are embedded only when this call asks (never because an earlier run's config did). ``None`` sizes
    come from the latest run's recorded config (``report.*``), else the defaults."""
    output_uri = io.normalize_prefix(output_uri)
    f = load(output_uri, manifest_dir)
    rcfg = (_latest_info(f)[1].get("config") or {}).get("report") or {}
    size = int(rcfg.get("gallery_size", 24)) if gallery_size is None else gallery_size
    px = int(rcfg.get("thumbnail_px", 112)) if thumbnail_px is None else thumbnail_px
    page = render(f, output_uri, bool(include_originals), size, px)
    uri = report_uri(output_uri, manifest_dir)
    io.write_atomic(uri, page.encode())
    return uri
