"""Several runs of one recipe: K-fold cross-validation and seed repeats (under torchrun, one member
per process), and their summary."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mammacls.data.prepared import load_prepared
from mammacls.training.distributed import World, barrier, broadcast, world
from mammacls.errors import MammaclsError, param
from mammacls.inference.card import ModelCard
from mammacls.inference.model_files import CHECKPOINT_FILE, METADATA_FILE, read_card
from mammacls.store import models_dir
from mammacls.training.config import TrainConfig, TrainReporter
from mammacls.training.loop import new_run_name, train_model
from mammacls.training.splits import cv_fold_rows


SUMMARY_KEYS = ("accuracy", "macro_f1", "roc_auc_macro")


def summarise_runs(cards: list[ModelCard]) -> dict[str, Any]:
    """Per-run validation figures and their mean and standard deviation."""
    rows = [{"name": card.name, "best_epoch": card.training.best_epoch,
             **{k: (card.training.val_metrics or {}).get(k) for k in SUMMARY_KEYS}} for card in cards]
    stats = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        stats[key] = {"mean": float(np.mean(values)) if values else None,
                      "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return {"runs": rows, "summary": stats}


def _complete_or_resumable(name: str) -> str:
    folder = models_dir() / name
    if (folder / CHECKPOINT_FILE).is_file():
        return "resume"
    if (folder / METADATA_FILE).is_file():
        if read_card(folder).training.status == "complete":
            return "done"
        raise MammaclsError(f"model folder {folder} holds an unfinished run without a checkpoint; remove it")
    return "new"


def _run_member(config, data_dir, name, reporter, **kwargs) -> ModelCard:
    state = _complete_or_resumable(name)
    if state == "done":
        reporter.message(f"{name} is already trained; skipping it")
        return read_card(models_dir() / name)
    if state == "resume":
        return train_model(config, resume=True, name=name, reporter=reporter, data_parallel=False)
    return train_model(config, data_dir=data_dir, name=name, reporter=reporter, data_parallel=False, **kwargs)


def _run_members(members: list[tuple[str, TrainConfig, dict[str, Any]]], data_dir, reporter,
                 current: World) -> list[ModelCard]:
    """Train every member; under torchrun member i on rank i mod N, each on its own device
    (one fold or seed per GPU), and everyone waits for all before the summary."""
    for index, (name, config, kwargs) in enumerate(members):
        if index % current.size == current.rank:
            _run_member(config, data_dir, name, reporter if current.is_main else TrainReporter(), **kwargs)
    barrier(current)
    return [read_card(models_dir() / name) for name, _, _ in members]


def train_cross_validation(
    config: TrainConfig, *, folds: int, data_dir: Path | None = None, name: str | None = None,
    reporter: TrainReporter | None = None,
) -> dict[str, Any]:
    """K-fold cross-validation over train+val, duplicate groups whole and classes stratified.

    Each fold's model is saved as ``NAME-foldI``; the test split is not touched.
    Running the same command again skips finished folds and resumes an interrupted one.
    """
    reporter = reporter or TrainReporter()
    config.validate()
    if folds < 2:
        raise MammaclsError(f"{param('folds')} must be at least 2")
    current = world(config.device)
    dataset = load_prepared(data_dir)
    run = broadcast(name or new_run_name(f"cv{folds}-{config.arch}"), current)
    members = []
    for fold, split_rows in enumerate(cv_fold_rows(dataset, folds, config.seed), start=1):
        if current.is_main:
            reporter.message(f"fold {fold}/{folds}: {len(split_rows['train'])} train, "
                             f"{len(split_rows['val'])} validation images")
        members.append((f"{run}-fold{fold}", config, {
            "split_rows": split_rows,
            "extra_training": {"group": {"kind": "cv", "run": run, "member": fold, "of": folds}}}))
    metas = _run_members(members, dataset.root, reporter, current)
    return {"run": run, "kind": "cv", **summarise_runs(metas)}


def train_repeats(
    config: TrainConfig, *, repeats: int, data_dir: Path | None = None, name: str | None = None,
    reporter: TrainReporter | None = None,
) -> dict[str, Any]:
    """The same recipe with seeds seed, seed+1, …, to show run-to-run spread."""
    reporter = reporter or TrainReporter()
    config.validate()
    if repeats < 2:
        raise MammaclsError(f"{param('repeats')} must be at least 2")
    current = world(config.device)
    run = broadcast(name or new_run_name(f"rep{repeats}-{config.arch}"), current)
    members = []
    for k in range(repeats):
        seeded = TrainConfig(**{**asdict(config), "seed": config.seed + k})
        members.append((f"{run}-seed{seeded.seed}", seeded, {
            "extra_training": {"group": {"kind": "repeat", "run": run, "member": k + 1, "of": repeats}}}))
    metas = _run_members(members, data_dir, reporter, current)
    return {"run": run, "kind": "repeat", **summarise_runs(metas)}
