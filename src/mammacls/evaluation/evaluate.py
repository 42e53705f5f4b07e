"""Evaluate: score models on a held-out set and compare them side by side."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mammacls import CLASSES
from mammacls.data.prepared import is_prepared_dir, load_prepared
from mammacls.errors import MammaclsError, param
from mammacls.inference.images import load_grayscale, resize_square
from mammacls.inference.card import RunGroup
from mammacls.inference.pixels import ImageReadError
from mammacls.evaluation.results import (
    DataSummary, DroppedImage, Evaluation, ModelResult, Overlap, OverlapMatch, SkippedFile,
)
from mammacls.evaluation.scoring import (
    group_summaries, malignant_threshold, score, selective_metrics, source_breakdown,
)
from mammacls.choices import Device
from mammacls.inference.model_files import (ModelRef, ModelSummary, list_cached_models, resolve_model,
                                           seen_fingerprints)


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
    dropped: list[DroppedImage] = field(default_factory=list)  # left out as seen in training (drop_overlap)
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
) -> list[ModelResult]:
    """Score each model; probabilities are temperature-calibrated unless ``calibrated`` is False.

    A model whose training or validation images (identical or near-duplicate)
    are in the evaluation set is refused unless ``allow_overlap`` (the overlap is then reported with
    its results) or ``drop_overlap`` (those images are left out for every model, and listed in
    ``eval_set.dropped``).
    """
    from mammacls.runtime import resolved_device

    device = resolved_device(device)
    overlaps = {ref.name: training_overlap(ref, eval_set) for ref in refs}
    leaking = {name: o for name, o in overlaps.items() if o.checked and o.images}
    if leaking and drop_overlap:  # every model is then scored on the same, unseen images
        dropped = {m.path for o in leaking.values() for m in o.matches}
        if len(dropped) == len(eval_set.paths):
            raise MammaclsError(f"all {len(dropped)} evaluation images overlap the models' training/validation data")
        eval_set.dropped = [DroppedImage(name, m) for name, o in leaking.items() for m in o.matches]
        eval_set.keep([path not in dropped for path in eval_set.paths])
        overlaps = {ref.name: training_overlap(ref, eval_set) for ref in refs}
    elif leaking and not allow_overlap:
        name, o = next(iter(leaking.items()))
        shown = "; ".join(f"{Path(m.path).name} is {'a copy' if m.kind == 'identical' else 'a near-duplicate'} "
                          f"of {m.matches}" for m in o.matches[:3])
        more = f"; and {o.images - 3} more" if o.images > 3 else ""
        raise MammaclsError(
            f"{o.images} of {len(eval_set.paths)} evaluation images overlap the training/validation data of "
            f"model {name}" + (f" and {len(leaking) - 1} more model(s)" if len(leaking) > 1 else "")
            + f" ({o.identical} identical, {o.near_duplicate} near-duplicates): {shown}{more}. These figures would be inflated: pass {param('drop_overlap')} to score the "
              f"other images, or {param('allow_overlap')} to report them all, flagged")
    results = []
    for ref in refs:
        logits, features = _logits_and_features(ref, eval_set.at_size(ref.card.img_size), device, batch_size)
        metrics, probabilities = score(logits, ref.card, eval_set.labels, calibrated, resamples, seed)
        selective, statuses = selective_metrics(ref, eval_set, logits, features, calibrated)
        sources = source_breakdown(eval_set, probabilities, malignant_threshold(ref.card, calibrated), resamples, seed)
        results.append(ModelResult(ref.name, ref.summary(), replace(metrics, selective=selective, sources=sources),
                                   probabilities, statuses, tuple(ref.sidecar("history") or ()), overlaps[ref.name],
                                   ref.card.training.group))
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


def _ensembles(refs, results: list[ModelResult], eval_set: EvalSet, calibrated: bool, resamples: int,
               seed: int) -> list[ModelResult]:
    """One averaged-probability ensemble per cross-validation run whose folds are all here."""
    members: dict[str, list[tuple[ModelRef, ModelResult]]] = {}
    for ref, result in zip(refs, results):
        if result.group is not None and result.group.kind == "cv":
            members.setdefault(result.group.run, []).append((ref, result))
    ensembles = []
    for run, pairs in members.items():
        if len(pairs) < 2:
            continue
        averaged = np.mean([result.probabilities for _, result in pairs], axis=0)
        first = pairs[0][0]
        summary = ModelSummary(f"{run}-ensemble", "ensemble", first.card.arch, first.card.img_size, len(pairs),
                               member_names=tuple(ref.name for ref, _ in pairs))
        metrics, _ = score(np.log(np.clip(averaged, 1e-12, 1)), None, eval_set.labels, calibrated, resamples, seed,
                           probabilities=averaged)
        overlaps = [r.overlap for _, r in pairs]
        overlap = Overlap(all(o.checked for o in overlaps), max(o.images for o in overlaps),
                          max(o.identical for o in overlaps), max(o.near_duplicate for o in overlaps),
                          tuple(sorted({p for o in overlaps for p in o.paths})))
        metrics = replace(metrics, selective=None,  # the folds' densities differ; see each fold
                             sources=source_breakdown(eval_set, averaged, None, resamples, seed))
        ensembles.append(ModelResult(summary.name, summary, metrics, averaged, overlap=overlap,
                                     group=RunGroup("cv-ensemble", run, None, len(pairs))))
    return ensembles


def training_overlap(ref: ModelRef, eval_set: EvalSet) -> Overlap:
    """Which evaluation images the model saw in training or validation: the same pixels, or a near
    duplicate by prepare's rule (perceptual hash and thumbnails agreeing, ``dedup.near_duplicates``);
    for models that recorded no thumbnails, the hash alone. Each hit names the image it matches."""
    from mammacls.data.dedup import (
        PHASH_MAX_DISTANCE, hamming_distances, near_duplicates, phash_from_hex, thumbnail_vector_from_text,
    )

    prints = seen_fingerprints(ref)  # its own train/val images and those of the models it started from
    if not prints["sha256"]:
        return Overlap(False, 0, 0, 0, (), ())
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
        matches.append(OverlapMatch(
            eval_set.paths[i], "identical" if identical[i] else "near-duplicate",
            prints["name"][k] or f"a training image (pixel sha256 {prints['sha256'][k][:12]}…)", int(hamming[i, k]),
            None if correlation is None else round(float(correlation[i, k]), 3)))
    return Overlap(True, len(matches), int(identical.sum()), int(near.sum()), tuple(m.path for m in matches),
                   tuple(matches))


def evaluation_of(results: list[ModelResult], eval_set: EvalSet, calibrated: bool = True) -> Evaluation:
    """The whole evaluation as one typed record (``to_record``: the ``--json`` document)."""
    data = DataSummary(
        description=eval_set.description, n=len(eval_set.paths),
        counts={c: int((eval_set.labels == k).sum()) for k, c in enumerate(CLASSES)},
        classes_absent=tuple(c for k, c in enumerate(CLASSES) if not (eval_set.labels == k).any()),
        sources={name: eval_set.sources.count(name) for name in dict.fromkeys(eval_set.sources)},
        skipped=tuple(SkippedFile(item["path"], item["reason"]) for item in eval_set.skipped),
        dropped_overlap=tuple(eval_set.dropped))
    return Evaluation(data, tuple(results), group_summaries(results), calibrated)
