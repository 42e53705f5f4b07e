"""The classification loss: cross-entropy with class weights, per source or pooled.

Pooled weights (inverse class frequency over all sources together) let a source that lacks a class
distort the others: BUS-BRA has no normal scans, so pooled over BUSI + BUS-BRA a BUSI normal
weighs 11 times a benign image instead of 3.3 times within BUSI, and the model calls too many
BUSI images normal. Per-source weights balance each source's classes among themselves (over the
classes it has) and let the sources count by their size; with one source the two are the same.
"""

from __future__ import annotations

import numpy as np

from mammacls import CLASSES
from mammacls.choices import ClassWeights, parse_choice


def per_class_weights(labels: np.ndarray) -> np.ndarray:
    """Inverse class frequency over the classes present (absent classes: 0), mean 1 per image."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    present = counts > 0
    return np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)


class ClassWeightedLoss:
    """Cross-entropy with label smoothing, each image weighted as ``mode`` says (fitted on the training
    images): ``per-source``, ``pooled`` (PyTorch's class-weighted form, exactly as before) or ``none``."""

    def __init__(self, mode: str | ClassWeights, labels: np.ndarray, sources: np.ndarray, label_smoothing: float):
        self.mode = parse_choice(ClassWeights, mode, "class_weights").value
        self.label_smoothing = label_smoothing
        labels, sources = np.asarray(labels), np.asarray(sources)
        self.pooled = per_class_weights(labels) if self.mode == "pooled" else np.ones(len(CLASSES))
        # per source: each table has mean 1 over its source's images, so over all of them too
        self.by_source = ({str(s): per_class_weights(labels[sources == s]) for s in np.unique(sources)}
                          if self.mode == "per-source" else {})

    def image_weights(self, labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """Weights of these images (a source the training images lacked: weight 1 per class present)."""
        if self.mode != "per-source":
            return self.pooled[np.asarray(labels)]
        return np.array([self.by_source.get(str(s), np.ones(len(CLASSES)))[y] for y, s in zip(labels, sources)])

    def record(self) -> dict:
        """For the card: the weight of each class, per source when they differ by source."""
        if self.mode == "per-source":
            return {s: dict(zip(CLASSES, np.round(table, 4).tolist())) for s, table in self.by_source.items()}
        return dict(zip(CLASSES, np.round(self.pooled, 4).tolist()))

    def __call__(self, logits, targets, weights=None):
        """The loss of ``logits`` (float) for class indices ``targets``; ``weights``: the images' weights
        (a tensor, from :meth:`image_weights`), used by ``per-source``."""
        import torch
        from torch.nn import functional as F

        logits = logits.float()
        if self.mode != "per-source":
            weight = torch.as_tensor(self.pooled, dtype=torch.float32, device=logits.device)
            return F.cross_entropy(logits, targets, weight=weight if self.mode == "pooled" else None,
                                   label_smoothing=self.label_smoothing)
        losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)
        return (losses * weights).sum() / weights.sum().clamp_min(1e-12)
