"""The evaluation report: metrics JSON, figure PNGs and one self-contained HTML page."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from pathlib import Path
from typing import Any

from mammacls import CLASSES, __version__
from mammacls.errors import MammaclsError
from mammacls.plots import confusion_matrix_figure, figure_png_bytes, roc_figure
from mammacls.store import atomic_write_bytes, atomic_write_json, atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1f2328;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#57606a;margin-top:0}
table{border-collapse:collapse;margin:1rem 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #d0d7de;padding:.35rem .7rem;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f6f8fa}
td.best{font-weight:700;color:#1a7f37}
section{margin:2.5rem 0;border-top:2px solid #d0d7de;padding-top:1rem}
.figs{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start} img{max-width:100%}
.note{background:#fff8c5;border:1px solid #d4a72c;padding:.6rem .9rem;border-radius:6px}
"""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "model"


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def write_report(results: list[dict[str, Any]], eval_set, out_dir: Path, document: dict[str, Any]) -> Path:
    """Write metrics.json, per-model PNGs and index.html into ``out_dir``; returns the HTML path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MammaclsError(f"report folder {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", document)

    headline = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "roc_auc_weighted")
    best = {k: max((r["metrics"][k] for r in results if r["metrics"][k] is not None), default=None)
            for k in headline}
    rows = []
    for r in results:
        cells = "".join(
            f'<td class="{"best" if len(results) > 1 and r["metrics"][k] == best[k] else ""}">{_fmt(r["metrics"][k])}</td>'
            for k in headline)
        recall = r["metrics"]["per_class"]["malignant"]["recall"]
        rows.append(f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(str(r['model']['arch']))}</td>"
                    f"<td>{r['model']['img_size']}</td>{cells}<td>{_fmt(recall)}</td></tr>")
    comparison = ("<table><tr><th>model</th><th>arch</th><th>px</th>"
                  + "".join(f"<th>{k.replace('_', ' ')}</th>" for k in headline)
                  + "<th>malignant recall</th></tr>" + "".join(rows) + "</table>")

    sections = []
    for r in results:
        slug = _slug(r["name"])
        cm_png = figure_png_bytes(confusion_matrix_figure(r["metrics"]["confusion_matrix"], r["name"]))
        roc_png = figure_png_bytes(roc_figure(eval_set.labels, r["probabilities"], f"ROC one-vs-rest: {r['name']}"))
        atomic_write_bytes(out_dir / f"confusion_matrix_{slug}.png", cm_png)
        atomic_write_bytes(out_dir / f"roc_{slug}.png", roc_png)
        per_class = "".join(
            f"<tr><td>{c}</td>" + "".join(f"<td>{_fmt(r['metrics']['per_class'][c][k])}</td>"
                                          for k in ("precision", "recall", "f1", "roc_auc", "support")) + "</tr>"
            for c in CLASSES)
        val = r["model"].get("val_metrics") or {}
        sections.append(
            f"<section><h2>{html.escape(r['name'])}</h2>"
            f"<p class=sub>{html.escape(str(r['model']['arch']))}, {r['model']['img_size']} px, "
            f"source: {html.escape(r['model']['source'])}, sha256 {html.escape(str(r['model']['sha256'])[:16])}…, "
            f"validation macro-F1 {_fmt(val.get('macro_f1'))}</p>"
            "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>ROC-AUC</th>"
            f"<th>support</th></tr>{per_class}</table>"
            f"<div class=figs>{_img_tag(cm_png, 'confusion matrix ' + r['name'])}"
            f"{_img_tag(roc_png, 'ROC curves ' + r['name'])}</div></section>")

    counts = document["data"]["counts"]
    data_lines = [f"{html.escape(eval_set.description)}: {len(eval_set.paths)} images "
                  f"({', '.join(f'{c} {counts[c]}' for c in CLASSES)})."]
    summary = eval_set.summary or {}
    if summary:
        data_lines.append(
            f"Prepared dataset: {summary.get('images_used')} of {summary.get('images_found')} images used; "
            f"{summary.get('duplicate_groups')} duplicate groups ({summary.get('images_in_duplicate_groups')} images) "
            f"kept inside one split; {summary.get('conflicts')} label conflicts "
            f"({'left out' if not summary.get('keep_conflicts') else 'kept'}); "
            f"{len(summary.get('skipped', []))} files skipped.")
    if eval_set.skipped:
        data_lines.append(f"{len(eval_set.skipped)} unreadable files were skipped.")
    overview = (_img_tag(eval_set.overview_png.read_bytes(), "dataset overview")
                if eval_set.overview_png and eval_set.overview_png.is_file() else "")
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>mammacls evaluation report</title><style>{_STYLE}</style></head><body>"
        "<h1>mammacls evaluation report</h1>"
        f"<p class=sub>{created} · mammacls {__version__} · {len(results)} model(s)</p>"
        "<p class=note>Research and education only: not a medical device, not for diagnosis.</p>"
        f"<h2>Comparison</h2>{comparison}"
        f"<p>{'</p><p>'.join(data_lines)}</p>"
        + "".join(sections)
        + (f"<section><h2>Dataset</h2>{overview}</section>" if overview else "")
        + "</body></html>\n"
    )
    atomic_write_text(out_dir / "index.html", page)
    return out_dir / "index.html"
