"""A prepared dataset read back: its manifest (one row per image: path, label, split, group,
source, patient, cached pixels), its summary, and the lock that keeps ``prepare`` from replacing it
while it is read."""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

from mammacls import CLASSES
from mammacls.errors import MammaclsError
from mammacls.inference.images import load_grayscale
from mammacls.store import cache_lock, sha256_file

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
SUMMARY_NAME = "summary.json"


class ManifestRow(TypedDict):
    """One image of a prepared dataset: a line of ``manifest.csv``, in its column order. Every value is
    the CSV's string (width and height too); read back, paths are absolute and ``source``/``patient``
    are filled in for manifests of earlier versions."""

    path: str
    label: str
    split: str
    group_id: str
    sha256: str  # of the decoded pixels
    file_sha256: str
    width: str
    height: str
    mask_paths: str  # ";"-separated
    cache_file: str  # the decoded pixels, relative to the dataset folder
    mask_file: str  # the bit-packed mask union, or ""
    source: str
    patient: str


MANIFEST_COLUMNS = tuple(ManifestRow.__annotations__)


def dataset_lock_key(prepared_dir: Path) -> str:
    return f"dataset-{Path(prepared_dir).resolve().name}"


@dataclass
class PreparedDataset:
    root: Path
    rows: list[ManifestRow]
    summary: dict
    manifest_sha256: str

    def split(self, name: str) -> list[ManifestRow]:
        return [row for row in self.rows if row["split"] == name]

    def source_names(self) -> list[str]:
        """The sources in manifest order."""
        return list(dict.fromkeys(row["source"] for row in self.rows))

    def load_image(self, row: ManifestRow) -> np.ndarray:
        cached = self.root / row["cache_file"]
        if cached.is_file():
            return np.load(cached, allow_pickle=False)
        return load_grayscale(Path(row["path"]))

    def load_mask(self, row: ManifestRow) -> np.ndarray:
        shape = (int(row["height"]), int(row["width"]))
        if not row.get("mask_file"):
            return np.zeros(shape, dtype=np.uint8)
        packed = np.load(self.root / row["mask_file"], allow_pickle=False)
        return np.unpackbits(packed)[: shape[0] * shape[1]].reshape(shape)


def is_prepared_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def load_prepared(path: Path | None = None, hold: contextlib.ExitStack | None = None,
                  reader: str = "mammacls") -> PreparedDataset:
    """Open a prepared dataset (default: the one ``prepare`` wrote last).

    With ``hold``, a shared lock on the dataset is taken first and kept until ``hold`` closes, so
    ``prepare`` cannot replace it meanwhile (and a dataset being prepared is refused in one line).
    """
    if path is None:
        from mammacls.store import latest_dataset

        path = latest_dataset()
        if path is None or not is_prepared_dir(path):
            raise MammaclsError("no prepared dataset yet: run mammacls prepare SOURCE first")
    path = Path(path)
    if hold is not None:
        hold.enter_context(cache_lock(dataset_lock_key(path), reader, exclusive=False))
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        raise MammaclsError(f"{path} is not a prepared dataset (no {MANIFEST_NAME}); run mammacls prepare on it")
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"path", "label", "split"} - set(reader.fieldnames or ())
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MammaclsError(f"cannot read {manifest}: {exc}") from None
    if missing:
        raise MammaclsError(f"{manifest} lacks the columns {', '.join(sorted(missing))}")
    summary = {}
    if (path / SUMMARY_NAME).is_file():
        import json

        summary = json.loads((path / SUMMARY_NAME).read_text(encoding="utf-8"))
    # manifests of earlier versions hold one source, absolute paths and no patients
    fallback_source = Path(str(summary.get("source") or path)).name
    roots = {name: Path(root) for name, root in (summary.get("source_roots") or {}).items()}
    for row in rows:
        if row["label"] not in CLASSES or row["split"] not in SPLITS:
            raise MammaclsError(f"{manifest}: bad label/split in row for {row['path']}")
        row["source"] = row.get("source") or fallback_source
        row.setdefault("patient", "")
        root = roots.get(row["source"], Path("/"))  # paths are relative to their source's root
        row["path"] = str(root / row["path"])
        row["mask_paths"] = ";".join(str(root / m) for m in (row.get("mask_paths") or "").split(";") if m)
    return PreparedDataset(path, rows, summary, sha256_file(manifest))
