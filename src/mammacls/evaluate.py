"""Evaluate: score models on a held-out set and compare them side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mammacls import CLASSES
from mammacls.data import is_prepared_dir, load_prepared, scan_dataset
from mammacls.errors import MammaclsError
from mammacls.images import ImageReadError, load_grayscale, resize_square
from mammacls.metrics import compute_metrics
from mammacls.weights import ModelRef, list_cached_models, load_network, resolve_model


@dataclass
class EvalSet:
    description: str
    paths: list[str]
    labels: np.ndarray
    images: list[np.ndarray]
    skipped: list[dict[str, str]] = field(default_factory=list)
    overview_png: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    _resized: dict[int, np.ndarray] = field(default_factory=dict)

    def at_size(self, size: int) -> np.ndarray:
        if size not in self._resized:
            self._resized[size] = np.stack([resize_square(img, size) for img in self.images])
        return self._resized[size]


def load_eval_set(data: Path | None = None, split: str = "test") -> EvalSet:
    """The test split of a prepared dataset (default: the latest), or every image of a BUSI folder."""
    if data is None or is_prepared_dir(data):
        dataset = load_prepared(data)
        rows = dataset.split(split)
        if not rows:
            raise MammaclsError(f"the prepared dataset {dataset.root} has no {split} images")
        overview = dataset.root / "overview.png"
        return EvalSet(
            description=f"{split} split of {dataset.summary.get('source', dataset.root)} "
                        f"(prepared, seed {dataset.summary.get('seed', '?')})",
            paths=[row["path"] for row in rows],
            labels=np.array([CLASSES.index(row["label"]) for row in rows]),
            images=[dataset.load_image(row) for row in rows],
            overview_png=overview if overview.is_file() else None,
            summary=dataset.summary,
        )
    scan = scan_dataset(Path(data))
    images, labels, paths, skipped = [], [], [], list(scan.skipped)
    for record in scan.records:
        try:
            images.append(load_grayscale(record.path))
        except ImageReadError as exc:
            skipped.append({"path": str(record.path), "reason": str(exc)})
            continue
        labels.append(CLASSES.index(record.label))
        paths.append(str(record.path))
    if not images:
        raise MammaclsError(f"no readable images in {data}")
    return EvalSet(f"all images of {Path(data).resolve()}", paths, np.array(labels), images, skipped)


def models_to_evaluate(specs: list[str] | None) -> list[ModelRef]:
    if specs:
        return [resolve_model(spec) for spec in specs]
    cached = list_cached_models()
    if not cached:
        raise MammaclsError("no trained models in the cache: run mammacls train (or pass --model)")
    return cached


def evaluate_models(
    refs: list[ModelRef], eval_set: EvalSet, device: str = "cpu", batch_size: int = 64
) -> list[dict[str, Any]]:
    from mammacls.model import predict_proba, resolve_device

    device = resolve_device(device)
    results = []
    for ref in refs:
        net = load_network(ref, device)
        probabilities = predict_proba(net, eval_set.at_size(int(ref.metadata["img_size"])), device, batch_size)
        results.append({
            "name": ref.name,
            "model": ref.describe(),
            "metrics": compute_metrics(eval_set.labels, probabilities),
            "probabilities": probabilities,
        })
        del net
    return results


def results_json(results: list[dict[str, Any]], eval_set: EvalSet) -> dict[str, Any]:
    return {
        "data": {"description": eval_set.description, "n": len(eval_set.paths),
                 "counts": {c: int((eval_set.labels == k).sum()) for k, c in enumerate(CLASSES)},
                 "skipped": eval_set.skipped},
        "models": [{"name": r["name"], "model": r["model"], "metrics": r["metrics"]} for r in results],
    }
