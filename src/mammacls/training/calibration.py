"""Calibration: temperature scaling fitted on the validation split (numpy/scipy only)."""

from __future__ import annotations

import numpy as np

from mammacls import CLASSES
from mammacls.inference.probabilities import softmax


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    probabilities = np.clip(softmax(logits, temperature), 1e-12, 1.0)
    return float(-np.log(probabilities[np.arange(len(y_true)), y_true]).mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0),
                    baseline: float = 1.0) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017), searched
    within ``bounds``; ``baseline`` when no T there does better (or there is nothing to fit)."""
    from scipy.optimize import minimize_scalar

    y_true = np.asarray(y_true, dtype=int)
    if len(y_true) == 0:
        return baseline
    # search log T so T stays positive; [1/20, 20] covers any sane network
    result = minimize_scalar(lambda log_t: nll(logits, y_true, float(np.exp(log_t))),
                             bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
    best = float(np.exp(result.x))
    return best if nll(logits, y_true, best) <= nll(logits, y_true, baseline) else baseline


# A class predicted on fewer validation images than this keeps the shared temperature: too few to fit one.
MIN_PREDICTED_FOR_OWN_TEMPERATURE = 20
# How far a class's temperature may stray from the shared one (either way): a class whose few validation
# answers are all right would otherwise be driven to near-certainty.
MAX_TEMPERATURE_RATIO = 4.0


def fit_class_temperatures(logits: np.ndarray, y_true: np.ndarray, shared: float,
                           own: tuple[int, ...] = (CLASSES.index("normal"),)) -> tuple[float, ...] | None:
    """A temperature per predicted class: for the classes in ``own``, the one minimising the NLL of the
    validation images predicted that class (an image's temperature depends only on its top class, so
    the NLL splits into those sums); for the others, ``shared``. None when no class in ``own`` has
    enough validation answers.

    Why normal answers get their own: one temperature fitted on both sources sharpens a model that is
    already too sure when it says normal (BUSI's normals; BUS-BRA has none) to suit its benign and
    malignant answers, and on a scanner it does not know its surest mistakes are lesions called normal.
    The top class is known at prediction time, the source is not. Why only normal: benign and
    malignant answers keep one temperature, so the malignant probability ranks lesion answers as one
    temperature ranks them (giving each its own cost malignant ROC-AUC out of fold)."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true, dtype=int)
    top = logits.argmax(axis=1) if len(logits) else np.zeros(0, dtype=int)
    bounds = (shared / MAX_TEMPERATURE_RATIO, shared * MAX_TEMPERATURE_RATIO)
    temperatures, fitted = [float(shared)] * len(CLASSES), False
    for k in own:
        mine = top == k
        if mine.sum() < MIN_PREDICTED_FOR_OWN_TEMPERATURE:
            continue
        best = fit_temperature(logits[mine], y_true[mine], bounds=bounds, baseline=float(shared))
        if best != shared:
            temperatures[k], fitted = best, True
    return tuple(temperatures) if fitted else None
