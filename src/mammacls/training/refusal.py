"""Fitting the refusal gate at the end of training: feature densities per member network, the
image-statistics density, their thresholds and the abstention level. What predict does with
them is ``mammacls.inference.gate``. numpy and scikit-learn, no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mammacls.errors import MammaclsError
from mammacls.inference.gate import COLOUR_LIMIT, MIN_SIDE, MIN_STD, OOD_FILE, image_distances, mahalanobis
from mammacls.store import atomic_path, sha256_file, writing

PCA_DIMS = 32
# Thresholds: this many robust standard deviations above the median validation distance (log scale).
# Chosen by leaving one source out (fit on BUSI, check BUS-BRA's validation images, and the reverse):
# the feature density of one scanner rejects much of another's scans below 12 (see the model card),
# so it is a backstop; the image statistics, at 4, keep >= 97 % of the left-out source.
FEATURE_SPREAD = 12.0
IMAGE_SPREAD = 4.0


def robust_threshold(held_out: np.ndarray, spread: float) -> float:
    """``spread`` robust standard deviations above the median, on a log scale.

    Set on images the network never trained on. Median and MAD barely move with a few odd images,
    a seed or a resize, where a top quantile of ~100 distances is nearly their maximum and jumps
    with each of them; the log scale suits distances, which are positive and skewed.
    """
    logs = np.log(np.maximum(np.asarray(held_out, dtype=np.float64), 1e-9))
    centre = float(np.median(logs))
    mad = 1.4826 * float(np.median(np.abs(logs - centre)))
    return float(np.exp(centre + spread * max(mad, 1e-3)))


def fit_image_density(train_stats: np.ndarray, val_stats: np.ndarray, spread: float = IMAGE_SPREAD) -> dict[str, Any]:
    """Gaussian over image statistics of the training images; threshold from validation."""
    from sklearn.covariance import LedoitWolf

    mean = train_stats.mean(axis=0)
    covariance = LedoitWolf().fit(train_stats).covariance_
    arrays = {"image_mean": mean.astype(np.float32), "image_precision": np.linalg.inv(covariance).astype(np.float32)}
    return {"arrays": arrays, "threshold": robust_threshold(image_distances(arrays, val_stats), spread)}


def _member_density(train_features: np.ndarray, train_labels: np.ndarray, n_classes: int, dims: int) -> dict:
    """Class means and shared precision of one network's features in a PCA subspace."""
    centre = train_features.mean(axis=0)
    centred = train_features - centre
    dims = int(min(dims, centred.shape[0] - n_classes, centred.shape[1]))
    if dims < 1:
        raise MammaclsError("too few training images to fit the out-of-distribution density")
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:dims].T  # D x k
    projected = centred @ components
    means = np.stack([projected[train_labels == c].mean(axis=0) if (train_labels == c).any()
                      else np.zeros(dims) for c in range(n_classes)])
    residual = projected - means[train_labels]
    # Ledoit-Wolf shrinkage: a few hundred images cannot pin down the weakest directions, and an
    # unshrunk inverse would amplify tiny numeric differences there (e.g. GPU TF32 vs CPU) into distance.
    from sklearn.covariance import LedoitWolf

    covariance = LedoitWolf(assume_centered=True).fit(residual).covariance_
    arrays = {"centre": centre, "components": components, "means": means, "precision": np.linalg.inv(covariance)}
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def fit_density(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                n_classes: int, members: int = 1, dims: int = PCA_DIMS, spread: float = FEATURE_SPREAD) -> dict[str, Any]:
    """One density per member network (its slice of the features), each with its own threshold.

    A member's distance is divided by its threshold; an image's score is the median over the
    members, so one member's odd feature directions cannot reject (or accept) on their own.
    Score 1.0 is the threshold.
    """
    width = train_features.shape[1] // members
    arrays: dict[str, np.ndarray] = {}
    thresholds = []
    for k in range(members):
        part = slice(k * width, (k + 1) * width)
        member = _member_density(train_features[:, part], train_labels, n_classes, dims)
        thresholds.append(robust_threshold(mahalanobis(member, val_features[:, part]), spread))
        arrays.update({f"member{k}.{name}": value for name, value in member.items()})
    arrays["member_thresholds"] = np.array(thresholds, dtype=np.float32)
    return {"arrays": arrays, "threshold": 1.0, "member_thresholds": thresholds, "spread": spread,
            "dims": int(arrays["member0.components"].shape[1]), "members": members}


def save_density(folder: Path, fitted: dict[str, Any], image_fitted: dict[str, Any]) -> dict[str, Any]:
    from safetensors.numpy import save_file

    target = Path(folder) / OOD_FILE
    with atomic_path(target) as tmp, writing(target):
        save_file({**fitted["arrays"], **image_fitted["arrays"]}, str(tmp))
    return {"file": OOD_FILE, "sha256": sha256_file(target), "threshold": fitted["threshold"],
            "image_threshold": image_fitted["threshold"], "member_thresholds": fitted["member_thresholds"],
            "spread": fitted["spread"], "dims": fitted["dims"], "members": fitted["members"],
            "method": "per member: Mahalanobis to the nearest class mean, shared Ledoit-Wolf covariance, PCA; "
                      "threshold median + spread x MAD of log validation distances; score: median over members "
                      "of distance / threshold",
            "colour_limit": COLOUR_LIMIT, "min_side": MIN_SIDE, "min_std": MIN_STD}


def choose_min_confidence(probabilities: np.ndarray, labels: np.ndarray, floor: float = 0.4) -> float:
    """The largest confidence below which validation predictions are right less than half of the time."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    order = np.argsort(confidence)
    best = floor
    for k in range(5, len(order) + 1):
        if correct[order[:k]].mean() < 0.5:
            best = max(best, float(confidence[order[k - 1]]) + 1e-6)
    return best
