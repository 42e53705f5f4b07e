"""Figures, drawn with matplotlib's object API (no pyplot global state)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np

from mammacls import CLASSES

SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_png_bytes(figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def dataset_overview_figure(records: Sequence, counts: dict, load: Callable, samples_per_class: int = 4):
    """Sample images of each class, plus the class x split distribution."""
    figure = _figure(2.2 * samples_per_class + 4.5, 2.2 * len(CLASSES))
    grid = figure.add_gridspec(len(CLASSES), samples_per_class + 2)
    rng = np.random.default_rng(0)
    for row, label in enumerate(CLASSES):
        of_class = [r for r in records if r.label == label]
        picks = rng.choice(len(of_class), size=min(samples_per_class, len(of_class)), replace=False) if of_class else []
        for col in range(samples_per_class):
            ax = figure.add_subplot(grid[row, col])
            ax.set_axis_off()
            if col < len(picks):
                ax.imshow(load(of_class[picks[col]]), cmap="gray", vmin=0, vmax=255)
            if col == 0:
                ax.set_title(f"{label} ({len(of_class)})", loc="left", fontsize=10)
    ax = figure.add_subplot(grid[:, samples_per_class:])
    x = np.arange(len(CLASSES))
    bottom = np.zeros(len(CLASSES))
    for split, colour in SPLIT_COLOURS.items():
        values = np.array([counts[c][split] for c in CLASSES])
        ax.bar(x, values, bottom=bottom, color=colour, label=split)
        bottom += values
    for xi, total in zip(x, bottom):
        ax.text(xi, total, f"{int(total)}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, CLASSES)
    ax.set_ylabel("images")
    ax.set_title("class distribution by split")
    ax.legend(frameon=False)
    return figure


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], title: str):
    """Counts and row-normalised percentages side by side."""
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    figure = _figure(9, 4)
    for ax, data, fmt, name in (
        (figure.add_subplot(1, 2, 1), counts, "{:.0f}", "counts"),
        (figure.add_subplot(1, 2, 2), normalised, "{:.0%}", "row-normalised (recall)"),
    ):
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(CLASSES)):
            for j in range(len(CLASSES)):
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center",
                        color="white" if normalised[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(CLASSES)), CLASSES)
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=10)
    figure.suptitle(title)
    return figure


def _one_vs_rest(y_true: np.ndarray, probabilities: np.ndarray):
    """(class, is-that-class mask, its probability) for each class with positives and negatives."""
    for k, label in enumerate(CLASSES):
        positives = y_true == k
        if positives.any() and not positives.all():
            yield label, positives, probabilities[:, k]


def roc_figure(y_true: np.ndarray, probabilities: np.ndarray, title: str):
    """One-vs-rest ROC curve of each class, with its AUC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = _figure(5, 4.5)
    ax = figure.add_subplot()
    for label, positives, scores in _one_vs_rest(y_true, probabilities):
        fpr, tpr, _ = roc_curve(positives, scores)
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(positives, scores):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", frameon=False)
    return figure


def precision_recall_figure(y_true: np.ndarray, probabilities: np.ndarray, title: str):
    """One-vs-rest precision-recall curve of each class, with its average precision."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    figure = _figure(5, 4.5)
    ax = figure.add_subplot()
    for label, positives, scores in _one_vs_rest(y_true, probabilities):
        precision, recall, _ = precision_recall_curve(positives, scores)
        ap = average_precision_score(positives, scores)
        ax.plot(recall, precision, label=f"{label} (AP {ap:.3f}, prevalence {positives.mean():.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left", frameon=False, fontsize=8)
    return figure


def reliability_figure(bins_before, bins_after, ece_before: float, ece_after: float, title: str):
    """Accuracy against confidence per bin, before and after temperature scaling."""
    figure = _figure(5, 4.5)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    for bins, name, ece, marker in ((bins_before, "raw", ece_before, "o"), (bins_after, "calibrated", ece_after, "s")):
        used = [b for b in bins if b.count]  # evaluation.results.ReliabilityBin
        ax.plot([b.confidence for b in used], [b.accuracy for b in used], marker=marker,
                label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", frameon=False)
    return figure


def training_curves_figure(history: list[dict], title: str):
    """Loss (train, validation) and validation figures per epoch, from a model's ``history.json``."""
    figure = _figure(9, 3.6)
    epochs = [row["epoch"] for row in history]
    losses, scores = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for ax, keys in ((losses, ("train_loss", "val_loss")),
                     (scores, ("val_accuracy", "val_macro_f1", "val_roc_auc_macro", "val_lesion_dice"))):
        for key in keys:
            points = [(e, row[key]) for e, row in zip(epochs, history) if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.legend(frameon=False, fontsize=8)
    losses.set_title("loss", fontsize=10)
    scores.set_title("validation", fontsize=10)
    scores.set_ylim(0, 1)
    figure.suptitle(title)
    return figure


def thumbnail_png(gray: np.ndarray, height: int = 96) -> bytes:
    """A small PNG of a grayscale image (for galleries in the report)."""
    import io

    from PIL import Image

    img = Image.fromarray(gray)
    width = max(1, round(img.width * height / img.height))
    buffer = io.BytesIO()
    img.resize((width, height), Image.Resampling.BILINEAR).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
