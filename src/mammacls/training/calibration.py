"""Calibration: temperature scaling fitted on the validation split (numpy/scipy only)."""

from __future__ import annotations

import numpy as np

from mammacls.inference.probabilities import softmax


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    probabilities = np.clip(softmax(logits, temperature), 1e-12, 1.0)
    return float(-np.log(probabilities[np.arange(len(y_true)), y_true]).mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar

    y_true = np.asarray(y_true, dtype=int)
    if len(y_true) == 0:
        return 1.0
    # search log T so T stays positive; [1/20, 20] covers any sane network
    result = minimize_scalar(lambda log_t: nll(logits, y_true, float(np.exp(log_t))),
                             bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    best = float(np.exp(result.x))
    return best if nll(logits, y_true, best) <= nll(logits, y_true, 1.0) else 1.0
