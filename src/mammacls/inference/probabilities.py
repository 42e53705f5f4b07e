"""Logits to class probabilities, the same everywhere: prediction, calibration, evaluation, training."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of N x C logits, divided by ``temperature`` first (calibration)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def describe_temperatures(temperature: float, class_temperatures: tuple[float, ...] | None = None,
                          label: str = "T = ") -> str:
    """``T = 0.70``, or ``T = 0.55 / 0.73 / 2.05 by answer (benign / malignant / normal)``."""
    if class_temperatures is None:
        return f"{label}{temperature:.2f}"
    from mammacls import CLASSES

    return f"{label}{' / '.join(f'{t:.2f}' for t in class_temperatures)} by answer ({' / '.join(CLASSES)})"


def calibrated_softmax(logits: np.ndarray, temperature: float = 1.0,
                       class_temperatures: tuple[float, ...] | None = None) -> np.ndarray:
    """Class probabilities under a model's calibration: one ``temperature``, or with
    ``class_temperatures`` the temperature of each image's top class. Dividing an image's logits by one
    positive number keeps its top class, so either way every answer stays what it was; only how sure
    it is changes."""
    if class_temperatures is None:
        return softmax(logits, temperature)
    logits = np.asarray(logits, dtype=np.float64)
    per_image = np.asarray(class_temperatures, dtype=np.float64)[logits.argmax(axis=1)][:, None]
    return softmax(logits / per_image)
