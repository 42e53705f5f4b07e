"""Classification metrics (numpy + scikit-learn; no torch)."""

from __future__ import annotations

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
    # Average over the classes seen in y_true or y_pred, as scikit-learn does by default.
    present = (support > 0) | np.isin(labels, y_pred)
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
            name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                   "support": int(support[k]), "roc_auc": aucs[k]}
            for k, name in enumerate(CLASSES)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
