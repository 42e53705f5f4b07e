"""Classification metrics (numpy + scikit-learn; no torch)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from mammacls import CLASSES


def compute_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class and averaged P/R/F1, one-vs-rest ROC-AUC, confusion matrix.

    ``y_true`` holds class indices into CLASSES; ``probabilities`` is N x 3.
    ROC-AUC of a class is None when the set lacks positives or negatives for
    it; the macro and weighted AUCs average the classes where it is defined
    (identical to scikit-learn's one-vs-rest averages when all are).
    """
    with warnings.catch_warnings():  # a set may lack a class the model predicts: handled here, on purpose
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return _compute_metrics(y_true, probabilities)


def _compute_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import (
        accuracy_score, balanced_accuracy_score, confusion_matrix, log_loss,
        precision_recall_fscore_support, roc_auc_score,
    )

    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = list(range(len(CLASSES)))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    aucs: list[float | None] = []
    for k in labels:
        positives = y_true == k
        aucs.append(float(roc_auc_score(positives, probabilities[:, k]))
                    if positives.any() and not positives.all() else None)
    defined = [(auc, support[k]) for k, auc in enumerate(aucs) if auc is not None]
    auc_macro = float(np.mean([a for a, _ in defined])) if defined else None
    auc_weighted = (float(np.average([a for a, _ in defined], weights=[s for _, s in defined]))
                    if defined and sum(s for _, s in defined) > 0 else None)
    # Average over the classes the set holds: a set without normals gets no normal figures.
    present = support > 0
    clipped = np.clip(probabilities, 1e-12, 1.0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float(np.average(f1, weights=support)) if support.sum() else 0.0,
        "roc_auc_macro": auc_macro,
        "roc_auc_weighted": auc_weighted,
        "log_loss": float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=labels)) if len(y_true) else None,
        "per_class": {
            name: {"precision": float(precision[k]) if support[k] or (y_pred == k).any() else None,
                   "recall": float(recall[k]) if support[k] else None,
                   "f1": float(f1[k]) if support[k] else None,
                   "support": int(support[k]), "roc_auc": aucs[k]}
            for k, name in enumerate(CLASSES)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


MALIGNANT = CLASSES.index("malignant")


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    y_true = np.asarray(y_true)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def reliability_bins(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [{"low": float(edges[b]), "high": float(edges[b + 1]), "count": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()) if (which == b).any() else None,
             "accuracy": float(correct[which == b].mean()) if (which == b).any() else None}
            for b in range(bins)]


def brier_score(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Multi-class Brier score: mean squared distance to the one-hot truth (0 best, 2 worst)."""
    onehot = np.eye(probabilities.shape[1])[np.asarray(y_true)]
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


def calibration_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    clipped = np.clip(probabilities, 1e-12, 1.0)
    nll = -np.log(clipped[np.arange(len(y_true)), np.asarray(y_true)]).mean() if len(y_true) else 0.0
    return {"ece": expected_calibration_error(y_true, probabilities), "brier": brier_score(y_true, probabilities),
            "nll": float(nll)}


def threshold_at_specificity(y_true: np.ndarray, p_malignant: np.ndarray, specificity: float = 0.9) -> float:
    """Lowest malignant-probability threshold whose specificity (malignant vs rest) reaches ``specificity``."""
    negatives = np.sort(p_malignant[np.asarray(y_true) != MALIGNANT])
    if len(negatives) == 0:
        return 0.5
    # predicting malignant when p >= t: specificity = share of negatives below t
    k = int(np.ceil(specificity * len(negatives)))
    if k >= len(negatives):
        return float(np.nextafter(negatives[-1], np.inf))
    return float(np.nextafter(negatives[k - 1], np.inf)) if k > 0 else float(negatives[0])


def malignant_metrics(y_true: np.ndarray, probabilities: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """Malignant vs rest: sensitivity and specificity of the argmax decision, and at ``threshold``."""
    y_true = np.asarray(y_true)
    positive = y_true == MALIGNANT
    predicted = probabilities.argmax(axis=1) == MALIGNANT
    result = {"sensitivity": _rate(predicted, positive), "specificity": _rate(~predicted, ~positive)}
    if threshold is not None:
        at = probabilities[:, MALIGNANT] >= threshold
        result.update(threshold_spec90=float(threshold), sensitivity_at_spec90=_rate(at, positive),
                      specificity_at_spec90=_rate(~at, ~positive))
    return result


def _rate(hit: np.ndarray, among: np.ndarray) -> float | None:
    return float(hit[among].mean()) if among.any() else None


def _fast_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC as the Mann-Whitney statistic: the share of (positive, negative) pairs the score orders
    right, ties counted half; each positive's place among the sorted negatives (6-8x faster than ranking
    everything with scipy, which the bootstrap does a thousand times per figure)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    negatives, positives = np.sort(score[~positive]), score[positive]
    below = np.searchsorted(negatives, positives, "left").sum()  # negatives strictly below
    below_or_tied = np.searchsorted(negatives, positives, "right").sum()
    return float((below + below_or_tied) / 2 / (n_pos * n_neg))


def _class_rates(y: np.ndarray, pred: np.ndarray):
    """Per class from the confusion matrix: support, predicted count, true positives, recall, precision
    and F1 (0 where undefined)."""
    k = len(CLASSES)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    tp = np.diag(cm)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return support, predicted, tp, recall, precision, f1


def _point_metrics(y: np.ndarray, probabilities: np.ndarray, threshold: float | None) -> dict[str, float | None]:
    """The figures that get a confidence interval, computed fast (one bootstrap resample)."""
    k = len(CLASSES)
    support, predicted, tp, recall, precision, f1 = _class_rates(y, probabilities.argmax(axis=1))
    present = support > 0
    aucs = [_fast_auc(y == c, probabilities[:, c]) for c in range(k)]
    defined = [a for a in aucs if a is not None]
    out: dict[str, float | None] = {
        "accuracy": float(tp.sum() / len(y)),
        "macro_f1": float(f1[present].mean()),
        "roc_auc_macro": float(np.mean(defined)) if defined else None,
    }
    for c, name in enumerate(CLASSES):
        out[f"recall_{name}"] = float(recall[c]) if support[c] else None
        out[f"precision_{name}"] = float(precision[c]) if predicted[c] else None
    mal = malignant_metrics(y, probabilities, threshold)
    out["malignant_sensitivity"], out["malignant_specificity"] = mal["sensitivity"], mal["specificity"]
    if threshold is not None:
        out["malignant_sensitivity_at_spec90"] = mal["sensitivity_at_spec90"]
    return out


def bootstrap_ci(
    y_true: np.ndarray, probabilities: np.ndarray, threshold: float | None = None,
    resamples: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile intervals from a class-stratified bootstrap (each class resampled within itself)."""
    y_true = np.asarray(y_true, dtype=int)
    return _bootstrap(y_true, lambda idx: _point_metrics(y_true[idx], probabilities[idx], threshold),
                      resamples, seed, level)


def _bootstrap(y_true: np.ndarray, statistic, resamples: int, seed: int, level: float) -> dict[str, list[float]]:
    """Intervals of every figure ``statistic(indices)`` returns, over class-stratified resamples."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y_true == c) for c in range(len(CLASSES))]
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(members, size=len(members)) for members in by_class if len(members)])
        for key, value in statistic(idx).items():
            if value is not None:
                draws.setdefault(key, []).append(value)
    alpha = (1 - level) / 2
    return {key: [float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha))]
            for key, vals in draws.items() if len(vals) >= resamples // 2}


def subset_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, val_threshold: float | None = None,
    resamples: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict[str, Any]:
    """Figures for a set that may hold only some classes: one source, or a user's outside set.

    Only the classes the set holds are scored (a set without normals gets no
    normal recall); how often the model names a class the set does not hold is
    reported instead (``predicted_absent``: e.g. lesions called "normal").
    Malignant vs the other classes present: ROC-AUC of p(malignant), the
    argmax decision, the sensitivity at the model's validation threshold for
    90 % specificity, and the ROC point of 90 % specificity on this set
    itself (threshold chosen on these images: optimistic, for comparison with
    published figures). Intervals: class-stratified bootstrap.
    """
    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    present = [k for k in range(len(CLASSES)) if (y_true == k).any()]
    absent = [k for k in range(len(CLASSES)) if k not in present]
    predicted = probabilities.argmax(axis=1)
    point = _subset_point(y_true, probabilities, present, val_threshold)
    return {
        "n": int(len(y_true)),
        "counts": {CLASSES[k]: int((y_true == k).sum()) for k in present},
        "classes_absent": [CLASSES[k] for k in absent],
        "predicted_absent": {CLASSES[k]: float((predicted == k).mean()) for k in absent},
        "val_threshold_spec90": val_threshold,
        **point,
        "ci95": _bootstrap(y_true, lambda idx: _subset_point(y_true[idx], probabilities[idx], present, val_threshold),
                           resamples, seed, level),
    }


def _subset_point(y: np.ndarray, probabilities: np.ndarray, present: list[int],
                  val_threshold: float | None) -> dict[str, float | None]:
    predicted = probabilities.argmax(axis=1)
    _, _, tp, recall, _, f1 = _class_rates(y, predicted)  # a prediction of an absent class is a miss
    out: dict[str, float | None] = {
        "accuracy": float(tp.sum() / len(y)),
        "macro_f1": float(f1[present].mean()),
        "roc_auc_macro": (float(np.mean([_fast_auc(y == k, probabilities[:, k]) for k in present]))
                          if len(present) == len(CLASSES) else None),
    }
    for k in present:
        out[f"recall_{CLASSES[k]}"] = float(recall[k])
    positive = y == MALIGNANT
    if positive.any() and not positive.all():
        p_mal = probabilities[:, MALIGNANT]
        at_set = p_mal >= threshold_at_specificity(y, p_mal, 0.9)
        out.update(
            malignant_auc=_fast_auc(positive, p_mal),
            malignant_sensitivity=_rate(predicted == MALIGNANT, positive),
            malignant_specificity=_rate(predicted != MALIGNANT, ~positive),
            malignant_sensitivity_at_set_spec90=_rate(at_set, positive),
        )
        if val_threshold is not None:
            at_val = p_mal >= val_threshold
            out.update(malignant_sensitivity_at_val_threshold=_rate(at_val, positive),
                       malignant_specificity_at_val_threshold=_rate(~at_val, ~positive))
    return out
