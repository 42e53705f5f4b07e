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
from mammacls.evaluation.results import (
    GROUP_COLUMNS, ClassFigures, Evaluation, GroupSummary, ModelResult, Overlap, SelectiveFigures,
)
from mammacls.inference.model_files import ModelSummary
from mammacls.inference.probabilities import describe_temperatures
from mammacls.reporting.text import (SOURCE_COLUMNS, SOURCE_COLUMNS_NOTE, absent_classes_note, describe_malignant,
                                     describe_sure_errors, source_rows)
from mammacls.reporting.plots import (
    confusion_matrix_figure, figure_png_bytes, precision_recall_figure, reliability_figure, roc_figure,
    thumbnail_png, training_curves_figure,
)
from mammacls.store import atomic_write_bytes, atomic_write_json, atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1500px;
color:#1f2328;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#57606a;margin-top:0}
table{border-collapse:collapse;margin:1rem 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #d0d7de;padding:.35rem .7rem;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f6f8fa}
td.best{font-weight:700;color:#1a7f37}
section{margin:2.5rem 0;border-top:2px solid #d0d7de;padding-top:1rem;min-width:0}
.models{display:grid;grid-template-columns:repeat(auto-fit,minmax(600px,1fr));gap:0 2rem;align-items:start}
.figs{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:.8rem;align-items:start} img{max-width:100%}
.tag{display:inline-block;font-size:.75rem;border:1px solid #8c959f;border-radius:1rem;padding:0 .45rem;
margin:0 .15rem;color:#57606a}
.gallery{display:flex;flex-wrap:wrap;gap:.6rem}.gallery figure{margin:0;font-size:.8rem;max-width:170px}
.gallery figcaption{color:#57606a} .flag{color:#cf222e;font-weight:700}
.group{display:flex;gap:.3rem;align-items:flex-end;border:1px solid #d0d7de;padding:.3rem;border-radius:6px}
.note{background:#fff8c5;border:1px solid #d4a72c;padding:.6rem .9rem;border-radius:6px}
"""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "model"


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _ci(value: Any, interval: Any) -> str:
    if value is None:
        return "–"
    return (f"{value:.3f} <small>[{interval[0]:.2f}–{interval[1]:.2f}]</small>" if interval
            else f"{value:.3f}")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _selective_line(selective: SelectiveFigures | None, kind: str) -> str:
    if not selective:
        return ""
    rejected = selective.rejected_images
    return (f"<p>Abstention (as predict would decide): {selective.coverage:.1%} of the {kind}'s images accepted, "
            f"accuracy on them {_fmt(selective.accuracy_accepted)}; {selective.coverage_ok:.1%} confident "
            f"(status ok), accuracy {_fmt(selective.accuracy_ok)}; {selective.rejected} rejected, "
            f"{selective.uncertain} uncertain; {html.escape(describe_sure_errors(selective))}.</p>"
            + _folded_list(f"Rejected images ({len(rejected)})",
                           [f"{Path(r.path).name}: {r.reason or ''}" for r in rejected]))


def _folded_list(summary: str, items: list[str], limit: int = 50) -> str:
    """``items`` as a list folded under ``summary`` (the first ``limit``; metrics.json has them all)."""
    if not items:
        return ""
    shown = "".join(f"<li>{html.escape(item)}</li>" for item in items[:limit])
    more = f"<li>and {len(items) - limit} more (all in metrics.json)</li>" if len(items) > limit else ""
    return f"<details><summary>{html.escape(summary)}</summary><ul>{shown}{more}</ul></details>"


def _overlap_html(overlap: Overlap | None) -> str:
    """The images of the set this model saw in training or validation, each with what it matches."""
    matches = (overlap.matches if overlap else None) or ()
    if not matches:
        return ""
    return (f"<p class=flag>{len(matches)} of these images overlap this model's training/validation data: "
            "its figures are inflated.</p>"
            + _folded_list("Overlapping images", [f"{Path(m.path).name}: {m.kind} of {m.matches}" for m in matches]))


def _group_table(group: GroupSummary) -> str:
    head = "".join(f"<th>{c.replace('_roc_auc_macro', ' AUC').replace('_', ' ')}</th>" for c in GROUP_COLUMNS)
    body = "".join(f"<tr><td>{html.escape(row.name)}</td>" + "".join(f"<td>{_fmt(v)}</td>" for v in row.values)
                   + "</tr>" for row in group.members)
    body += ("<tr><th>mean ± std</th>" + "".join(f"<th>{_fmt(s.mean)} ± {_fmt(s.std)}</th>" for s in group.summary)
             + "</tr>")
    kind = "cross-validation folds" if group.kind == "cv" else "repeated runs (seeds)"
    return f"<h3>{html.escape(group.run)}: {kind}</h3><table><tr><th>model</th>{head}</tr>{body}</table>"


def _misclassified_gallery(result: ModelResult, eval_set, limit: int = 40) -> str:
    probabilities = result.probabilities
    statuses = result.statuses
    predicted = probabilities.argmax(axis=1)
    wrong = [i for i in range(len(predicted)) if predicted[i] != eval_set.labels[i]]
    wrong.sort(key=lambda i: -probabilities[i, predicted[i]])  # most confident mistakes first
    cards = []
    for i in wrong[:limit]:
        status = statuses[i] if i < len(statuses) else None
        shown = "" if status is None else (f"<br>status <b>{status}</b>" if status == "ok"
                                           else f"<br>status <span class=flag>{status}</span>")
        caption = (f"{html.escape(Path(eval_set.paths[i]).name)}<br>true {CLASSES[eval_set.labels[i]]}, "
                   f"predicted <b>{CLASSES[predicted[i]]}</b> ({probabilities[i, predicted[i]]:.2f}){shown}")
        cards.append(f"<figure>{_img_tag(thumbnail_png(eval_set.images[i]), eval_set.paths[i])}"
                     f"<figcaption>{caption}</figcaption></figure>")
    more = f" (the {limit} most confident of {len(wrong)} shown)" if len(wrong) > limit else ""
    ok = sum(1 for i in wrong if i < len(statuses) and statuses[i] == "ok")
    said = f"; {ok} of them with status ok, as predict would answer" if statuses else ""
    return (f"<h3>Misclassified images of the {eval_set.kind}: {len(wrong)}{more}</h3><p>Most confident first{said}."
            f"</p><div class=gallery>{''.join(cards)}</div>" if wrong else "<h3>No misclassified images</h3>")


def _duplicates_html(summary: dict[str, Any], limit: int = 12) -> str:
    if not summary:
        return ""
    from mammacls.inference.images import load_grayscale
    from mammacls.inference.pixels import ImageReadError

    roots = summary.get("source_roots") or {}
    single_root = Path(summary.get("source", ""))
    blocks = []
    for members in list(summary.get("duplicate_group_members", {}).values())[:limit]:
        thumbs = []
        for rel in members[:4]:
            name, _, inside = rel.partition(":")  # several sources: members are "SOURCE:relative/path"
            path = Path(roots[name]) / inside if len(roots) > 1 and name in roots else single_root / rel
            try:
                thumbs.append(f"<figure>{_img_tag(thumbnail_png(load_grayscale(path), 80), rel)}"
                              f"<figcaption>{html.escape(Path(rel).name)}</figcaption></figure>")
            except ImageReadError:
                thumbs.append(f"<figure><figcaption>{html.escape(rel)} (unreadable now)</figcaption></figure>")
        blocks.append(f"<div class=group>{''.join(thumbs)}</div>")
    conflicts = "".join(
        "<li>" + ", ".join(f"{html.escape(m['path'])} ({m['label']})" for m in c["members"])
        + (" — left out" if c.get("excluded") else " — kept") + "</li>"
        for c in summary.get("conflict_groups", []))
    return (f"<h3>Duplicate groups ({summary.get('duplicate_groups')} groups, "
            f"{summary.get('images_in_duplicate_groups')} images; each stays inside one split): "
            f"the first {min(limit, len(summary.get('duplicate_group_members', {})))}</h3>"
            f"<div class=gallery>{''.join(blocks)}</div>"
            + (f"<h3>Label conflicts ({summary.get('conflicts')})</h3><ul>{conflicts}</ul>" if conflicts else ""))


def _sources_table(evaluation: Evaluation) -> str:
    absent = evaluation.data.classes_absent
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("model", *SOURCE_COLUMNS))
    body = "".join(f"<tr><td>{html.escape(r.name)}</td>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
                   + "</tr>" for r in evaluation.models for row in source_rows(r))
    return ("<h3>Per source (malignant vs the other classes present)</h3>"
            + (f"<p>{html.escape(absent_classes_note(absent))}</p>" if absent else "")
            + f"<table><tr>{head}</tr>{body}</table><p class=sub>{html.escape(SOURCE_COLUMNS_NOTE)}.</p>")


def model_tags(model: ModelSummary) -> list[str]:
    """What kind of model a result row is: ImageNet start, mask-guided, ensemble, shipped."""
    tags = []
    if model.pretrained:
        tags.append("ImageNet " + str(model.pretrained).rsplit(".", 1)[-1])
    if model.mask_guided:
        tags.append("mask-guided")
    if model.is_ensemble:  # averaged folds, or one model holding several networks
        tags.append(f"ensemble of {model.members}")
    if model.source == "shipped":
        tags.append("shipped")
    if model.init:
        tags.append(f"fine-tuned from {model.init}")
    elif not model.pretrained and model.source != "ensemble":
        tags.append("from scratch")
    group = model.group
    if group is not None and group.kind in ("cv", "repeat"):
        tags.append(f"{'fold' if group.kind == 'cv' else 'seed run'} {group.member} of {group.of}")
    if not model.finished:
        tags.append("unfinished")
    return tags


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def write_report(evaluation: Evaluation, eval_set, out_dir: Path) -> Path:
    """Write metrics.json, per-model PNGs and index.html into ``out_dir``; returns the HTML path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MammaclsError(f"report folder {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", evaluation.to_record())
    groups_html = "".join(_group_table(g) for g in evaluation.groups)
    if evaluation.data.shows_sources:
        groups_html += _sources_table(evaluation)
    absent = evaluation.data.classes_absent
    sections = [_model_section(r, eval_set, out_dir, absent) for r in evaluation.models]
    summary = eval_set.summary or {}
    overview = (_img_tag(eval_set.overview_png.read_bytes(), "dataset overview")
                if eval_set.overview_png and eval_set.overview_png.is_file() else "")
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>mammacls evaluation report</title><style>{_STYLE}</style></head><body>"
        "<h1>mammacls evaluation report</h1>"
        f"<p class=sub>{created} · mammacls {__version__} · {len(evaluation.models)} model(s)</p>"
        "<p class=note>Research and education only: not a medical device, not for diagnosis.</p>"
        f"<h2>Comparison</h2>{_comparison_html(evaluation)}{groups_html}"
        f"<p>{'</p><p>'.join(_data_lines(eval_set, evaluation))}</p>"
        + f"<div class=models>{''.join(sections)}</div>"
        + (f"<section><h2>Dataset</h2>{overview}{_duplicates_html(summary)}</section>"
           if overview or summary else "")
        + "</body></html>\n"
    )
    atomic_write_text(out_dir / "index.html", page)
    return out_dir / "index.html"


def _comparison_html(evaluation: Evaluation) -> str:
    """One row per model: headline figures with intervals (the best of several marked)."""
    results = evaluation.models

    def headline(m) -> tuple:
        return ((m.accuracy, m.ci95.accuracy), (m.macro_f1, m.ci95.macro_f1), (m.roc_auc_macro, m.ci95.roc_auc_macro))

    best = [max((headline(r.metrics)[k][0] for r in results if headline(r.metrics)[k][0] is not None), default=None)
            for k in range(3)]
    rows = []
    for r in results:
        m = r.metrics
        cells = "".join(f'<td class="{"best" if len(results) > 1 and value == best[k] else ""}">{_ci(value, ci)}</td>'
                        for k, (value, ci) in enumerate(headline(m)))
        mal, cal = m.malignant, m.calibration
        flag = ' <span class=flag>overlaps training data</span>' if r.overlap and r.overlap.images else ""
        tags = "".join(f"<span class=tag>{html.escape(t)}</span>" for t in model_tags(r.model))
        rows.append(f"<tr><td>{html.escape(r.name)}{flag}</td><td>{html.escape(str(r.model.arch))}</td>"
                    f"<td>{tags}</td>"
                    f"<td>{r.model.img_size}</td>{cells}"
                    f"<td>{_ci(mal.sensitivity, mal.sensitivity_ci95)}</td>"
                    f"<td>{_ci(mal.specificity, mal.specificity_ci95)}</td>"
                    f"<td>{_fmt(cal.before.ece)} → {_fmt(cal.after.ece)}</td></tr>")
    return ("<table><tr><th>model</th><th>arch</th><th>kind</th><th>px</th><th>accuracy</th><th>macro F1</th>"
            "<th>ROC-AUC macro</th><th>malignant sensitivity</th><th>malignant specificity</th>"
            "<th>ECE raw → calibrated</th></tr>" + "".join(rows) + "</table>"
            + "<p class=sub>95% intervals from a class-stratified bootstrap "
            f"({results[0].metrics.bootstrap.resamples} resamples). "
            + ("Probabilities are temperature-calibrated on each model's validation data."
               if evaluation.calibrated else "Raw (uncalibrated) probabilities.") + "</p>")


def _class_row(name: str, figures: ClassFigures, called: int | None) -> str:
    """A class's row; ``called``: how many images were predicted as a class the set does not hold (None: held)."""
    if called is not None:  # nothing to recall, and a precision of 0 would only restate the wrong calls
        return f"<tr><td>{name}</td><td colspan=5>absent from this set ({called} images predicted {name})</td></tr>"
    return (f"<tr><td>{name}</td><td>{_ci(figures.precision, figures.precision_ci95)}</td>"
            f"<td>{_ci(figures.recall, figures.recall_ci95)}</td>"
            + "".join(f"<td>{_fmt(v)}</td>" for v in (figures.f1, figures.roc_auc, figures.support)) + "</tr>")


def _model_section(r: ModelResult, eval_set, out_dir: Path, absent: tuple[str, ...]) -> str:
    """One model's per-class table, operating point, calibration and figures (also written as PNGs)."""
    slug = _slug(r.name)
    m = r.metrics
    cal = m.calibration
    figures = {
        "confusion_matrix": confusion_matrix_figure(m.confusion_matrix, r.name),
        "roc": roc_figure(eval_set.labels, r.probabilities, f"ROC one-vs-rest: {r.name}"),
        "precision_recall": precision_recall_figure(eval_set.labels, r.probabilities, f"precision-recall: {r.name}"),
        "reliability": reliability_figure(cal.bins_before, cal.bins_after, cal.before.ece, cal.after.ece,
                                          f"reliability ({describe_temperatures(cal.temperature, cal.class_temperatures)})"),
    }
    if r.history:
        figures["training_curves"] = training_curves_figure(list(r.history), f"training: {r.name}")
    pngs = {}
    for kind, figure in figures.items():
        pngs[kind] = figure_png_bytes(figure)
        atomic_write_bytes(out_dir / f"{kind}_{slug}.png", pngs[kind])
    predicted = m.predicted_counts
    per_class = "".join(_class_row(c, m.per_class[c], predicted[k] if c in absent else None)
                        for k, c in enumerate(CLASSES))
    val = r.model.val_metrics or {}  # as training recorded them in the card
    return (
        f"<section><h2>{html.escape(r.name)}</h2>"
        f"<p class=sub>{html.escape(str(r.model.arch))}, {r.model.img_size} px, "
        f"source: {html.escape(r.model.source)}, sha256 {html.escape(str(r.model.sha256)[:16])}…, "
        f"validation macro-F1 {_fmt(val.get('macro_f1'))}"
        + "".join(f" <span class=tag>{html.escape(t)}</span>" for t in model_tags(r.model)) + "</p>"
        + _overlap_html(r.overlap) +
        "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>ROC-AUC</th>"
        f"<th>support</th></tr>{per_class}</table>"
        f"<p>{html.escape(_sentence(describe_malignant(m.malignant)))}</p>"
        f"<p>Calibration: {describe_temperatures(cal.temperature, cal.class_temperatures, 'temperature ')}; ECE {cal.before.ece:.3f} → "
        f"{cal.after.ece:.3f}, Brier {cal.before.brier:.3f} → {cal.after.brier:.3f} "
        "(15 confidence bins).</p>"
        f"{_selective_line(m.selective, eval_set.kind)}"
        f"<div class=figs>{''.join(_img_tag(png, kind + ' ' + r.name) for kind, png in pngs.items())}</div>"
        f"{_misclassified_gallery(r, eval_set)}</section>")


def _data_lines(eval_set, evaluation: Evaluation) -> list[str]:
    """What was evaluated: the set, its counts, and what prepare kept, grouped and skipped."""
    counts = evaluation.data.counts
    lines = [f"{html.escape(eval_set.description)}: {len(eval_set.paths)} images "
             f"({', '.join(f'{c} {counts[c]}' for c in CLASSES)})."]
    summary = eval_set.summary or {}
    if summary:
        lines.append(
            f"Prepared dataset: {summary.get('images_used')} of {summary.get('images_found')} images used; "
            f"{summary.get('duplicate_groups')} duplicate groups ({summary.get('images_in_duplicate_groups')} images) "
            f"kept inside one split; {summary.get('conflicts')} label conflicts "
            f"({'left out' if not summary.get('keep_conflicts') else 'kept'}); "
            f"{len(summary.get('skipped', []))} files skipped.")
    skipped = evaluation.data.skipped
    if skipped:
        names = ", ".join(html.escape(Path(item.path).name) for item in skipped[:20])
        lines.append(f"{len(skipped)} files were skipped (unreadable or missing): {names}"
                     + (" …" if len(skipped) > 20 else "") + ".")
    if eval_set.dropped:
        dropped = sorted({Path(d.match.path).name for d in eval_set.dropped})
        lines.append(f"{len(dropped)} images were left out as seen in a model's training or validation "
                     f"(--drop-overlap): {html.escape(', '.join(dropped[:20]))}" + (" …" if len(dropped) > 20 else "")
                     + ".")
    return lines
