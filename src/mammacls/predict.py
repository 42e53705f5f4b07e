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
    backend: str = "auto",
    calibrated: bool = True,
    explain_dir: Path | None = None,
    lesion_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Predict every image under ``paths``; unreadable files are reported, not fatal.

    On the CPU the model's ONNX export runs in ONNX Runtime (torch is not
    imported); ``device='cuda'``, ``explain_dir`` (Grad-CAM needs gradients) or
    a model without an export uses PyTorch.
    """
    from mammacls.metrics import softmax
    from mammacls.runtime import open_backend
    from mammacls.weights import resolve_model

    if batch_size < 1:
        raise MammaclsError("--batch-size must be at least 1")
    paths = list(paths)
    inputs = collect_inputs(paths)
    if not inputs.files:  # checked before the model is opened: a typo answers at once
        missing = [e["path"] for e in inputs.errors]
        raise MammaclsError(f"file not found: {', '.join(missing)}" if missing
                            else f"no images found in {', '.join(str(p) for p in paths)}")
    ref = resolve_model(model)
    explain_dir, lesion_dir = (None if folder is None else Path(folder) for folder in (explain_dir, lesion_dir))
    if lesion_dir is not None and not ref.metadata.get("mask_guided"):
        raise MammaclsError(f"--lesion-map: model {ref.name} was not trained with --mask-guided, "
                            "so it has no lesion decoder")
    for option, folder, why in (("--explain", explain_dir, "gradients"), ("--lesion-map", lesion_dir, "its decoder")):
        if folder is None:
            continue
        if backend == "onnx":
            raise MammaclsError(f"{option} needs PyTorch ({why}); drop --backend onnx")
        if folder.exists() and not folder.is_dir():
            raise MammaclsError(f"{option} {folder} exists and is not a folder")
        backend = "torch"
    for folder in (explain_dir, lesion_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    runner, hint = open_backend(ref, device, backend)
    if hint and notice:
        notice(hint)
    size = int(ref.metadata["img_size"])
    temperature = float(ref.metadata.get("temperature") or 1.0) if calibrated else 1.0

    originals: dict[Path, np.ndarray] = {}  # full-size images, kept only for the explanations

    from mammacls.ood import distances, image_check, model_density, status_of

    ood_record = ref.metadata.get("ood")
    density = model_density(ref)
    min_confidence = ref.metadata.get("min_confidence") if calibrated else None
    reasons: dict[Path, str | None] = {}

    def decode(path: Path):
        stats: dict = {}
        try:
            gray = load_grayscale(path, stats)
        except ImageReadError as exc:
            return path, None, str(exc)
        resized = resize_square(gray, size)
        reasons[path] = image_check(gray, resized, stats.get("colour_fraction"), density, ood_record)
        if explain_dir is not None or lesion_dir is not None:
            originals[path] = gray
        return path, resized, None

    written: set[str] = set()

    predictions: list[dict[str, Any]] = []
    errors = list(inputs.errors)
    done = 0
    if progress:
        progress(0, len(inputs.files))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for item in _prefetched(pool, decode, inputs.files, batch_size):
            batch = [(p, arr) for p, arr, err in item if err is None]
            errors.extend({"path": str(p), "error": err} for p, _, err in item if err is not None)
            if batch:
                stacked = np.stack([a for _, a in batch])
                features = cams = lesion_maps = None
                if explain_dir is not None:
                    logits, cams, features = runner.explain(stacked, ref.metadata["arch"])
                if lesion_dir is not None:  # one pass gives the classes, lesion maps and features
                    logits, lesion_maps, features = runner.lesion_maps(stacked)
                if explain_dir is None and lesion_dir is None:
                    if density is not None:
                        logits, features = runner.logits_and_features(stacked)
                    else:
                        logits = runner.logits(stacked)
                far = distances(density, features) if density is not None and features is not None else None
                probabilities = softmax(logits, temperature)
                for k, ((path, _), probs) in enumerate(zip(batch, probabilities)):
                    label = CLASSES[int(probs.argmax())]
                    status, reason = status_of(reasons.pop(path, None), None if far is None else float(far[k]),
                                               ood_record["threshold"] if ood_record else None,
                                               float(probs.max()), min_confidence)
                    entry = {"path": str(path), "label": label, "status": status, "reason": reason,
                             "probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, probs)}}
                    if far is not None:
                        entry["ood_distance"] = round(float(far[k]), 3)
                    caption = f"{label} {probs.max():.2f}"
                    if cams is not None:
                        entry["explanation"] = str(_write_overlay(
                            explain_dir, path, "gradcam", originals[path], cams[k], caption, written))
                    if lesion_maps is not None:  # a lesion is drawn only where the model sees one
                        if label == "normal":
                            lesion, area, note = np.zeros_like(lesion_maps[k]), None, f"{caption}: no lesion drawn"
                        else:
                            lesion, note = lesion_maps[k], caption
                            area = round(float((lesion >= 0.5).mean()), 4)
                        entry["lesion_area_fraction"] = area
                        entry["lesion_map"] = str(_write_overlay(
                            lesion_dir, path, "lesion", originals[path], lesion, note, written))
                    originals.pop(path, None)
                    predictions.append(entry)
            done += len(item)
            if progress:
                progress(done, len(inputs.files))
    counts = {s: sum(p["status"] == s for p in predictions) for s in ("ok", "uncertain", "rejected")}
    return {"model": {**ref.describe(), "chosen_by": ref.why, "backend": runner.name, "temperature": temperature,
                      "min_confidence": min_confidence,
                      "ood_threshold": ood_record["threshold"] if ood_record else None},
            "status_counts": counts,
            "calibrated": calibrated, "predictions": predictions,
            "errors": errors, "ignored_files": inputs.ignored}


def _prefetched(pool, decode, files: list[Path], batch_size: int):
    """Yield decoded batches while the pool decodes the next one (at most two batches in flight)."""
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    pending = [pool.submit(decode, f) for f in batches[0]] if batches else []
    for index in range(len(batches)):
        upcoming = [pool.submit(decode, f) for f in batches[index + 1]] if index + 1 < len(batches) else []
        yield [future.result() for future in pending]
        pending = upcoming


def _write_overlay(folder: Path, source: Path, kind: str, gray: np.ndarray, heat: np.ndarray, caption: str,
                   written: set[str]) -> Path:
    """Grad-CAM heatmap (kind 'gradcam') or predicted lesion map ('lesion') beside the scan."""
    from mammacls.explain import lesion_overlay_png, overlay_png

    name, k = f"{source.stem}.{kind}.png", 2
    while str(folder / name) in written:  # same file name from two folders
        name, k = f"{source.stem}.{kind}-{k}.png", k + 1
    written.add(str(folder / name))
    write = overlay_png if kind == "gradcam" else lesion_overlay_png
    return write(gray, heat, folder / name, caption)
