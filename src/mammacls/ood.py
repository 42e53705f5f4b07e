"""Refusing what the model cannot judge: image checks, feature-space density, abstention.

Every prediction gets a status: ``ok``; ``uncertain`` when the calibrated top
probability is below the model's ``min_confidence`` (chosen on validation);
or ``rejected`` with a reason: a blank or tiny frame, a strongly coloured image
(photo, colour Doppler), or penultimate features far from every class of the
training set (class-conditional Gaussians with a shared covariance in a PCA
subspace: Lee et al. 2018's Mahalanobis score). numpy only, no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mammacls.errors import MammaclsError
from mammacls.store import atomic_path, sha256_file

OOD_FILE = "ood.safetensors"
MIN_SIDE = 64  # BUSI's smallest side is 190 px
MIN_STD = 2.0  # gray levels: below this the frame is blank
COLOUR_LIMIT = 0.05  # BUSI's most coloured image (Doppler markers) has 0.9 % coloured pixels
DISTANCE_QUANTILE = 0.995
# ~100 validation images make the 99.5 % quantile nearly their maximum: leave a margin for unseen ones
DISTANCE_MARGIN = 1.1
PCA_DIMS = 32


def image_reason(gray: np.ndarray, colour: float | None) -> str | None:
    """Why an image cannot be a B-mode breast ultrasound frame, or None."""
    height, width = gray.shape
    if min(height, width) < MIN_SIDE:
        return f"too small ({width}x{height} px; ultrasound frames are at least {MIN_SIDE} px a side)"
    if float(gray.std()) < MIN_STD:
        return "blank or constant image"
    if colour is not None and colour > COLOUR_LIMIT:
        return f"strongly coloured ({colour:.0%} of pixels): a photo, screenshot or colour Doppler, not B-mode"
    return None


def image_statistics(gray: np.ndarray) -> np.ndarray:
    """A few numbers that describe how an image looks (B-mode ultrasound: dark regions, speckle).

    Brightness, contrast, share of near-white and near-black pixels, histogram entropy,
    neighbour correlation at 1 and 4 px (speckle vs i.i.d. noise vs smooth gradients),
    high-frequency energy and edge density, all on a 128 x 128 copy.
    """
    import cv2

    small = cv2.resize(gray, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float64)
    centred = small - small.mean()
    var = centred.var() + 1e-6

    def corr(dy: int, dx: int) -> float:
        a = centred[dy:, dx:]
        b = centred[: centred.shape[0] - dy, : centred.shape[1] - dx]
        return float((a * b).mean() / var)

    hist = np.bincount(small.astype(np.uint8).ravel(), minlength=256) / small.size
    entropy = float(-(hist[hist > 0] * np.log2(hist[hist > 0])).sum())
    laplacian = cv2.Laplacian(small, cv2.CV_64F)
    edges = cv2.Canny(small.astype(np.uint8), 50, 150)
    return np.array([
        small.mean() / 255, small.std() / 255, (small > 230).mean(), (small < 20).mean(), entropy / 8,
        corr(0, 1), corr(1, 0), corr(0, 4), corr(4, 0), np.log1p(laplacian.var() / var), (edges > 0).mean(),
    ])


def fit_image_density(train_stats: np.ndarray, val_stats: np.ndarray,
                      quantile: float = DISTANCE_QUANTILE) -> dict[str, Any]:
    """Gaussian over image statistics of the training images; threshold from validation."""
    from sklearn.covariance import LedoitWolf

    mean = train_stats.mean(axis=0)
    covariance = LedoitWolf().fit(train_stats).covariance_
    arrays = {"image_mean": mean.astype(np.float32), "image_precision": np.linalg.inv(covariance).astype(np.float32)}
    threshold = float(np.quantile(image_distances(arrays, val_stats), quantile)) * DISTANCE_MARGIN
    return {"arrays": arrays, "threshold": threshold}


def image_distances(arrays: dict[str, np.ndarray], stats: np.ndarray) -> np.ndarray:
    d = np.atleast_2d(stats) - arrays["image_mean"]
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, arrays["image_precision"].astype(np.float64), d), 0))


def fit_density(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                n_classes: int, dims: int = PCA_DIMS, quantile: float = DISTANCE_QUANTILE) -> dict[str, Any]:
    """Class means and shared precision in a PCA subspace; threshold = a quantile of validation distances."""
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
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    val_distance = distances(arrays, val_features)
    return {"arrays": arrays, "threshold": float(np.quantile(val_distance, quantile)) * DISTANCE_MARGIN,
            "quantile": quantile, "margin": DISTANCE_MARGIN, "dims": dims}


def distances(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Smallest Mahalanobis distance of each feature vector to a class mean."""
    z = (np.asarray(features, dtype=np.float64) - arrays["centre"]) @ arrays["components"]
    best = None
    for mean in arrays["means"]:
        d = z - mean
        squared = np.einsum("ij,jk,ik->i", d, arrays["precision"].astype(np.float64), d)
        best = squared if best is None else np.minimum(best, squared)
    return np.sqrt(np.maximum(best, 0.0))


def save_density(folder: Path, fitted: dict[str, Any], image_fitted: dict[str, Any]) -> dict[str, Any]:
    from safetensors.numpy import save_file

    target = Path(folder) / OOD_FILE
    with atomic_path(target) as tmp:
        save_file({**fitted["arrays"], **image_fitted["arrays"]}, str(tmp))
    return {"file": OOD_FILE, "sha256": sha256_file(target), "threshold": fitted["threshold"],
            "image_threshold": image_fitted["threshold"],
            "quantile": fitted["quantile"], "margin": fitted["margin"], "dims": fitted["dims"], "method": "mahalanobis, shared Ledoit-Wolf covariance, PCA",
            "colour_limit": COLOUR_LIMIT, "min_side": MIN_SIDE, "min_std": MIN_STD}


def load_density(folder: Path, record: dict[str, Any]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = Path(folder) / record["file"]
    if not path.is_file() or sha256_file(path) != record.get("sha256"):
        raise MammaclsError(f"{path} is missing or does not match the sha256 in the model's metadata")
    return load_file(str(path))


def model_density(ref) -> dict[str, np.ndarray] | None:
    """The densities of model ``ref`` (None when it has none), from wherever its file lives:
    beside the weights, or for the read-only shipped model possibly refitted in the cache."""
    record = ref.metadata.get("ood")
    return load_density(ref.file(record["file"]).parent, record) if record else None


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


def image_check(gray: np.ndarray, model_input: np.ndarray, colour: float | None,
                density: dict[str, np.ndarray] | None, record: dict[str, Any] | None) -> str | None:
    """The reason to reject an image before looking at the model's features, or None.

    ``gray`` is the decoded image; ``model_input`` its square resize, on which the
    image statistics were fitted at training time.
    """
    reason = image_reason(gray, colour)
    if reason or density is None or "image_mean" not in density:
        return reason
    distance = float(image_distances(density, image_statistics(model_input))[0])
    if distance > record["image_threshold"]:
        return (f"does not look like the training images (image-statistics distance {distance:.1f} > "
                f"{record['image_threshold']:.1f}): a document, noise, gradient or other non-ultrasound image?")
    return None


def status_of(reason: str | None, distance: float | None, threshold: float | None, confidence: float,
              min_confidence: float | None) -> tuple[str, str | None]:
    if reason:
        return "rejected", reason
    if distance is not None and threshold is not None and distance > threshold:
        return "rejected", f"far from the training images in the model's feature space (distance {distance:.1f} > {threshold:.1f})"
    if min_confidence is not None and confidence < min_confidence:
        return "uncertain", f"top probability {confidence:.2f} below {min_confidence:.2f}"
    return "ok", None
