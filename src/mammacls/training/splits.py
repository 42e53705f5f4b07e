"""Which images a run trains and selects on: the prepared split or a cross-validation fold, and
the dataset a saved model was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mammacls.errors import MammaclsError, param
from mammacls.inference.card import ModelCard
from mammacls.data.prepared import ManifestRow, PreparedDataset, load_prepared


def rows_for(dataset: PreparedDataset, split_rows: dict[str, list[str]] | None):
    """Train and val rows: the prepared split, or explicit paths (one cross-validation fold)."""
    if split_rows is None:
        train_rows, val_rows = dataset.split("train"), dataset.split("val")
    else:
        by_path = {row["path"]: row for row in dataset.rows}
        train_rows = [by_path[p] for p in split_rows["train"]]
        val_rows = [by_path[p] for p in split_rows["val"]]
    for name, rows in (("train", train_rows), ("val", val_rows)):
        if not rows:
            raise MammaclsError(f"the prepared dataset has no {name} images; run mammacls prepare again")
    return train_rows, val_rows


def cv_fold_rows(dataset: PreparedDataset, folds: int, seed: int) -> list[dict[str, list[str]]]:
    """Train/val image paths of each fold of train+val (StratifiedGroupKFold; test untouched)."""
    from sklearn.model_selection import StratifiedGroupKFold

    rows = dataset.split("train") + dataset.split("val")
    several = len({row.get("source") for row in rows}) > 1  # then stratify by source and class
    labels = [f"{row['source']}/{row['label']}" if several else row["label"] for row in rows]
    groups = [row["group_id"] for row in rows]
    if len(set(groups)) < folds:
        raise MammaclsError(f"{param('folds')} {folds}: only {len(set(groups))} duplicate groups to share out")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [{"train": [rows[i]["path"] for i in train_idx], "val": [rows[i]["path"] for i in val_idx]}
            for train_idx, val_idx in splitter.split(np.zeros(len(rows)), labels, groups)]


def model_rows(dataset: PreparedDataset, card: ModelCard):
    """The train and val rows a model was trained and selected on: its cross-validation fold's, or
    the prepared split."""
    group = card.training.group
    split_rows = (cv_fold_rows(dataset, group.of, card.training.config["seed"])[group.member - 1]
                  if group is not None and group.kind == "cv" else None)
    return rows_for(dataset, split_rows)


def training_dataset(ref) -> PreparedDataset:
    """The prepared dataset ``ref`` was trained on: its own folder if still there, else the latest,
    accepted when its train+val images are the model's (pixel hashes; paths may differ)."""
    training_data = ref.sidecar("training_data") or {}
    prepared = training_data.get("prepared_dir")  # where it was on the machine that trained it
    try:
        dataset = load_prepared(Path(prepared) if prepared and Path(prepared).is_dir() else None)
    except MammaclsError:
        raise MammaclsError(f"the prepared dataset {ref.name} was trained on is not here; "
                            "run mammacls prepare") from None
    known = sorted((training_data.get("train_val_fingerprints") or {}).get("sha256") or [])
    here = sorted(row["sha256"] for row in dataset.split("train") + dataset.split("val"))
    same = (here == known if known
            else dataset.manifest_sha256 == ref.card.provenance.data.get("manifest_sha256"))
    if not same:
        raise MammaclsError(f"the prepared dataset at {dataset.root} does not hold the train/validation images "
                            f"{ref.name} was trained on (prepare the same sources with the same --seed)")
    return dataset


def data_summary(dataset: PreparedDataset, train_rows: list[ManifestRow],
                 val_rows: list[ManifestRow]) -> dict[str, Any]:
    """A model card's ``provenance.data``: which prepared dataset, how many images per source and class."""
    return {"manifest_sha256": dataset.manifest_sha256, "train_images": len(train_rows),
            "val_images": len(val_rows), "sources": source_counts(train_rows, val_rows)}


def training_data_record(train_rows: list[ManifestRow], val_rows: list[ManifestRow],
                         fingerprints: dict[str, list]) -> dict[str, Any]:
    """The ``training_data`` sidecar: which duplicate groups and pixels the model trained and was selected
    on (evaluate's overlap guard, calibrate's dataset check)."""
    return {"train_val_groups": sorted({row["group_id"] for row in train_rows + val_rows}),
            "train_val_fingerprints": fingerprints}


def source_counts(train_rows: list[ManifestRow], val_rows: list[ManifestRow]) -> dict[str, dict]:
    """Images per source and class in train and val (a source may lack a class: BUS-BRA has no normal)."""
    counts: dict[str, dict] = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        for row in rows:
            per_class = counts.setdefault(row["source"], {"train": {}, "val": {}})[split]
            per_class[row["label"]] = per_class.get(row["label"], 0) + 1
    return counts
