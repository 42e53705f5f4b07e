"""Scoring one model's probabilities on an evaluation set into the typed figures of ``results``: metrics
with intervals, calibration, malignant operating points, per source, what the refusal gate would do,
and the summaries of cross-validation and repeat runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from mammacls import CLASSES
from mammacls.evaluation.metrics import compute_metrics
from mammacls.evaluation.results import (
    GROUP_COLUMNS, Bootstrap, CalibrationFigures, CalibrationScores, ClassFigures, GroupRow, GroupSummary,
    HeadlineIntervals, MalignantFigures, MeanStd, Metrics, ModelResult, RejectedImage, ReliabilityBin,
    SURE, SelectiveFigures, SourceFigures, Spec90Point, SureErrors, as_interval,
)
from mammacls.inference.card import ModelCard
from mammacls.inference.model_files import ModelRef

ALL_SOURCES = "all sources"


def metrics_from_figures(figures: dict[str, Any], malignant: dict[str, Any], ci: dict[str, Any],
                         calibration: dict[str, Any], bootstrap: Bootstrap) -> Metrics:
    """``Metrics`` from what ``evaluation.metrics`` computes (``compute_metrics``, ``malignant_metrics``,
    ``bootstrap_ci``) and the calibration figures."""
    per_class = {c: ClassFigures(**figures["per_class"][c], recall_ci95=as_interval(ci.get(f"recall_{c}")),
                                 precision_ci95=as_interval(ci.get(f"precision_{c}"))) for c in CLASSES}
    threshold = malignant.get("threshold_spec90")
    at_spec90 = None if threshold is None else Spec90Point(
        threshold, malignant["sensitivity_at_spec90"], malignant["specificity_at_spec90"],
        as_interval(ci.get("malignant_sensitivity_at_spec90")))
    mal = MalignantFigures(malignant["sensitivity"], malignant["specificity"],
                           sensitivity_ci95=as_interval(ci.get("malignant_sensitivity")),
                           specificity_ci95=as_interval(ci.get("malignant_specificity")), at_spec90=at_spec90)
    headline = HeadlineIntervals(**{k: as_interval(ci.get(k)) for k in ("accuracy", "macro_f1", "roc_auc_macro")})
    cal = CalibrationFigures(calibration["temperature"], calibration["class_temperatures"], calibration["applied"],
                             CalibrationScores(**calibration["before"]), CalibrationScores(**calibration["after"]),
                             tuple(ReliabilityBin(**b) for b in calibration["bins_before"]),
                             tuple(ReliabilityBin(**b) for b in calibration["bins_after"]))
    scalars = {k: figures[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_precision", "macro_recall",
                                       "macro_f1", "weighted_f1", "roc_auc_macro", "roc_auc_weighted", "log_loss")}
    return Metrics(**scalars, per_class=per_class,
                   confusion_matrix=tuple(tuple(int(v) for v in row) for row in figures["confusion_matrix"]),
                   malignant=mal, ci95=headline, calibration=cal, bootstrap=bootstrap)


def malignant_threshold(card: ModelCard | None, calibrated: bool) -> float | None:
    return card.calibration.malignant_threshold(calibrated) if card and card.calibration else None


def score(logits: np.ndarray, card: ModelCard | None, labels: np.ndarray, calibrated: bool, resamples: int, seed: int,
          probabilities: np.ndarray | None = None) -> tuple[Metrics, np.ndarray]:
    """Metrics with bootstrap intervals, malignant operating points and calibration figures, and the
    probabilities they were computed from (``card`` None: averaged probabilities, nothing calibrated)."""
    from mammacls.evaluation.metrics import bootstrap_ci, calibration_metrics, malignant_metrics, reliability_bins
    from mammacls.inference.probabilities import softmax

    temperature = card.temperature if card else 1.0
    per_class = card.calibration.class_temperatures if card and card.calibration else None
    raw = softmax(logits) if probabilities is None else probabilities
    tuned = (card.calibrated(logits) if card else softmax(logits)) if probabilities is None else probabilities
    chosen = tuned if calibrated else raw
    threshold = malignant_threshold(card, calibrated)
    calibration = {"temperature": temperature, "class_temperatures": per_class,
                   "applied": calibrated and probabilities is None,
                   "before": calibration_metrics(labels, raw), "after": calibration_metrics(labels, tuned),
                   "bins_before": reliability_bins(labels, raw), "bins_after": reliability_bins(labels, tuned)}
    metrics = metrics_from_figures(compute_metrics(labels, chosen), malignant_metrics(labels, chosen, threshold),
                                   bootstrap_ci(labels, chosen, threshold, resamples=resamples, seed=seed),
                                   calibration, Bootstrap(resamples, seed))
    return metrics, chosen


def source_breakdown(eval_set, probabilities: np.ndarray, val_threshold: float | None,
                     resamples: int, seed: int) -> dict[str, SourceFigures]:
    """Figures per source (only the classes each holds), and for all of them together when several.

    Empty for one source that holds every class: the whole-set figures are that source's.
    """
    from mammacls.evaluation.metrics import subset_metrics

    names = list(dict.fromkeys(eval_set.sources)) or ["data"]
    if len(names) == 1 and len(np.unique(eval_set.labels)) == len(CLASSES):
        return {}
    sources = np.array(eval_set.sources or ["data"] * len(eval_set.paths))
    masks = {name: sources == name for name in names}
    if len(names) > 1:
        masks[ALL_SOURCES] = np.ones(len(sources), dtype=bool)
    return {name: SourceFigures.from_figures(subset_metrics(eval_set.labels[mask], probabilities[mask], val_threshold,
                                                            resamples, seed))
            for name, mask in masks.items()}


def selective_metrics(ref: ModelRef, eval_set, logits: np.ndarray, features: np.ndarray,
                      calibrated: bool) -> tuple[SelectiveFigures, tuple[str, ...]]:
    """Accuracy on the images predict would accept, and how many it would accept (coverage), decided by
    predict's own ``Predictor`` on the logits and features already computed; and each image's status.

    The colour check needs the original file, so it is not applied here; the
    size, blank-frame, image-statistics, feature-distance and confidence checks are.
    """
    from mammacls.inference.predictor import Predictor

    predictor = Predictor(ref, None, calibrated=calibrated)  # no backend: the network has run already
    record = predictor.ood_record
    resized = eval_set.at_size(predictor.img_size)
    frames = [predictor.frame(img, None, path, resized=resized[i])
              for i, (img, path) in enumerate(zip(eval_set.images, eval_set.paths))]
    answers = predictor.classify(frames, outputs=(logits, features))
    statuses = np.array([answer.status for answer in answers])
    correct = np.array([CLASSES.index(answer.label) for answer in answers]) == eval_set.labels
    accepted = statuses != "rejected"
    confident = statuses == "ok"
    sources = np.array(eval_set.sources or ["data"] * len(statuses))
    top = np.array([max(answer.probabilities.values()) if answer.probabilities else 0.0 for answer in answers])
    wrong = accepted & ~correct
    sure_wrong = wrong & confident & (top >= SURE)
    return SelectiveFigures(
        coverage_by_source={name: float(accepted[sources == name].mean()) for name in dict.fromkeys(sources)},
        checked=bool(record), coverage=float(accepted.mean()),
        accuracy_accepted=float(correct[accepted].mean()) if accepted.any() else None,
        coverage_ok=float(confident.mean()), accuracy_ok=float(correct[confident].mean()) if confident.any() else None,
        rejected=int((~accepted).sum()), uncertain=int((statuses == "uncertain").sum()),
        min_confidence=predictor.min_confidence, ood_threshold=record.threshold if record else None,
        sure_errors=SureErrors(int(wrong.sum()), int(sure_wrong.sum())),
        sure_errors_by_source={name: SureErrors(int(wrong[sources == name].sum()),
                                                int(sure_wrong[sources == name].sum()))
                               for name in dict.fromkeys(sources)},
        rejected_images=tuple(RejectedImage(eval_set.paths[i], answers[i].reason) for i in np.flatnonzero(~accepted)),
    ), tuple(statuses.tolist())


def group_summaries(results: list[ModelResult]) -> tuple[GroupSummary, ...]:
    """Validation and test figures of each cross-validation or repeat run: per member, mean and std."""
    groups: dict[str, list[ModelResult]] = {}
    for result in results:
        if result.group is not None and result.group.kind in ("cv", "repeat"):
            groups.setdefault(result.group.run, []).append(result)
    summaries = []
    for run, members in groups.items():
        rows = []
        for r in sorted(members, key=lambda r: r.group.member):
            val = r.model.val_metrics or {}  # the card's validation figures, as training recorded them
            test = (r.metrics.accuracy, r.metrics.macro_f1, r.metrics.roc_auc_macro)
            rows.append(GroupRow(r.name, r.group.member,
                                 (val.get("accuracy"), val.get("macro_f1"), val.get("roc_auc_macro"), *test)))
        stats = []
        for k in range(len(GROUP_COLUMNS)):
            values = [row.values[k] for row in rows if row.values[k] is not None]
            stats.append(MeanStd(float(np.mean(values)) if values else None,
                                 float(np.std(values, ddof=1)) if len(values) > 1 else 0.0))
        summaries.append(GroupSummary(run, members[0].group.kind, tuple(rows), tuple(stats)))
    return tuple(summaries)
