"""The refusal gate at prediction time: image checks, feature-space distances, statuses.

Every prediction gets a status: ``ok``; ``uncertain`` when the calibrated top
probability is below the model's ``min_confidence`` (chosen on validation);
or ``rejected`` with a reason: a blank or tiny frame, a strongly coloured image
(photo, colour Doppler), an image whose simple statistics (brightness, speckle
correlation, edges) are far from the training images', or penultimate features
far from every class of the training set (class-conditional Gaussians with a
shared covariance in a PCA subspace: Lee et al. 2018's Mahalanobis score). An
ensemble has one density per member and an image's score is the median of the
members' distance / threshold. numpy only; the densities are fitted by
``mammacls.training.refusal`` at the end of training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mammacls.errors import MammaclsError
from mammacls.inference.card import OodDensity
from mammacls.store import sha256_file

OOD_FILE = "ood.safetensors"
MIN_SIDE = 64  # BUSI's smallest side is 190 px
MIN_STD = 2.0  # gray levels: below this the frame is blank
COLOUR_LIMIT = 0.05  # BUSI's most coloured image (Doppler markers) has 0.9 % coloured pixels


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
    high-frequency energy and edge density; then (added in format 2, so models fitted on the
    first eleven keep working) the median local contrast of 8 x 8 blocks (speckle's signature),
    histogram skewness and kurtosis, and vertical vs horizontal gradient energy (tissue layers
    run across the frame). All on a 128 x 128 copy.
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
    blocks = small.reshape(16, 8, 16, 8).swapaxes(1, 2).reshape(256, 64)
    block_mean, block_std = blocks.mean(axis=1), blocks.std(axis=1)
    lit = block_mean > 20  # speckle lives in tissue, not in the black surround
    local_contrast = float(np.median(block_std[lit] / block_mean[lit])) if lit.sum() > 5 else 0.0
    z = centred / np.sqrt(var)
    z2 = z * z  # z ** 3 and z ** 4 through pow() cost 1.2 ms each here, the products 0.02 ms
    vertical, horizontal = np.abs(np.diff(small, axis=0)).mean(), np.abs(np.diff(small, axis=1)).mean()
    return np.array([
        small.mean() / 255, small.std() / 255, (small > 230).mean(), (small < 20).mean(), entropy / 8,
        corr(0, 1), corr(1, 0), corr(0, 4), corr(4, 0), np.log1p(laplacian.var() / var), (edges > 0).mean(),
        local_contrast, float((z2 * z).mean()) / 5, float(np.log((z2 * z2).mean() + 1e-6)),
        float(np.log((vertical + 1e-3) / (horizontal + 1e-3))),
    ])


def image_distances(arrays: dict[str, np.ndarray], stats: np.ndarray) -> np.ndarray:
    stats = np.atleast_2d(stats)[:, : len(arrays["image_mean"])]  # models fitted on fewer statistics
    d = stats - arrays["image_mean"]
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, arrays["image_precision"].astype(np.float64), d), 0))


def mahalanobis(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Smallest Mahalanobis distance of each feature vector to a class mean."""
    z = (np.asarray(features, dtype=np.float64) - arrays["centre"]) @ arrays["components"]
    best = None
    for mean in arrays["means"]:
        d = z - mean
        squared = np.einsum("ij,jk,ik->i", d, arrays["precision"].astype(np.float64), d)
        best = squared if best is None else np.minimum(best, squared)
    return np.sqrt(np.maximum(best, 0.0))


def distances(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Each image's out-of-distribution score: the median over member networks of distance /
    threshold (reject above 1.0); for models of earlier versions (one density, no per-member
    thresholds) the plain distance, compared with the record's threshold."""
    if "member_thresholds" not in arrays:
        return mahalanobis(arrays, features)
    thresholds = arrays["member_thresholds"].astype(np.float64)
    width = np.shape(features)[1] // len(thresholds)
    ratios = [mahalanobis({name[len(f"member{k}."):]: value for name, value in arrays.items()
                            if name.startswith(f"member{k}.")}, np.asarray(features)[:, k * width:(k + 1) * width])
              / threshold for k, threshold in enumerate(thresholds)]
    return np.median(np.stack(ratios), axis=0)


def load_density(folder: Path, record: OodDensity) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = Path(folder) / record.file
    if not path.is_file() or sha256_file(path) != record.sha256:
        raise MammaclsError(f"{path} is missing or does not match the sha256 in the model's metadata")
    return load_file(str(path))


def model_density(ref) -> dict[str, np.ndarray] | None:
    """The densities of model ``ref`` (None when it has none), from wherever its file lives:
    beside the weights, or for the read-only shipped model possibly refitted in the cache."""
    record = ref.card.refusal.ood
    return load_density(ref.file(record.file).parent, record) if record else None


def image_check(gray: np.ndarray, model_input: np.ndarray, colour: float | None,
                density: dict[str, np.ndarray] | None, record: OodDensity | None) -> str | None:
    """The reason to reject an image before looking at the model's features, or None.

    ``gray`` is the decoded image; ``model_input`` its square resize, on which the
    image statistics were fitted at training time.
    """
    reason = image_reason(gray, colour)
    if reason or density is None or "image_mean" not in density:
        return reason
    distance = float(image_distances(density, image_statistics(model_input))[0])
    if distance > record.image_threshold:
        return (f"its image statistics (brightness, contrast, speckle, edges) are far from the training "
                f"images' (distance {distance:.1f} > {record.image_threshold:.1f}): a scanner or setting the "
                "model does not know, or not a B-mode ultrasound image")
    return None


def status_of(reason: str | None, distance: float | None, threshold: float | None, confidence: float,
              min_confidence: float | None) -> tuple[str, str | None]:
    if reason:
        return "rejected", reason
    if distance is not None and threshold is not None and distance > threshold:
        return "rejected", (f"far from the training images in the model's feature space "
                            f"(score {distance:.2f} > {threshold:.2f})")
    if min_confidence is not None and confidence < min_confidence:
        shown, floor = _distinct(confidence, min_confidence)
        return "uncertain", f"top probability {shown} below the model's confidence floor {floor}"
    return "ok", None


def _distinct(low: float, high: float) -> tuple[str, str]:
    """``low`` and ``high`` with as many decimals as it takes to tell them apart (2 to 6; rounding keeps
    their order, so the first shown below is below)."""
    for digits in range(2, 7):
        shown, floor = f"{low:.{digits}f}", f"{high:.{digits}f}"
        if shown != floor:
            return shown, floor
    return f"{low:.6f}", f"{high:.6f}"
