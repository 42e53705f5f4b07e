"""Text shared by evaluate's tables on the terminal and its HTML report: intervals, per-source rows,
the malignant operating points in a sentence."""

from __future__ import annotations

from mammacls.evaluation.results import SURE, MalignantFigures, ModelResult, SelectiveFigures
from mammacls.evaluation.scoring import ALL_SOURCES


def format_ci(value: float | None, interval: tuple[float, float] | None) -> str:
    """``0.874 [0.82–0.92]``, or the bare value when there is no interval."""
    if value is None:
        return "–"
    return f"{value:.3f} [{interval[0]:.2f}–{interval[1]:.2f}]" if interval else f"{value:.3f}"


SOURCE_COLUMNS = ("source", "n", "accuracy", "macro F1", "mal. AUC", "sens @ val thr.", "sens @ spec 90%", "called",
                  "accepted", "wrong & sure")
SOURCE_COLUMNS_NOTE = ("sens @ val thr.: malignant sensitivity at the model's own threshold for 90% specificity on its "
                       "validation set; sens @ spec 90%: the ROC point of 90% specificity on these images (threshold "
                       "chosen on them, optimistic); called: how often the model named a class the source does not "
                       "hold; accepted: the share the refusal gate lets through; wrong & sure: of the accepted wrong "
                       f"answers, how many predict marks ok at p >= {SURE:g}; macro F1 over the classes the source holds")


def source_rows(entry: ModelResult) -> list[tuple[str, ...]]:
    """One formatted row per source of a model's result (``SOURCE_COLUMNS``), for the CLI and the report."""
    rows = []
    selective = entry.metrics.selective
    for name, m in entry.metrics.sources.items():
        called = ", ".join(f"{c} {share:.1%}" for c, share in m.predicted_absent.items()) or "–"
        if selective is None:
            coverage = sure = None
        elif name == ALL_SOURCES:
            coverage, sure = selective.coverage, selective.sure_errors
        else:
            coverage, sure = selective.coverage_by_source.get(name), selective.sure_errors_by_source.get(name)
        point, ci = m.point, m.ci95
        rows.append((name, str(m.n), format_ci(point.accuracy, ci.accuracy), format_ci(point.macro_f1, ci.macro_f1),
                     format_ci(point.malignant_auc, ci.malignant_auc),
                     format_ci(point.malignant_sensitivity_at_val_threshold, ci.malignant_sensitivity_at_val_threshold),
                     format_ci(point.malignant_sensitivity_at_set_spec90, ci.malignant_sensitivity_at_set_spec90),
                     called, "–" if coverage is None else f"{coverage:.1%}",
                     "–" if sure is None else f"{sure.sure} of {sure.errors}"))
    return rows


def absent_classes_note(absent) -> str:
    return f"classes absent from this set: {', '.join(absent)} — no recall, F1 or AUC is reported for them"


def describe_malignant(mal: MalignantFigures) -> str:
    """One sentence on the malignant-vs-rest operating points, with intervals."""
    text = (f"malignant vs rest: sensitivity {format_ci(mal.sensitivity, mal.sensitivity_ci95)}, "
            f"specificity {format_ci(mal.specificity, mal.specificity_ci95)}")
    at = mal.at_spec90
    if at is not None:
        text += (f"; at the threshold giving 90% specificity on validation (p ≥ {at.threshold:.3f}): "
                 f"sensitivity {format_ci(at.sensitivity, at.sensitivity_ci95)}, "
                 f"specificity {format_ci(at.specificity, None)}")
    return text


def describe_sure_errors(selective: SelectiveFigures) -> str:
    """How many of the accepted wrong answers predict marks ok at p >= SURE."""
    figures = selective.sure_errors
    share = f" ({figures.share:.0%})" if figures.share is not None else ""
    return f"wrong and sure (status ok, p >= {SURE:g}): {figures.sure} of {figures.errors} errors{share}"
