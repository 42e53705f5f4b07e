"""Evaluate: score models on a held-out set and compare them side by side."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mammacls import CLASSES
from mammacls.data.prepared import is_prepared_dir, load_prepared
from mammacls.errors import MammaclsError, param
from mammacls.inference.images import load_grayscale, resize_square
from mammacls.inference.pixels import ImageReadError
from mammacls.evaluation.metrics import compute_metrics
from mammacls.choices import Device
from mammacls.inference.card import ModelCard
from mammacls.inference.model_files import (ModelRef, ModelSummary, list_cached_models, resolve_model,
                                           seen_fingerprints)
from mammacls.schemas import EVALUATION


@dataclass
class EvalSet:
    description: str
    paths: list[str]
    labels: np.ndarray
    images: list[np.ndarray]
    skipped: list[dict[str, str]] = field(default_factory=list)
    overview_png: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    sha256: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # each image's source name
    dropped: list[dict[str, Any]] = field(default_factory=list)  # left out as seen in training (drop_overlap)
    kind: str = "test split"  # or "external set": every image of a source that was never prepared
    _resized: dict[int, np.ndarray] = field(default_factory=dict)
    _phashes: np.ndarray | None = None
    _thumbs: np.ndarray | None = None

    def keep(self, mask: list[bool]) -> None:
        """Keep only the images where ``mask`` is True (cached resizes and hashes follow)."""
        keep = np.asarray(mask, dtype=bool)
        pick = np.flatnonzero(keep)
        hashes = self.content_hashes()  # before the images go
        self.paths = [self.paths[k] for k in pick]
        self.images = [self.images[k] for k in pick]
        self.labels = self.labels[keep]
        self.sha256 = [hashes[k] for k in pick]
        self.sources = [self.sources[k] for k in pick] if self.sources else []
        self._resized = {size: array[keep] for size, array in self._resized.items()}
        self._phashes = None if self._phashes is None else self._phashes[keep]
        self._thumbs = None if self._thumbs is None else self._thumbs[keep]

    def phashes(self) -> np.ndarray:
        if self._phashes is None:
            from mammacls.data.dedup import perceptual_hash

            self._phashes = np.stack([perceptual_hash(img) for img in self.images])
        return self._phashes

    def thumbnails(self) -> np.ndarray:
        if self._thumbs is None:  # normalised 32 x 32 thumbnails, the near-duplicate rule's second test
            from mammacls.data.dedup import thumbnail_vector

            self._thumbs = np.stack([thumbnail_vector(img) for img in self.images])
        return self._thumbs

    def content_hashes(self) -> list[str]:
        if not self.sha256:
            from mammacls.data.dedup import pixel_sha256

            self.sha256 = [pixel_sha256(img) for img in self.images]
        return self.sha256

    def at_size(self, size: int) -> np.ndarray:
        if size not in self._resized:
            self._resized[size] = np.stack([resize_square(img, size) for img in self.images])
        return self._resized[size]


def load_eval_set(data: Path | None = None, split: str = "test") -> EvalSet:
    """The test split of a prepared dataset (default: the latest), or every image of a source that
    was never prepared: a BUSI-layout folder, a BUS-BRA folder or a CSV (``path,label[,patient][,mask]``),
    with whatever classes it holds."""
    if data is None or is_prepared_dir(data):
        with contextlib.ExitStack() as hold:  # prepare may not replace it while it is read
            dataset = load_prepared(data, hold, "mammacls evaluate")
            rows = dataset.split(split)
            if not rows:
                raise MammaclsError(f"the prepared dataset {dataset.root} has no {split} images")
            images = [dataset.load_image(row) for row in rows]
        overview = dataset.root / "overview.png"
        return EvalSet(
            description=f"{split} split of {dataset.summary.get('source', dataset.root)} "
                        f"(prepared, seed {dataset.summary.get('seed', '?')})",
            paths=[row["path"] for row in rows],
            labels=np.array([CLASSES.index(row["label"]) for row in rows]),
            images=images,
            overview_png=overview if overview.is_file() else None,
            summary=dataset.summary,
            sha256=[row["sha256"] for row in rows],
            sources=[row["source"] for row in rows],
        )
    from mammacls.data.sources import open_source, scan_source

    scan = scan_source(open_source(data))
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
    return EvalSet(f"all images of {scan.source.path.resolve()} ({scan.source.kind})", paths, np.array(labels),
                   images, skipped, sources=[scan.source.name] * len(paths), kind="external set")


def models_to_evaluate(specs: list[str] | None, allow_unfinished: bool = False,
                       notice=None) -> list[ModelRef]:
    """The models named, or every model in the cache; one whose training did not finish is refused when
    named, and left out (with a ``notice``) when the cache is listed, unless ``allow_unfinished``."""
    from mammacls.inference.model_files import check_finished

    if specs:
        refs = [resolve_model(spec) for spec in specs]
        for ref in refs:
            check_finished(ref, allow_unfinished)
        return refs
    cached = list_cached_models()
    if not allow_unfinished:
        for ref in cached:
            if ref.card.training.status != "complete" and notice is not None:
                notice(f"left out {ref.name}: its training did not finish (--allow-unfinished to score it)")
        cached = [ref for ref in cached if allow_unfinished or ref.card.training.status == "complete"]
    if not cached:
        raise MammaclsError("no trained models in the cache: run mammacls train (or name a model)")
    return cached


def evaluate_models(
    refs: list[ModelRef], eval_set: EvalSet, *, device: str | Device = "cpu", batch_size: int = 64,
    calibrated: bool = True, resamples: int = 1000, seed: int = 0, allow_overlap: bool = False,
    drop_overlap: bool = False,
) -> list[dict[str, Any]]:
    """Score each model; probabilities are temperature-calibrated unless ``calibrated`` is False.

    A model whose training or validation images (identical or near-duplicate)
    are in the evaluation set is refused unless ``allow_overlap`` (the overlap is then reported with
    its results) or ``drop_overlap`` (those images are left out for every model, and listed in
    ``eval_set.dropped``).
    """
    from mammacls.nets.networks import resolve_device

    device = resolve_device(device)
    overlaps = {ref.name: training_overlap(ref, eval_set) for ref in refs}
    leaking = {name: o for name, o in overlaps.items() if o["checked"] and o["images"]}
    if leaking and drop_overlap:  # every model is then scored on the same, unseen images
        dropped = {m["path"] for o in leaking.values() for m in o["matches"]}
        if len(dropped) == len(eval_set.paths):
            raise MammaclsError(f"all {len(dropped)} evaluation images overlap the models' training/validation data")
        eval_set.dropped = [{"model": name, **m} for name, o in leaking.items() for m in o["matches"]]
        eval_set.keep([path not in dropped for path in eval_set.paths])
        overlaps = {ref.name: training_overlap(ref, eval_set) for ref in refs}
    elif leaking and not allow_overlap:
        name, o = next(iter(leaking.items()))
        shown = "; ".join(f"{Path(m['path']).name} is {'a copy' if m['kind'] == 'identical' else 'a near-duplicate'} "
                          f"of {m['matches']}" for m in o["matches"][:3])
        more = f"; and {o['images'] - 3} more" if o["images"] > 3 else ""
        raise MammaclsError(
            f"{o['images']} of {len(eval_set.paths)} evaluation images overlap the training/validation data of "
            f"model {name}" + (f" and {len(leaking) - 1} more model(s)" if len(leaking) > 1 else "")
            + f" ({o['identical']} identical, {o['near_duplicate']} near-duplicates): {shown}{more}. These figures would be inflated: pass {param('drop_overlap')} to score the "
              f"other images, or {param('allow_overlap')} to report them all, flagged")
    results = []
    for ref in refs:
        logits, features = _logits_and_features(ref, eval_set.at_size(ref.card.img_size), device, batch_size)
        result = score(ref.name, ref.describe(), logits, ref.card, eval_set.labels, calibrated, resamples, seed)
        result["metrics"]["selective"], result["statuses"] = selective_metrics(ref, eval_set, logits, features,
                                                                               calibrated)
        result["history"] = ref.sidecar("history") or []
        result["overlap"] = overlaps[ref.name]
        result["group"] = ref.card.training.group
        result["metrics"]["sources"] = source_breakdown(eval_set, result["probabilities"],
                                                        _malignant_threshold(ref.card, calibrated), resamples, seed)
        results.append(result)
    results.extend(_ensembles(refs, results, eval_set, calibrated, resamples, seed))
    return results


def _logits_and_features(ref: ModelRef, images: np.ndarray, device: str, batch_size: int):
    """What predict computes for ``images``, through the same backend: ONNX Runtime on a CPU when the
    model has an export (several times faster than eager PyTorch there), else PyTorch."""
    from mammacls.runtime import open_backend

    exported_features = bool(ref.card.onnx and ref.card.onnx.features)  # older exports lack them
    runner, _ = open_backend(ref, device, "auto" if exported_features else "torch")
    parts = [runner.logits_and_features(images[start:start + batch_size])
             for start in range(0, len(images), batch_size)]
    return (np.concatenate([logits for logits, _ in parts]).astype(np.float64),
            np.concatenate([features for _, features in parts]).astype(np.float64))


def _ensembles(refs, results, eval_set: EvalSet, calibrated: bool, resamples: int, seed: int) -> list[dict]:
    """One averaged-probability ensemble per cross-validation run whose folds are all here."""
    members: dict[str, list[tuple[ModelRef, dict]]] = {}
    for ref, result in zip(refs, results):
        group = ref.card.training.group or {}
        if group.get("kind") == "cv":
            members.setdefault(group["run"], []).append((ref, result))
    ensembles = []
    for run, pairs in members.items():
        if len(pairs) < 2:
            continue
        averaged = np.mean([result["probabilities"] for _, result in pairs], axis=0)
        first = pairs[0][0]
        description = ModelSummary(f"{run}-ensemble", "ensemble", first.card.arch, first.card.img_size, len(pairs),
                                   member_names=tuple(ref.name for ref, _ in pairs)).to_record()
        entry = score(f"{run}-ensemble", description, np.log(np.clip(averaged, 1e-12, 1)), None, eval_set.labels,
                      calibrated, resamples, seed, probabilities=averaged)
        overlaps = [r["overlap"] for _, r in pairs]
        entry["overlap"] = {"checked": all(o["checked"] for o in overlaps),
                            **{k: max(o[k] for o in overlaps) for k in ("images", "identical", "near_duplicate")},
                            "paths": sorted({p for o in overlaps for p in o["paths"]})}
        entry["group"] = {"kind": "cv-ensemble", "run": run, "member": None, "of": len(pairs)}
        entry["metrics"]["selective"] = None  # the folds' densities differ; see each fold
        entry["metrics"]["sources"] = source_breakdown(eval_set, averaged, None, resamples, seed)
        ensembles.append(entry)
    return ensembles


ALL_SOURCES = "all sources"


def source_breakdown(eval_set: EvalSet, probabilities: np.ndarray, val_threshold: float | None,
                     resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """Figures per source (only the classes each holds), and for all of them together when several.

    Empty for one source that holds every class: the whole-set figures are that source's.
    """
    from mammacls.evaluation.metrics import subset_metrics

    names = list(dict.fromkeys(eval_set.sources)) or ["data"]
    if len(names) == 1 and len(np.unique(eval_set.labels)) == len(CLASSES):
        return {}
    sources = np.array(eval_set.sources or ["data"] * len(eval_set.paths))
    masks = {name: sources == name for name in names}
    if len(names) > 1:
        masks[ALL_SOURCES] = np.ones(len(sources), dtype=bool)
    return {name: subset_metrics(eval_set.labels[mask], probabilities[mask], val_threshold, resamples, seed)
            for name, mask in masks.items()}


def group_summaries(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation and test figures of each cross-validation or repeat run: per member, mean and std."""
    groups: dict[str, list[dict]] = {}
    for result in results:
        group = result.get("group") or {}
        if group.get("kind") in ("cv", "repeat"):
            groups.setdefault(group["run"], []).append(result)
    summaries = []
    for run, members in groups.items():
        rows = []
        for r in sorted(members, key=lambda r: r["group"]["member"]):
            val = r["model"].get("val_metrics") or {}
            rows.append({"name": r["name"], "member": r["group"]["member"],
                         **{f"val_{k}": val.get(k) for k in ("accuracy", "macro_f1", "roc_auc_macro")},
                         **{f"test_{k}": r["metrics"][k] for k in ("accuracy", "macro_f1", "roc_auc_macro")}})
        stats = {}
        for key in rows[0]:
            if key.startswith(("val_", "test_")):
                values = [row[key] for row in rows if row[key] is not None]
                stats[key] = {"mean": float(np.mean(values)) if values else None,
                              "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
        summaries.append({"run": run, "kind": members[0]["group"]["kind"], "members": rows, "summary": stats})
    return summaries


def selective_metrics(ref: ModelRef, eval_set: EvalSet, logits: np.ndarray, features: np.ndarray,
                      calibrated: bool) -> tuple[dict[str, Any], list[str]]:
    """Accuracy on the images predict would accept, and how many it would accept (coverage), decided by
    predict's own ``Predictor`` on the logits and features already computed; and each image's status.

    The colour check needs the original file, so it is not applied here; the
    size, blank-frame, image-statistics, feature-distance and confidence checks are.
    """
    from mammacls.inference.predictor import Predictor

    predictor = Predictor(ref, None, calibrated=calibrated)  # no backend: the network has run already
    record = predictor.ood_record
    min_confidence = predictor.min_confidence
    resized = eval_set.at_size(predictor.img_size)
    frames = [predictor.frame(img, None, path, resized=resized[i])
              for i, (img, path) in enumerate(zip(eval_set.images, eval_set.paths))]
    answers = predictor.classify(frames, outputs=(logits, features))
    statuses = np.array([answer.status for answer in answers])
    correct = np.array([CLASSES.index(answer.label) for answer in answers]) == eval_set.labels
    accepted = statuses != "rejected"
    confident = statuses == "ok"
    sources = np.array(eval_set.sources or ["data"] * len(statuses))
    rejected = [{"path": eval_set.paths[i], "reason": answers[i].reason} for i in np.flatnonzero(~accepted)]
    return {
        "coverage_by_source": {name: float(accepted[sources == name].mean()) for name in dict.fromkeys(sources)},
        "checked": bool(record),
        "coverage": float(accepted.mean()), "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else None,
        "coverage_ok": float(confident.mean()), "accuracy_ok": float(correct[confident].mean()) if confident.any() else None,
        "rejected": int((~accepted).sum()), "uncertain": int((statuses == "uncertain").sum()),
        "min_confidence": min_confidence, "ood_threshold": record.threshold if record else None,
        "rejected_images": rejected,
    }, statuses.tolist()


def training_overlap(ref: ModelRef, eval_set: EvalSet) -> dict[str, Any]:
    """Which evaluation images the model saw in training or validation: the same pixels, or a near
    duplicate by prepare's rule (perceptual hash and thumbnails agreeing, ``dedup.near_duplicates``);
    for models that recorded no thumbnails, the hash alone. Each hit names the image it matches."""
    from mammacls.data.dedup import (
        PHASH_MAX_DISTANCE, hamming_distances, near_duplicates, phash_from_hex, thumbnail_vector_from_text,
    )

    prints = seen_fingerprints(ref)  # its own train/val images and those of the models it started from
    if not prints["sha256"]:
        return {"checked": False, "images": 0, "identical": 0, "near_duplicate": 0, "paths": [], "matches": []}
    seen = {sha: k for k, sha in enumerate(prints["sha256"])}
    identical = np.array([h in seen for h in eval_set.content_hashes()])
    hamming = hamming_distances(eval_set.phashes(), np.stack([phash_from_hex(h) for h in prints["phash"]]))
    if all(t is not None for t in prints["thumb"]):
        thumbs = np.stack([thumbnail_vector_from_text(t) for t in prints["thumb"]])
        correlation = eval_set.thumbnails() @ thumbs.T
        close = near_duplicates(hamming, correlation)
    else:  # fingerprints of an older mammacls: the hash alone, as it was
        correlation, close = None, hamming <= PHASH_MAX_DISTANCE
    near = close.any(axis=1) & ~identical
    matches = []
    for i in np.flatnonzero(identical | near):
        k = seen[eval_set.sha256[i]] if identical[i] else int(np.argmax(np.where(close[i], 100 - hamming[i], -1)))
        match = {"path": eval_set.paths[i], "kind": "identical" if identical[i] else "near-duplicate",
                 "matches": prints["name"][k] or f"a training image (pixel sha256 {prints['sha256'][k][:12]}…)",
                 "phash_distance": int(hamming[i, k])}
        if correlation is not None:
            match["thumbnail_correlation"] = round(float(correlation[i, k]), 3)
        matches.append(match)
    return {"checked": True, "images": len(matches), "identical": int(identical.sum()),
            "near_duplicate": int(near.sum()), "paths": [m["path"] for m in matches], "matches": matches}


def _malignant_threshold(card: ModelCard | None, calibrated: bool) -> float | None:
    return card.calibration.malignant_threshold(calibrated) if card and card.calibration else None


def score(name: str, description: dict[str, Any], logits: np.ndarray, card: ModelCard | None,
          labels: np.ndarray, calibrated: bool, resamples: int, seed: int,
          probabilities: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics with bootstrap intervals, malignant operating points and calibration figures
    (``card`` None: averaged probabilities, nothing calibrated)."""
    from mammacls.inference.probabilities import softmax
    from mammacls.evaluation.metrics import bootstrap_ci, calibration_metrics, malignant_metrics, reliability_bins

    temperature = card.temperature if card else 1.0
    raw = softmax(logits) if probabilities is None else probabilities
    tuned = softmax(logits, temperature) if probabilities is None else probabilities
    chosen = tuned if calibrated else raw
    threshold = _malignant_threshold(card, calibrated)
    metrics = compute_metrics(labels, chosen)
    metrics["malignant"] = malignant_metrics(labels, chosen, threshold)
    ci = bootstrap_ci(labels, chosen, threshold, resamples=resamples, seed=seed)
    metrics["ci95"] = {k: v for k, v in ci.items() if "_" not in k or k in ("macro_f1", "roc_auc_macro")}
    for c in CLASSES:
        metrics["per_class"][c]["recall_ci95"] = ci.get(f"recall_{c}")
        metrics["per_class"][c]["precision_ci95"] = ci.get(f"precision_{c}")
    for key in ("sensitivity", "specificity"):
        metrics["malignant"][f"{key}_ci95"] = ci.get(f"malignant_{key}")
    if threshold is not None:
        metrics["malignant"]["sensitivity_at_spec90_ci95"] = ci.get("malignant_sensitivity_at_spec90")
    metrics["calibration"] = {
        "temperature": temperature, "applied": calibrated and probabilities is None,
        "before": calibration_metrics(labels, raw), "after": calibration_metrics(labels, tuned),
        "bins_before": reliability_bins(labels, raw), "bins_after": reliability_bins(labels, tuned),
    }
    metrics["bootstrap"] = {"resamples": resamples, "seed": seed, "stratified": True, "level": 0.95}
    return {"name": name, "model": description, "metrics": metrics, "probabilities": chosen}


def results_json(results: list[dict[str, Any]], eval_set: EvalSet, calibrated: bool = True) -> dict[str, Any]:
    return {
        "schema": EVALUATION, "data": {"description": eval_set.description, "n": len(eval_set.paths),
                 "counts": {c: int((eval_set.labels == k).sum()) for k, c in enumerate(CLASSES)},
                 "classes_absent": [c for k, c in enumerate(CLASSES) if not (eval_set.labels == k).any()],
                 "sources": {name: eval_set.sources.count(name) for name in dict.fromkeys(eval_set.sources)},
                 "skipped": eval_set.skipped, "dropped_overlap": eval_set.dropped},
        "models": [{"name": r["name"], "model": r["model"], "metrics": r["metrics"],
                    "overlap": r.get("overlap"), "group": r.get("group")} for r in results],
        "groups": group_summaries(results), "calibrated": calibrated,
    }
