"""Sources: where labelled images come from, read into one list of records.

Three kinds of source are recognised from their own files:

- ``busi``: a folder with ``benign/ malignant/ normal/`` (any subset), masks
  beside the images as ``NAME_mask.png``, ``NAME_mask_1.png``, … (BUSI's layout);
- ``bus-bra``: a folder with ``bus_data.csv`` and ``Images/`` (``Masks/``
  optional), BUS-BRA's layout: the ``Case`` column is the patient;
- ``csv``: a user's CSV file with the columns ``path,label`` and optionally
  ``patient`` and ``mask`` (several masks separated by ``;``); relative paths
  are relative to the CSV file's folder.

Every source gets a short name (its folder's or file's name, or the one given
as ``NAME=PATH``), which tags its images in the manifest and in evaluation.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mammacls import CLASSES
from mammacls.errors import MammaclsError
from mammacls.inference.images import is_image_name, is_mask_name

BUSBRA_TABLE = "bus_data.csv"
CSV_COLUMNS_HELP = "path,label[,patient][,mask]"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ImageRecord:
    path: Path
    relpath: str
    label: str
    mask_paths: list[Path] = field(default_factory=list)
    source: str = ""
    patient: str = ""
    sha256: str = ""
    file_sha256: str = ""
    width: int = 0
    height: int = 0
    phash: np.ndarray | None = None
    thumb: np.ndarray | None = None
    duplicate_id: str = ""  # duplicates only
    group_id: str = ""  # duplicates and patients: what the split keeps together
    source_group_id: str = ""  # the group within its own source, before groups across sources merge
    split: str = ""
    cache_name: str = ""  # its decoded pixels: decoded/NAME.npy (and NAME_mask.npy)


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "busi", "bus-bra" or "csv"
    path: Path  # the folder, or the CSV file

    @property
    def root(self) -> Path:
        """What the manifest's paths of this source are relative to: the folder, or the CSV's folder."""
        return self.path.resolve().parent if self.kind == "csv" else self.path.resolve()


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: list[dict[str, str]]
    non_image_files: int
    orphan_masks: list[str]
    missing_classes: list[str]
    source: Source | None = None


def parse_source_spec(spec: str | os.PathLike) -> tuple[str | None, Path]:
    """``NAME=PATH`` or a bare ``PATH`` (a path that exists as written is never split)."""
    text = os.fspath(spec)
    name, sep, rest = text.partition("=")
    if sep and rest and not Path(text).exists() and _NAME_PATTERN.match(name):
        return name, Path(rest)
    return None, Path(text)


def open_source(spec: str | os.PathLike, name: str | None = None) -> Source:
    """Recognise what kind of source ``spec`` is; a clear error when it is none."""
    given_name, path = parse_source_spec(spec)
    name = name or given_name
    if not path.exists():
        raise MammaclsError(f"dataset not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise MammaclsError(f"{path} is a file but not a CSV ({CSV_COLUMNS_HELP}); give a folder or a CSV")
        kind = "csv"
    elif (path / BUSBRA_TABLE).is_file() and (path / "Images").is_dir():
        kind = "bus-bra"
    elif _class_dirs(path):
        kind = "busi"
    else:
        raise MammaclsError(_not_a_source_message(path))
    return Source(_source_name(name, path), kind, path)


def _not_a_source_message(path: Path) -> str:
    inside = []
    try:
        for child in sorted(path.iterdir()):
            if child.is_dir() and (_class_dirs(child) or (child / BUSBRA_TABLE).is_file()):
                inside.append(str(child))
    except OSError:
        pass
    hint = f"; did you mean {' or '.join(inside[:3])}?" if inside else ""
    return (f"no class folders in {path}: expected benign/, malignant/ and normal/ (BUSI layout), "
            f"{BUSBRA_TABLE} with Images/ (BUS-BRA), or a CSV file ({CSV_COLUMNS_HELP}){hint}")


# CSV names that say nothing of where the scans come from: such a source is named after its folder
GENERIC_CSV_NAMES = frozenset({"manifest", "labels", "label", "index", "data", "dataset", "metadata", "list",
                               "images", "scans", "annotations"})


def _source_name(name: str | None, path: Path) -> str:
    if name is not None:
        if not _NAME_PATTERN.match(name):
            raise MammaclsError(f"source name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        return name
    resolved = path.resolve()
    stem = resolved.stem if path.is_file() else resolved.name
    if path.is_file() and stem.lower() in GENERIC_CSV_NAMES:  # hospitalA/manifest.csv is "hospitalA"
        stem = resolved.parent.name or stem
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "source"
    return cleaned[:64]


def absent_classes(records) -> list[str]:
    """The classes none of ``records`` carries (BUS-BRA: normal)."""
    present = {r.label for r in records}
    return [c for c in CLASSES if c not in present]


def scan_source(source: Source) -> ScanResult:
    readers = {"busi": _scan_busi_layout, "bus-bra": _scan_busbra, "csv": _scan_csv}
    result = readers[source.kind](source.path)
    for record in result.records:
        record.source = source.name
    result.source = source
    return result


def scan_dataset(root: Path) -> ScanResult:
    """Find images and their masks in any recognised source (a folder or a CSV)."""
    return scan_source(open_source(Path(root)))


# ------------------------------------------------------------ BUSI layout ---

def _class_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    try:
        children = sorted(root.iterdir())
    except OSError:
        return {}
    for child in children:
        if child.is_dir() and child.name.lower() in CLASSES and child.name.lower() not in found:
            found[child.name.lower()] = child
    return {c: found[c] for c in CLASSES if c in found}


def _scan_busi_layout(root: Path) -> ScanResult:
    """Images and their masks under ``root/<class>/`` (recursively)."""
    class_dirs = _class_dirs(root)
    records: list[ImageRecord] = []
    orphan_masks: list[str] = []
    non_image = 0
    for label, class_dir in class_dirs.items():
        images: dict[Path, ImageRecord] = {}
        masks: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(class_dir):  # followlinks=False: no loops
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if not is_image_name(path):
                    non_image += 1
                elif is_mask_name(path):
                    masks.append(path)
                else:
                    rel = path.relative_to(root).as_posix()
                    images[path.with_suffix("")] = ImageRecord(path=path, relpath=rel, label=label)
        for mask in masks:
            owner = images.get(_mask_owner_stem(mask))
            if owner is None:
                orphan_masks.append(mask.relative_to(root).as_posix())
            else:
                owner.mask_paths.append(mask)
        for record in images.values():
            record.mask_paths.sort(key=_mask_order)
        records.extend(images.values())
    if not records:
        raise MammaclsError(f"no images found in the class folders of {root}")
    records.sort(key=lambda r: r.relpath)
    missing = [c for c in CLASSES if c not in class_dirs]
    return ScanResult(records, [], non_image, orphan_masks, missing)


def _mask_owner_stem(mask: Path) -> Path:
    stem = mask.stem
    owner = stem[: -len("_mask")] if stem.endswith("_mask") else stem.rpartition("_mask_")[0]
    return mask.with_name(owner)


def _mask_order(mask: Path) -> tuple[int, str]:
    stem = mask.stem
    return (0, "") if stem.endswith("_mask") else (int(stem.rpartition("_mask_")[2]), stem)


# ---------------------------------------------------------------- BUS-BRA ---

def _scan_busbra(root: Path) -> ScanResult:
    """BUS-BRA: ``bus_data.csv`` (ID, Case = patient, Pathology), ``Images/ID.png``,
    ``Masks/mask_NNNN-s.png`` for ``bus_NNNN-s``."""
    rows = _read_table(root / BUSBRA_TABLE, required=("ID", "Case", "Pathology"))
    records: list[ImageRecord] = []
    skipped: list[dict[str, str]] = []
    listed: set[str] = set()
    for line, row in rows:
        image_id = row["ID"].strip()
        label = row["Pathology"].strip().lower()
        if label not in CLASSES:
            raise MammaclsError(f"{root / BUSBRA_TABLE} line {line}: pathology {row['Pathology']!r} "
                                f"is not one of {', '.join(CLASSES)}")
        path = root / "Images" / f"{image_id}.png"
        listed.add(path.name)
        if not path.is_file():
            skipped.append({"path": str(path), "reason": f"listed in {BUSBRA_TABLE} but missing"})
            continue
        mask = root / "Masks" / f"mask_{image_id.removeprefix('bus_')}.png"
        records.append(ImageRecord(path=path, relpath=path.relative_to(root).as_posix(), label=label,
                                   mask_paths=[mask] if mask.is_file() else [], patient=row["Case"].strip()))
    non_image = 0
    for extra in sorted((root / "Images").iterdir()):
        if extra.name not in listed:
            if is_image_name(extra):
                skipped.append({"path": str(extra), "reason": f"not listed in {BUSBRA_TABLE} (no label)"})
            else:
                non_image += 1
    if not records:
        raise MammaclsError(f"no images of {root / BUSBRA_TABLE} found in {root / 'Images'}")
    records.sort(key=lambda r: r.relpath)
    return ScanResult(records, skipped, non_image, [], absent_classes(records))


# -------------------------------------------------------------- user CSV ---

def _scan_csv(table: Path) -> ScanResult:
    """A user's CSV: ``path,label[,patient][,mask]``; relative paths start at the CSV's folder."""
    rows = _read_table(table, required=("path", "label"))
    base = table.resolve().parent
    records: list[ImageRecord] = []
    skipped: list[dict[str, str]] = []
    seen: dict[Path, int] = {}
    for line, row in rows:
        raw = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip().lower()
        if not raw:
            raise MammaclsError(f"{table} line {line}: empty path")
        if label not in CLASSES:
            raise MammaclsError(f"{table} line {line}: label {row.get('label')!r} is not one of {', '.join(CLASSES)}")
        path = _resolve(base, raw)
        if path in seen:
            raise MammaclsError(f"{table} line {line}: {raw} is listed twice (first on line {seen[path]})")
        seen[path] = line
        if not path.is_file():
            skipped.append({"path": str(path), "reason": f"listed in {table.name} line {line} but missing"})
            continue
        masks = [_resolve(base, m.strip()) for m in (row.get("mask") or "").split(";") if m.strip()]
        missing_masks = [m for m in masks if not m.is_file()]
        skipped.extend({"path": str(m), "reason": f"mask of line {line} missing"} for m in missing_masks)
        records.append(ImageRecord(
            path=path, relpath=relative_or_absolute(path, base), label=label,
            mask_paths=[m for m in masks if m.is_file()], patient=(row.get("patient") or "").strip()))
    if not records:
        raise MammaclsError(f"no readable image is listed in {table}")
    records.sort(key=lambda r: r.relpath)
    return ScanResult(records, skipped, 0, [], absent_classes(records))


def _resolve(base: Path, raw: str) -> Path:
    path = Path(raw.replace("\\", "/")).expanduser()
    return path if path.is_absolute() else base / path


def relative_or_absolute(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (so paths survive a move), else absolute."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _read_table(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV with their line numbers; one clear error for a missing column or bad bytes."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or ()]
            missing = [c for c in required if c not in columns]
            if missing:
                raise MammaclsError(f"{path} lacks the column(s) {', '.join(missing)} "
                                    f"(expected {', '.join(required)}; found {', '.join(columns) or 'none'})")
            reader.fieldnames = columns
            return [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values()
                                                                    if isinstance(v, str))]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MammaclsError(f"cannot read {path}: {exc}") from None
    except OSError as exc:
        raise MammaclsError(f"cannot read {path}: {exc.strerror or exc}") from None
