"""Predict: classify image files with a trained (or the shipped) model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mammacls import CLASSES
from mammacls.errors import MammaclsError
from mammacls.images import ImageReadError, is_image_name, is_mask_name, load_grayscale, resize_square


@dataclass
class Inputs:
    files: list[Path] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    ignored: int = 0  # non-image files and BUSI masks met while walking folders


def collect_inputs(paths: Iterable[Path]) -> Inputs:
    """Expand files and folders (recursively, not following links into loops)."""
    found = Inputs()
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.files.append(path)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):  # followlinks=False
                dirnames.sort()
                for name in sorted(filenames):
                    candidate = Path(dirpath) / name
                    if is_image_name(candidate) and not is_mask_name(candidate):
                        add(candidate)
                    else:
                        found.ignored += 1
        elif path.exists():
            add(path)
        else:
            found.errors.append({"path": str(path), "error": "file not found"})
    return found


def predict_paths(
    paths: Iterable[Path],
    model: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Predict every image under ``paths``; unreadable files are reported, not fatal."""
    from mammacls.model import predict_proba, resolve_device
    from mammacls.weights import load_network, resolve_model

    if batch_size < 1:
        raise MammaclsError("--batch-size must be at least 1")
    inputs = collect_inputs(paths)
    ref = resolve_model(model)
    device = resolve_device(device)
    net = load_network(ref, device)
    size = int(ref.metadata["img_size"])
    temperature = float(ref.metadata.get("temperature") or 1.0)

    def decode(path: Path):
        try:
            return path, resize_square(load_grayscale(path), size), None
        except ImageReadError as exc:
            return path, None, str(exc)

    predictions: list[dict[str, Any]] = []
    errors = list(inputs.errors)
    done = 0
    # Decoding runs in threads (PIL and OpenCV release the GIL) ahead of inference.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        decoded = pool.map(decode, inputs.files)
        batch: list[tuple[Path, np.ndarray]] = []
        for item in _chunks(decoded, batch_size):
            batch = [(p, arr) for p, arr, err in item if err is None]
            errors.extend({"path": str(p), "error": err} for p, _, err in item if err is not None)
            if batch:
                probabilities = predict_proba(net, np.stack([a for _, a in batch]), device, batch_size, temperature)
                for (path, _), probs in zip(batch, probabilities):
                    predictions.append({
                        "path": str(path), "label": CLASSES[int(probs.argmax())],
                        "probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, probs)},
                    })
            done += len(item)
            if progress:
                progress(done, len(inputs.files))
    return {"model": ref.describe(), "predictions": predictions, "errors": errors,
            "ignored_files": inputs.ignored}


def _chunks(items: Iterable, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
