import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from mammacls.evaluation.metrics import compute_metrics


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=200)
    logits = rng.normal(size=(200, 3)) + np.eye(3)[y] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    m = compute_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["roc_auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["roc_auc_weighted"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="weighted"))
    p, r, f, s = precision_recall_fscore_support(y, pred)
    assert m["per_class"]["malignant"]["recall"] == pytest.approx(r[1])
    assert m["per_class"]["normal"]["precision"] == pytest.approx(p[2])
    assert m["per_class"]["benign"]["support"] == s[0]
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()


def test_known_small_case():
    y = np.array([0, 0, 1, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    m = compute_metrics(y, probs)
    assert m["accuracy"] == 0.75
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert m["per_class"]["benign"]["recall"] == 0.5
    assert m["per_class"]["malignant"]["precision"] == 0.5


def test_auc_is_none_when_a_class_is_absent():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    m = compute_metrics(y, probs)
    assert m["per_class"]["normal"]["roc_auc"] is None
    assert m["roc_auc_macro"] == pytest.approx(1.0)


def test_the_bootstraps_auc_equals_scikit_learns_ties_included():
    from mammacls.evaluation.metrics import _fast_auc

    rng = np.random.default_rng(3)
    for trial in range(60):
        n = int(rng.integers(5, 300))
        positive = rng.random(n) < rng.uniform(0.1, 0.9)
        score = np.round(rng.random(n), 1 + trial % 4)  # coarse rounding: many ties
        if positive.all() or not positive.any():
            assert _fast_auc(positive, score) is None
            continue
        assert _fast_auc(positive, score) == pytest.approx(roc_auc_score(positive, score), abs=1e-12)
    assert _fast_auc(np.array([True, False, True]), np.array([0.9, 0.1, 0.5])) == 1.0
    assert _fast_auc(np.array([True, False]), np.array([0.5, 0.5])) == 0.5
