"""What a data steward sees: ``report.html`` beside the manifest, and ``rp-anonymize inspect`` in the terminal.

Both read the manifest (``manifest.read_manifest``) and take its **latest view**: for each input, the rows
of the latest run that processed it (a resumed run only holds the inputs it redid; the others keep the
rows of the run that did them). ``run_job`` writes ``report.html`` at the end of every run, and
``rp-anonymize report OUTPUT_URI`` rebuilds it from any finished or partial manifest.

The report is one self-contained HTML file: no network, no CDN, no script or font from elsewhere (a
Content-Security-Policy forbids any load that is not a ``data:`` image). Plots are matplotlib figures
embedded as base64 PNG; gallery thumbnails are cut from the **written output images** by each face's box,
also as ``data:`` URIs. Originals are never embedded unless ``report.include_originals`` is true, and
the report says which it is. The job's config comes from ``<manifest_dir>/config-<run_id>.json``, which
``run_job`` writes at the start of a run (``write_run_info``).
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import io, manifest
from .summary import summarize

REPORT_NAME = "report.html"
RUN_INFO_PREFIX = "config-"
FAILED = ("error", "withheld")
STAGES = (("t_read_s", "read + decode", "image"), ("t_detect_s", "detect + align", "image"),
          ("t_anonymize_s", "anonymize", "face"), ("t_merge_s", "merge + score + write", "image"))


# -- run info: the config of each run, beside the manifest ------------------------------------------------

def run_info_uri(output_uri: str, manifest_dir: str, run_id: str) -> str:
    return io.join_uri(manifest.manifest_uri(output_uri, manifest_dir), f"{RUN_INFO_PREFIX}{run_id}.json")


def write_run_info(output_uri: str, manifest_dir: str, run_id: str, info: dict) -> str:
    """``config-<run_id>.json``: the run's config and facts (written at start, rewritten at the end)."""
    uri = run_info_uri(output_uri, manifest_dir, run_id)
    io.write_atomic(uri, json.dumps(info, indent=2, sort_keys=False, default=str).encode())
    return uri


def read_run_info(output_uri: str, manifest_dir: str, run_id: str) -> dict | None:
    uri = run_info_uri(output_uri, manifest_dir, run_id)
    fs, path = io.filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def report_uri(output_uri: str, manifest_dir: str) -> str:
    return io.join_uri(manifest.manifest_uri(io.normalize_prefix(output_uri), manifest_dir), REPORT_NAME)


# -- the latest view and its facts ------------------------------------------------------------------------

def latest_view(table: pa.Table) -> pa.Table:
    """The rows of each input's latest run (run ids sort by time), in (rel_path, face_index) order."""
    if table.num_rows == 0:
        return table
    last = table.group_by("input_uri", use_threads=False).aggregate([("run_id", "max")])
    last = last.rename_columns(["input_uri", "run_id"])
    view = table.join(last, keys=["input_uri", "run_id"], join_type="inner", use_threads=False)
    view = view.select(table.column_names)
    return view.sort_by([("rel_path", "ascending"), ("face_index", "ascending")])


def _num(values) -> np.ndarray:
    return np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)


def _q(a: np.ndarray, q: float) -> float | None:
    return float(np.quantile(a, q)) if len(a) else None


@dataclass
class Facts:
    """Everything the report and ``inspect`` show, computed once from the latest view."""

    rows: list[dict]
    images: list[dict]  # one row per input: its first (image-level or face 0) row
    faces: list[dict]  # face rows
    runs: Counter  # run_id -> inputs whose latest outcome it holds
    summary: dict  # summary.summarize of the latest view (the end-of-run summary's figures)
    by_status: dict
    by_method: Counter
    image_reasons: dict  # reason -> [rel_path, ...] (error / withheld)
    face_reasons: dict  # face_error -> [rel_path#i, ...]
    score_reasons: dict  # score_error -> [rel_path#i, ...]
    threshold: float | None
    first_try: np.ndarray  # re-ID distance of each face's first generation (reverse personalization)
    final: np.ndarray  # re-ID distance of each written face (the exported result)
    ladder: list[dict]  # per rung: guidance, faces run, faces that passed
    fell_back_after_ladder: int
    pose: np.ndarray
    drift: np.ndarray
    timings: dict  # column -> np.ndarray
    fingerprints: Counter
    models: Counter  # model JSON -> faces
    params: Counter  # params JSON -> faces
    prompts: Counter
    unet_evals: int
    tries: int
    run_infos: dict = field(default_factory=dict)  # run_id -> config-<run_id>.json content (None if absent)


def _tag(r: dict) -> str:
    return r["rel_path"] if r.get("face_index") is None else f"{r['rel_path']}#{r['face_index']}"


def facts(view: pa.Table, run_infos: dict | None = None) -> Facts:
    rows = view.to_pylist()
    images, faces = [], []
    for r in rows:
        if r.get("face_index") in (None, 0):
            images.append(r)
        if r.get("face_index") is not None:
            faces.append(r)
    by_status = dict.fromkeys(manifest.STATUSES, 0)
    for r in images:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    image_reasons, face_reasons, score_reasons = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in images:
        if r["status"] in FAILED:
            image_reasons[r.get("error") or "(no reason recorded)"].append(r["rel_path"])
    for r in faces:
        if r.get("face_error"):
            face_reasons[r["face_error"]].append(_tag(r))
        if r.get("score_error"):
            score_reasons[r["score_error"]].append(_tag(r))
    thresholds = Counter(r["reid_threshold"] for r in faces if r.get("reid_threshold") is not None)
    threshold = thresholds.most_common(1)[0][0] if thresholds else None
    first, rungs = [], defaultdict(lambda: {"run": 0, "checked": 0, "passed": 0})
    fell_back = 0
    for r in faces:
        tries = json.loads(r["tries_json"]) if r.get("tries_json") else []
        if tries and tries[0].get("reid_distance") is not None:
            first.append(tries[0]["reid_distance"])
        for k, t in enumerate(tries):
            rung = rungs[(k, t.get("guidance"))]
            rung["run"] += 1
            d, thr = t.get("reid_distance"), r.get("reid_threshold")
            if d is not None and thr is not None:  # None: not checked (escalation off, or no face to compare)
                rung["checked"] += 1
                rung["passed"] += d >= thr
        if tries and "still re-identified after" in (r.get("face_error") or ""):
            fell_back += 1
    ladder = [{"try": k + 1, "guidance": g, **v} for (k, g), v in sorted(rungs.items(), key=lambda kv: kv[0][0])]
    timings = {}
    for col, _, per in STAGES:
        timings[col] = _num(r.get(col) for r in (faces if per == "face" else images))
    return Facts(
        rows=rows, images=images, faces=faces, runs=Counter(r["run_id"] for r in images),
        summary=summarize(rows), by_status=by_status,
        by_method=Counter(r.get("method_applied") or "none (no crop: image-level fallback)" for r in faces),
        image_reasons=dict(image_reasons), face_reasons=dict(face_reasons), score_reasons=dict(score_reasons),
        threshold=threshold, first_try=_num(first),
        final=_num(r.get("reid_distance") for r in faces if r.get("output_uri")),
        ladder=ladder, fell_back_after_ladder=fell_back,
        pose=_num(r.get("pose_diff_deg") for r in faces), drift=_num(r.get("landmark_displacement") for r in faces),
        timings=timings, fingerprints=Counter(r.get("settings_fingerprint") for r in images),
        models=Counter(r["model"] for r in faces if r.get("model")),
        params=Counter(r["params"] for r in faces if r.get("params")),
        prompts=Counter(r["attribute_prompt"] for r in faces if r.get("attribute_prompt")),
        unet_evals=int(sum(r.get("unet_evals") or 0 for r in faces)),
        tries=int(sum(r.get("tries") or 0 for r in faces)),
        run_infos=dict(run_infos or {}),
    )


def load(output_uri: str, manifest_dir: str = "_manifest") -> Facts:
    """The facts of the latest view of the manifest under ``output_uri``."""
    output_uri = io.normalize_prefix(output_uri)
    view = latest_view(manifest.read_manifest(output_uri, manifest_dir))
    runs = sorted(set(view["run_id"].to_pylist())) if view.num_rows else []
    return facts(view, {r: read_run_info(output_uri, manifest_dir, r) for r in runs})


def faces_per_hour(f: Facts) -> tuple[float | None, float | None]:
    """(wall-clock faces/hour of the latest finished run, faces/hour of one anonymizer from its median
    per-face time)."""
    wall = None
    if f.runs:
        latest = max(f.runs)
        info = f.run_infos.get(latest) or {}
        n = sum(1 for r in f.faces if r["run_id"] == latest)
        if info.get("wall_s") and n:
            wall = n / info["wall_s"] * 3600
    med = _q(f.timings["t_anonymize_s"], 0.5)
    return wall, (3600 / med if med else None)


# -- plots (matplotlib, embedded as base64 PNG) -----------------------------------------------------------

def _figure(width: float = 7.5, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig) -> str:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # counts of faces are whole numbers
        if ax.get_ylabel() == "faces":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def _bins(*arrays: np.ndarray, lo: float | None = None, n: int = 30) -> np.ndarray:
    both = np.concatenate([a for a in arrays if len(a)]) if any(len(a) for a in arrays) else np.zeros(1)
    a, b = (float(both.min()) if lo is None else lo), float(both.max())
    if b <= a:
        b = a + 1e-3
    return np.linspace(a, b, n + 1)


def plot_reid(f: Facts) -> str | None:
    if not len(f.first_try) and not len(f.final):
        return None
    fig = _figure(7.5, 3.2)
    ax = fig.add_subplot()
    extra = [np.array([f.threshold])] if f.threshold is not None else []
    bins = _bins(f.first_try, f.final, *extra, lo=0.0)
    if len(f.first_try):
        ax.hist(f.first_try, bins=bins, alpha=0.55, color="#d95f02", label=f"first try ({len(f.first_try)} faces)")
    if len(f.final):
        ax.hist(f.final, bins=bins, alpha=0.55, color="#1b9e77",
                label=f"output check ({len(f.final)} written faces)")
    if f.threshold is not None:
        ax.axvline(f.threshold, color="black", linestyle="--", linewidth=1.5,
                   label=f"threshold {f.threshold:g} (re-identified below)")
    ax.set_xlabel("re-ID distance, original vs anonymized (dlib recognizer; higher = less alike)")
    ax.set_ylabel("faces")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def plot_ladder(f: Facts) -> str | None:
    if not any(r["checked"] for r in f.ladder):
        return None
    fig = _figure(7.5, 2.8)
    ax = fig.add_subplot()
    labels = [f"try {r['try']}\ng = {r['guidance']:g}" for r in f.ladder]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [r["run"] for r in f.ladder], width=0.4, color="#7570b3", label="faces run at this rung")
    ax.bar(x + 0.2, [r["passed"] for r in f.ladder], width=0.4, color="#1b9e77",
           label="not re-identified after it (done)")
    ax.set_xticks(x, labels)
    ax.set_ylabel("faces")
    ax.legend(fontsize=8)
    ax.set_title(f"{f.fell_back_after_ladder} faces still re-identified after the last rung: fallback", fontsize=9)
    return _png(fig)


def plot_utility(f: Facts) -> str | None:
    if not len(f.pose) and not len(f.drift):
        return None
    fig = _figure(7.5, 2.8)
    for i, (vals, label, color) in enumerate(
            [(f.pose, "head-pose change, degrees (max of yaw, pitch, roll)", "#e7298a"),
             (f.drift, "landmark shift, inter-ocular distances (mean of 5 points)", "#66a61e")]):
        ax = fig.add_subplot(1, 2, i + 1)
        if len(vals):
            ax.hist(vals, bins=_bins(vals, lo=0.0, n=20), color=color)
            ax.axvline(float(np.median(vals)), color="black", linestyle=":", linewidth=1,
                       label=f"median {np.median(vals):.2f}")
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
    fig = _figure(7.5, 0.5 + 0.55 * len(data))
    ax = fig.add_subplot()
    ax.boxplot([d for _, d in data], orientation="horizontal", tick_labels=[lbl for lbl, _ in data], whis=(5, 95),
               showfliers=True)
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("seconds (box: quartiles, whiskers: 5th-95th percentile)")
    return _png(fig)


# -- gallery ----------------------------------------------------------------------------------------------

def _crop_box(r: dict, shape) -> tuple[int, int, int, int]:
    """A square around the face box, 1.4x its side, inside the image."""
    h, w = shape[:2]
    x0, y0, x1, y1 = (float(r[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, 1.4 * max(x1 - x0, y1 - y0, 8.0)
    a, b = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    c, d = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    return a, b, max(c, a + 1), max(d, b + 1)


def _thumb(rgb: np.ndarray, r: dict, px: int) -> str:
    from PIL import Image

    a, b, c, d = _crop_box(r, rgb.shape)
    im = Image.fromarray(np.ascontiguousarray(rgb[b:d, a:c]))
    if max(im.size) > px:
        im.thumbnail((px, px), Image.LANCZOS)
    elif max(im.size) < px:  # small faces: enlarge so the gallery is readable
        scale = px / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    buf = _io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def _decode(uri: str, max_pixels: int = 64_000_000) -> np.ndarray:
    data = io.read_bytes(uri, 1 << 31)
    return io.decode_image(data, max_pixels).rgb


def gallery(f: Facts, size: int, px: int, include_originals: bool) -> list[dict]:
    """Up to ``size`` written faces: {tag, method, distance, reidentified, after, before?, error?}."""
    chosen = [r for r in f.faces if r.get("output_uri") and r.get("box_x0") is not None][:size]
    by_output: dict[str, list[dict]] = defaultdict(list)
    for r in chosen:
        by_output[r["output_uri"]].append(r)
    items = {}
    for uri, rs in by_output.items():
        try:
            out = _decode(uri)
            src = _decode(rs[0]["input_uri"]) if include_originals else None
        except Exception as exc:  # noqa: BLE001 - a moved or deleted output: say so in the gallery
            for r in rs:
                items[id(r)] = {"error": f"cannot read {uri}: {type(exc).__name__}: {exc}"[:200]}
            continue
        for r in rs:
            item = {"after": _thumb(out, r, px)}
            if src is not None and src.shape[:2] == out.shape[:2]:
                item["before"] = _thumb(src, r, px)
            items[id(r)] = item
    result = []
    for r in chosen:
        item = items[id(r)]
        item.update(tag=_tag(r), method=r.get("method_applied") or "-", distance=r.get("reid_distance"),
                    reidentified=r.get("reidentified"), face_error=r.get("face_error"))
        result.append(item)
    return result


# -- HTML -------------------------------------------------------------------------------------------------

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


def _reasons(title: str, reasons: dict, limit: int = 50) -> str:
    if not reasons:
        return f"<p>{_e(title)}: none.</p>"
    items = sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    rows = [[len(v), k, ", ".join(v[:3]) + (f", … ({len(v) - 3} more)" if len(v) > 3 else "")]
            for k, v in items[:limit]]
    more = f"<p class=\"note\">{len(items) - limit} more reasons in the manifest.</p>" if len(items) > limit else ""
    return f"<h3>{_e(title)}</h3>" + _table(["count", "reason", "examples"], rows, {0}) + more


def _fmt(v, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def _privacy_line(s: dict) -> str:
    """Identity exported, and beside it the faces the first detection pass missed (found by the output audit)."""
    exported = s["identity_exported"]
    return (f"<p class=\"{'bad' if exported else 'ok'}\">Faces exported with identity information: "
            f"<b>{exported}</b> of {s['reid_scored']} scored (must be 0). Faces the first detection pass missed, "
            f"found on the output by the audit and anonymized: <b>{s['missed_by_first_pass']}</b>.</p>")


def render(f: Facts, output_uri: str, include_originals: bool, gallery_size: int = 24, thumbnail_px: int = 112) -> str:
    """The report's HTML."""
    s = f.summary
    latest = max(f.runs) if f.runs else None
    info = (f.run_infos.get(latest) or {}) if latest else {}
    cfg = info.get("config") or {}
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>rp-anonymize report: {_e(output_uri)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>Anonymization report</h1><p class=\"note\">{_e(output_uri)} — generated "
                 f"{_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by rp-anonymize from the manifest's latest view "
                 f"({len(f.images)} inputs, {len(f.faces)} faces; runs: "
                 + _e(", ".join(f"{r} ({n} inputs)" for r, n in sorted(f.runs.items())) or "none") + ")</p>")
    if include_originals:
        parts.append("<p class=\"bad\"><b>This report embeds ORIGINAL faces</b> (report.include_originals: true): "
                     "it contains identifiable people. Handle it like the raw data.</p>")
    else:
        parts.append("<p class=\"ok\">Originals are <b>not embedded</b>: the gallery shows anonymized output "
                     "only (report.include_originals: false).</p>")
    parts.append(_privacy_line(s))
    parts.append("<p id=\"render-check\" class=\"note\">(render check runs on load)</p>")

    # outcomes
    parts.append("<h2>Outcomes</h2>")
    parts.append(_table(["images by status", "count"], [[k, v] for k, v in f.by_status.items()], {1}))
    parts.append(_table(["faces by applied method", "count"], f.by_method.most_common(), {1}))
    parts.append(f"<p>{s['fallbacks']} faces did not get the requested method (fallback or mask); "
                 f"{s['failures']} images failed (error or withheld: nothing written).</p>")
    parts.append(_reasons("Image failures (error / withheld)", f.image_reasons))
    parts.append(_reasons("Face fallbacks (why the requested method is not what was applied)", f.face_reasons))
    parts.append(_reasons("Re-ID check / utility signal errors (box masked)", f.score_reasons))

    # privacy
    parts.append("<h2>Re-identification</h2>")
    parts.append(_img(plot_reid(f), "reid-histogram", "re-ID distances: first try and exported result"))
    rows = [["first try (reverse personalization, before escalation)", len(f.first_try),
             _fmt(_q(f.first_try, 0.5)), s["reid_rate_first_try"] is not None and f"{100 * s['reid_rate_first_try']:.1f}%" or "n/a"],
            ["output check (written image)", len(f.final), _fmt(_q(f.final, 0.5)),
             s["reid_rate"] is not None and f"{100 * s['reid_rate']:.1f}% exported" or "n/a"]]
    parts.append(_table(["distances", "faces", "median", "re-identified"], rows, {1, 2}))
    parts.append(f"<p class=\"note\">Threshold {_fmt(f.threshold, 'g')}: a face closer than this to its original "
                 f"counts as re-identified; on the written image such a face is masked "
                 f"(privacy.fallback_if_reidentified), and the output check records the distance that decided it. "
                 f"Recognizer matches on boxes that were masked: {s['matched_masked']}."
                 + (f" Second recognizer (reporting only): {100 * s['report_reid_rate']:.1f}% matched."
                    if s["report_reid_rate"] is not None else "") + "</p>")
    parts.append("<h3>Escalation ladder</h3>")
    ladder_png = plot_ladder(f)
    if ladder_png is None and f.ladder:
        parts.append("<p class=\"note\">No escalation: every face had one try, not checked between tries "
                     "(privacy.escalate: false).</p>")
    elif ladder_png is None:
        parts.append("<p class=\"note\">No diffusion tries (the method is not reverse personalization).</p>")
    else:
        parts.append(_img(ladder_png, "ladder", "faces per rung of the escalation ladder"))
    if f.ladder:
        parts.append(_table(["try", "guidance", "faces run", "checked by the recognizer", "not re-identified after it"],
                            [[r["try"], r["guidance"], r["run"], r["checked"], r["passed"]] for r in f.ladder],
                            {0, 2, 3, 4}))
        parts.append(f"<p class=\"note\">{s['escalated']} faces escalated past the first try; "
                     f"{f.unet_evals} UNet image evaluations over {f.tries} tries.</p>")

    # utility
    parts.append("<h2>Utility</h2>")
    parts.append(_img(plot_utility(f), "utility", "head-pose change and landmark shift"))
    parts.append(f"<p class=\"note\">Median head-pose change {_fmt(_q(f.pose, 0.5), '.1f')} degrees, median landmark "
                 f"shift {_fmt(_q(f.drift, 0.5), '.3f')} inter-ocular distances ({len(f.pose)} faces measured).</p>")

    # timings
    parts.append("<h2>Timings</h2>")
    parts.append(_img(plot_timings(f), "timings", "seconds per stage"))
    trows = []
    for col, label, per in STAGES:
        a = f.timings[col]
        trows.append([label, f"per {per}", len(a), _fmt(_q(a, 0.5)), _fmt(_q(a, 0.9)),
                      _fmt(float(a.sum()) if len(a) else None, ".4g")])
    parts.append(_table(["stage", "unit", "n", "median s", "p90 s", "total s"], trows, {2, 3, 4, 5}))
    wall_fph, actor_fph = faces_per_hour(f)
    wall = info.get("wall_s")
    parts.append(f"<p>Faces per hour: <b>{_fmt(wall_fph, '.4g')}</b> wall-clock in the latest run"
                 + (f" ({_fmt(wall, '.1f')} s)" if wall else " (n/a: the run did not finish or recorded no wall time)")
                 + f"; <b>{_fmt(actor_fph, '.4g')}</b> per anonymizer actor from its median time per face.</p>")

    # gallery
    items = gallery(f, gallery_size, thumbnail_px, include_originals)
    parts.append(f"<h2>Gallery: {len(items)} anonymized faces"
                 + (" (original | anonymized)" if include_originals else " (anonymized output only)") + "</h2>")
    if not items:
        parts.append("<p class=\"note\">No written faces.</p>")
    parts.append("<div class=\"gallery\">")
    for it in items:
        if "error" in it:
            parts.append(f"<figure><figcaption>{_e(it['tag'])}: {_e(it['error'])}</figcaption></figure>")
            continue
        imgs = ""
        if "before" in it:
            imgs += (f"<img class=\"thumb original\" alt=\"original {_e(it['tag'])}\" "
                     f"src=\"data:image/jpeg;base64,{it['before']}\">")
        imgs += f"<img class=\"thumb\" alt=\"anonymized {_e(it['tag'])}\" src=\"data:image/jpeg;base64,{it['after']}\">"
        d = it["distance"]
        cap = f"{_e(it['tag'])}<br>{_e(it['method'])}<br>d = {_fmt(d, '.3f')}"
        if it.get("reidentified"):
            cap += " (re-identified: masked)" if "mask" in it["method"] else " (re-identified)"
        title = f" title=\"{_e(it['face_error'])}\"" if it.get("face_error") else ""
        parts.append(f"<figure{title}><div class=\"pair\">{imgs}</div><figcaption>{cap}</figcaption></figure>")
    parts.append("</div>")
    if len(f.faces) > len(items):
        parts.append(f"<p class=\"note\">{len(f.faces) - len(items)} more faces are not shown "
                     "(report.gallery_size).</p>")

    # settings
    parts.append("<h2>Settings</h2>")
    parts.append(_table(["settings fingerprint", "inputs"], f.fingerprints.most_common(), {1}))
    for title, counter in (("model identifiers", f.models), ("method parameters", f.params),
                           ("attribute prompts", f.prompts)):
        if counter:
            rows = []
            for k, n in counter.most_common(10):
                try:
                    k = json.dumps(json.loads(k), indent=1, sort_keys=True)
                except (TypeError, ValueError):
                    pass
                rows.append([k, n])
            parts.append("<h3>" + _e(title) + "</h3><table><tr><th>" + _e(title) + "</th><th>faces</th></tr>"
                         + "".join(f"<tr><td><pre class=\"cell\">{_pre(k)}</pre></td><td class=\"n\">{n}</td></tr>"
                                   for k, n in rows) + "</table>")
    if latest:
        parts.append(f"<h3>Config of run {_e(latest)}</h3>")
        if cfg:
            meta = {k: v for k, v in info.items() if k != "config"}
            parts.append("<pre>" + _pre(json.dumps(meta, indent=2, default=str)) + "</pre>")
            parts.append("<pre>" + _pre(json.dumps(cfg, indent=2, default=str)) + "</pre>")
        else:
            parts.append("<p class=\"note\">Not recorded (no config-" + _e(latest) + ".json beside the manifest: "
                         "the run was made by an older version).</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_report(output_uri: str, manifest_dir: str = "_manifest", include_originals: bool = False,
                 gallery_size: int | None = None, thumbnail_px: int | None = None) -> str:
    """Build ``report.html`` from the manifest under ``output_uri``; returns its URI.

    Originals are embedded only when this call asks (never because an earlier run's config did). ``None`` sizes
    come from the latest run's recorded config (``report.*``), else the defaults."""
    output_uri = io.normalize_prefix(output_uri)
    f = load(output_uri, manifest_dir)
    rcfg = {}
    if f.runs:
        rcfg = ((f.run_infos.get(max(f.runs)) or {}).get("config") or {}).get("report") or {}
    size = int(rcfg.get("gallery_size", 24)) if gallery_size is None else gallery_size
    px = int(rcfg.get("thumbnail_px", 112)) if thumbnail_px is None else thumbnail_px
    page = render(f, output_uri, bool(include_originals), size, px)
    uri = report_uri(output_uri, manifest_dir)
    io.write_atomic(uri, page.encode())
    return uri


# -- inspect: the same facts in the terminal --------------------------------------------------------------

def inspect_text(f: Facts, output_uri: str, failed: bool = False, limit: int = 200) -> str:
    s = f.summary
    lines = [f"rp-anonymize inspect {output_uri}"]
    if not f.rows:
        return lines[0] + "\n  no manifest rows (nothing has run here, or the first manifest part was not written yet)"
    lines.append("  runs             " + ", ".join(f"{r} ({n} inputs)" for r, n in sorted(f.runs.items())))
    lines.append(f"  images           {len(f.images)}: " + ", ".join(f"{k} {v}" for k, v in f.by_status.items()))
    lines.append(f"  faces            {len(f.faces)}: " + (", ".join(f"{k} {v}" for k, v in f.by_method.most_common())
                                                       or "none"))
    lines.append(f"  fallbacks        {s['fallbacks']} faces not by the requested method"
                 + (f" ({len(f.face_reasons)} distinct reasons)" if f.face_reasons else ""))
    lines.append(f"  failures         {s['failures']} images (error or withheld)"
                 + ("" if failed or not s["failures"] else "; --failed lists them"))
    rate = "n/a" if s["reid_rate"] is None else f"{100 * s['reid_rate']:.1f}% ({s['identity_exported']}/{s['reid_scored']})"
    lines.append(f"  identity exported {rate} (must be 0); first pass missed {s['missed_by_first_pass']} faces "
                 "(found by the output audit, anonymized)")
    if len(f.first_try):
        lines.append(f"  re-ID            first try: median distance {_q(f.first_try, 0.5):.3f}, "
                     f"{100 * (s['reid_rate_first_try'] or 0):.1f}% re-identified; {s['escalated']} escalated; "
                     f"output check: median {_fmt(_q(f.final, 0.5), '.3f')} (threshold {_fmt(f.threshold, 'g')})")
    elif len(f.final):
        lines.append(f"  re-ID            output check: median distance {_q(f.final, 0.5):.3f} "
                     f"(threshold {_fmt(f.threshold, 'g')})")
    if f.unet_evals:
        lines.append(f"  diffusion        {f.tries} tries, {f.unet_evals} UNet image evaluations")
    if len(f.pose):
        lines.append(f"  utility          median head-pose change {_q(f.pose, 0.5):.1f} deg, landmark shift "
                     f"{_fmt(_q(f.drift, 0.5), '.3f')} inter-ocular")
    med = ", ".join(f"{label} {_fmt(_q(f.timings[col], 0.5))} s/{per}" for col, label, per in STAGES
                    if len(f.timings[col]))
    if med:
        lines.append(f"  median times     {med}")
    wall_fph, actor_fph = faces_per_hour(f)
    if wall_fph or actor_fph:
        lines.append(f"  faces per hour   {_fmt(wall_fph, '.4g')} wall-clock (latest run), {_fmt(actor_fph, '.4g')} "
                     "per anonymizer actor")
    lines.append(f"  fingerprints     " + ", ".join(f"{k} ({n} inputs)" for k, n in f.fingerprints.most_common()))
    if failed:
        bad = [r for r in f.images if r["status"] in FAILED]
        lines.append("")
        lines.append(f"failed inputs ({len(bad)}):" if bad else "failed inputs: none")
        for r in bad[:limit]:
            lines.append(f"  {r['status']:<8} {r['rel_path']}: {r.get('error') or '(no reason recorded)'}")
        if len(bad) > limit:
            lines.append(f"  ... {len(bad) - limit} more in the manifest")
        for title, reasons in (("face fallbacks", f.face_reasons), ("re-ID check errors", f.score_reasons)):
            if reasons:
                lines.append("")
                lines.append(f"{title} by reason:")
                for reason, tags in sorted(reasons.items(), key=lambda kv: -len(kv[1]))[:limit]:
                    ex = ", ".join(tags[:3]) + (", ..." if len(tags) > 3 else "")
                    lines.append(f"  {len(tags):>5} x {reason}  [{ex}]")
    return "\n".join(lines)
