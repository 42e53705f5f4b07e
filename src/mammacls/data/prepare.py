"""Data: prepare one or more sources as one dataset, split without leakage.

``prepare_dataset`` is the whole step: read each source (``sources``), decode
every image to grayscale (cached as .npy so training never decodes a PNG
twice), group exact and near duplicates and each patient's images
(``dedup``), also across sources, set label conflicts aside, split each source
train/val/test stratified by class with groups kept whole, and write a
manifest (one row per image, with its ``source`` and ``patient``) plus a summary.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import os
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mammacls import CLASSES, __version__
from mammacls.errors import MammaclsError, param
from mammacls.inference.images import load_grayscale, load_mask_union
from mammacls.inference.pixels import ImageReadError
from mammacls.data.dedup import (
    assign_groups, merge_across_sources, perceptual_hash, pixel_sha256, read_groups_csv, thumbnail_vector,
)
from mammacls.data.sources import (
    ImageRecord, ScanResult, Source, absent_classes, open_source, relative_or_absolute, scan_source,
)
from mammacls.data.prepared import MANIFEST_COLUMNS, MANIFEST_NAME, SPLITS, SUMMARY_NAME, dataset_lock_key
from mammacls.store import atomic_write_json, cache_lock, current_umask, datasets_dir, record_latest_dataset, sha256_file

OVERVIEW_NAME = "overview.png"

# ---------------------------------------------------------------- decoding ---

def _decode_one(record: ImageRecord, cache_path: Path, mask_cache_path: Path) -> list[dict[str, str]]:
    """Decode, fingerprint and cache one image. Returns problems with its masks."""
    stats: dict = {}
    gray = load_grayscale(record.path, stats)
    if not record.patient and stats.get("patient_key"):  # DICOM: a hash of Patient ID, never the ID
        record.patient = stats["patient_key"]
    crop = {"crop": stats.get("crop"), "full_shape": stats.get("frame_shape")}  # DICOM ultrasound region
    record.height, record.width = gray.shape
    record.sha256 = pixel_sha256(gray)
    record.file_sha256 = sha256_file(record.path)
    record.phash = perceptual_hash(gray)
    record.thumb = thumbnail_vector(gray)
    np.save(cache_path, gray)
    problems = []
    good_masks = []
    union = None  # each mask decoded once: checked, then ORed in
    for mask in record.mask_paths:
        try:
            one = load_mask_union([mask], gray.shape, **crop)
        except (ImageReadError, OSError, ValueError) as exc:
            problems.append({"path": str(mask), "reason": f"mask skipped: {exc}"})
            continue
        good_masks.append(mask)
        union = one if union is None else union | one
    record.mask_paths = good_masks
    if union is not None:
        np.save(mask_cache_path, np.packbits(union, axis=None))
    return problems


# --------------------------------------------------------------- splitting ---

def split_by_group(
    labels: list[str], groups: list[str], val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """Stratified train/val/test assignment with every group kept in one split.

    Uses scikit-learn's StratifiedGroupKFold with up to 20 folds (5 % each) and
    hands whole folds to test and val, so class ratios hold in every split.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups))
    largest_class = max(Counter(labels).values())
    n_folds = min(20, n_groups, largest_class)
    if n_folds < 3:
        raise MammaclsError(f"too few distinct images to split: {n_groups} groups (duplicates and patients "
                            f"count once) and {largest_class} in the largest class; train, validation and test "
                            "need at least 3 of both")
    k_test = max(1, round(test_fraction * n_folds))
    k_val = max(1, round(val_fraction * n_folds))
    if k_test + k_val >= n_folds:
        raise MammaclsError("val and test fractions leave nothing to train on")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    split = ["train"] * len(labels)
    dummy_x = np.zeros((len(labels), 1))
    with warnings.catch_warnings():  # small classes: sklearn warns, the split is still grouped
        warnings.simplefilter("ignore", UserWarning)
        folds = list(splitter.split(dummy_x, labels, groups))
    for fold, (_, fold_idx) in enumerate(folds):
        name = "test" if fold < k_test else "val" if fold < k_test + k_val else "train"
        for i in fold_idx:
            split[i] = name
    return split


# ---------------------------------------------------------------- prepare ---

@dataclass
class PrepareOptions:
    seed: int = 42
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    keep_conflicts: bool = False
    groups_csv: Path | None = None
    workers: int = 0  # 0 = one per CPU


def default_prepared_dir(sources: Path | str | list[Source]) -> Path:
    """``datasets/NAME-HASH`` in the cache; one source keeps the name earlier versions gave it."""
    if not isinstance(sources, list):
        sources = [open_source(sources)]
    resolved = [str(s.path.resolve()) for s in sources]
    key = hashlib.sha256("\n".join(resolved).encode()).hexdigest()[:8]
    name = Path(resolved[0]).name if len(sources) == 1 else "+".join(s.name for s in sources)[:80]
    return datasets_dir() / f"{name}-{key}"


def open_sources(specs: Path | str | Iterable[Path | str]) -> list[Source]:
    """The sources named by ``specs`` (``PATH`` or ``NAME=PATH`` each), checked for clashes."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    if not specs:
        raise MammaclsError("no dataset given: name a BUSI-layout folder, a BUS-BRA folder or a CSV file")
    sources = [open_source(spec) for spec in specs]
    for clash, key, advice in (("named", lambda s: s.name, "name them apart as NAME=PATH"),
                               ("at", lambda s: s.path.resolve(), "name each source once")):
        seen: set = set()
        for s in sources:
            if key(s) in seen:
                raise MammaclsError(f"two sources are {clash} {key(s)}: {advice}")
            seen.add(key(s))
    return sources


def prepare_dataset(
    source: Path | str | Iterable[Path | str],
    *,
    out: Path | None = None,
    options: PrepareOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run the whole prepare step over one or more sources; returns the summary (also saved as summary.json)."""
    options = options or PrepareOptions()
    for name, frac in (("val", options.val_fraction), ("test", options.test_fraction)):
        if not 0.0 < frac < 0.5:
            raise MammaclsError(f"{param(name + '_fraction')} must be between 0 and 0.5 (got {frac})")
    sources = open_sources(source)
    scans = [scan_source(s) for s in sources]
    extra_groups = read_groups_csv(options.groups_csv) if options.groups_csv else []
    out = Path(out) if out else default_prepared_dir(sources)
    _check_output_dir(out)

    with cache_lock(dataset_lock_key(out), "mammacls prepare"):  # nobody reads it while it is replaced
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes 0700; a dataset gets the usual mode
        try:
            summary = _prepare_into(work, out, scans, extra_groups, options, progress)
            _replace_dir(work, out)
        except OSError as exc:  # a full disk, a read-only cache: one line, and nothing half-written stays
            shutil.rmtree(work, ignore_errors=True)
            kept = "the dataset prepared before is unchanged" if (out / MANIFEST_NAME).is_file() else "nothing was kept"
            raise MammaclsError(f"cannot write {exc.filename or work}: {exc.strerror or exc}; {kept}") from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        record_latest_dataset(out)
    return summary


def _remove_leftovers(out: Path) -> None:
    """What a killed prepare of ``out`` left behind (its half-written copy, the replaced old one): with
    ``out``'s lock held, no live prepare can own them."""
    for leftover in [*out.parent.glob(f".{out.name}.*.partial"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)



def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MammaclsError(f"{param('out')} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise MammaclsError(
            f"{param('out')} {out} is a non-empty folder that is not a prepared dataset; choose an empty or new folder"
        )


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _decode_all(records: list[ImageRecord], decoded_dir: Path, workers: int, progress) -> tuple[list[bool], list]:
    """Decode every record into ``decoded/NNNNN.npy`` in a thread pool; which succeeded, and the problems."""
    def task(item):
        i, record = item
        try:
            return i, _decode_one(record, decoded_dir / f"{record.cache_name}.npy",
                                  decoded_dir / f"{record.cache_name}_mask.npy"), None
        except ImageReadError as exc:
            return i, [], str(exc)

    ok = [False] * len(records)
    problems: list[dict[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for done, (i, mask_problems, error) in enumerate(pool.map(task, enumerate(records)), start=1):
            problems.extend(mask_problems)
            if error is None:
                ok[i] = True
            else:
                problems.append({"path": str(records[i].path), "reason": error})
            if progress:
                progress(done, len(records))
    return ok, problems


def _group_sources(records: list[ImageRecord], sources: list[Source], extra_groups) -> tuple[dict, int]:
    """Duplicate and patient groups within each source (kept as ``source_group_id``, which its split
    uses), then duplicates across sources."""
    several = len(sources) > 1
    link_stats: Counter = Counter()
    for source in sources:
        members = [r for r in records if r.source == source.name]
        link_stats.update(assign_groups(members, extra_groups, f"{source.name}:" if several else ""))
    if extra_groups and link_stats["csv_matched"] == 0:
        raise MammaclsError("no row of the groups CSV names an image of this dataset (check its path column)")
    for record in records:
        record.source_group_id = record.group_id
    cross_pairs = merge_across_sources(records) if several else 0
    return dict(link_stats), cross_pairs


def _split_sources(kept: list[ImageRecord], sources: list[Source], options: PrepareOptions) -> int:
    """Split each source on its own (stratified by class, its groups whole, the same seed), so a
    source's split does not depend on what else is prepared with it; then a group that spans
    sources follows its member from the earliest source. Returns how many images that moved."""
    for source in sources:
        members = [r for r in kept if r.source == source.name]
        if not members:
            continue
        try:
            splits = split_by_group([r.label for r in members], [r.source_group_id for r in members],
                                    options.val_fraction, options.test_fraction, options.seed)
        except MammaclsError as exc:
            raise MammaclsError(f"source {source.name}: {exc}") from None
        for record, split in zip(members, splits):
            record.split = split
    first_split: dict[str, str] = {}
    moved = 0
    for record in kept:  # source order: the earliest source's member decides
        split = first_split.setdefault(record.group_id, record.split)
        if split != record.split:
            record.split = split
            moved += 1
    return moved


def _prepare_into(work, out, scans: list[ScanResult], extra_groups, options, progress) -> dict:
    decoded_dir = work / "decoded"
    decoded_dir.mkdir()
    sources = [scan.source for scan in scans]
    records = [r for scan in scans for r in scan.records]
    for i, record in enumerate(records):
        record.cache_name = f"{i:05d}"
    ok, problems = _decode_all(records, decoded_dir, options.workers, progress)
    skipped = [item for scan in scans for item in scan.skipped] + problems
    found = records
    records = [r for i, r in enumerate(records) if ok[i]]
    if not records:
        raise MammaclsError(f"none of the {len(found)} images in {', '.join(str(s.path) for s in sources)} "
                            "could be read")

    link_stats, cross_pairs = _group_sources(records, sources, extra_groups)
    duplicates: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        duplicates[record.duplicate_id].append(record)
    conflicts = [g for g, rs in duplicates.items() if len({r.label for r in rs}) > 1]
    conflict_set = set(conflicts)
    kept = [r for r in records if options.keep_conflicts or r.duplicate_id not in conflict_set]
    if not kept:
        raise MammaclsError(f"every image is in a conflicting group; nothing left to split "
                            f"(try {param('keep_conflicts')})")
    moved = _split_sources(kept, sources, options)

    several = len(sources) > 1
    label_of = (lambda r: f"{r.source}:{r.relpath}") if several else (lambda r: r.relpath)
    manifest_path = out / MANIFEST_NAME
    _write_manifest(work / MANIFEST_NAME, kept, decoded_dir, {src.name: src.root for src in sources})
    dup_groups = {g: rs for g, rs in duplicates.items() if len(rs) > 1}
    summary = {
        "source": ", ".join(str(s.path.resolve()) for s in sources),
        "sources": [_source_summary(scan, records, kept) for scan in scans],
        "source_roots": {s.name: str(s.root) for s in sources},
        "prepared_dir": str(out.resolve()),
        "manifest": str(manifest_path.resolve()),
        "manifest_sha256": sha256_file(work / MANIFEST_NAME),
        "overview": str((out / OVERVIEW_NAME).resolve()),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mammacls_version": __version__,
        "seed": options.seed,
        "fractions": {"train": round(1 - options.val_fraction - options.test_fraction, 4),
                      "val": options.val_fraction, "test": options.test_fraction},
        "keep_conflicts": options.keep_conflicts,
        "groups_csv": str(options.groups_csv) if options.groups_csv else None,
        "images_found": len(found),
        "images_used": len(kept),
        "counts": count_table(kept),
        "masks_attached": sum(len(r.mask_paths) for r in records),
        "images_with_masks": sum(1 for r in records if r.mask_paths),
        "patients": len({(r.source, r.patient) for r in kept if r.patient}),
        "duplicate_groups": len(dup_groups),
        "images_in_duplicate_groups": sum(len(rs) for rs in dup_groups.values()),
        "duplicate_links": link_stats,
        "duplicate_group_members": {g: [label_of(r) for r in rs] for g, rs in sorted(dup_groups.items())},
        "cross_source": {"duplicate_pairs": cross_pairs, "images_moved": moved,
                         "groups": sum(1 for rs in dup_groups.values() if len({r.source for r in rs}) > 1)},
        "conflicts": len(conflicts),
        "conflict_groups": [
            {"group_id": g, "members": [{"path": label_of(r), "label": r.label} for r in duplicates[g]],
             "excluded": not options.keep_conflicts}
            for g in sorted(conflicts)
        ],
        "excluded_images": len(records) - len(kept),
        "skipped": skipped,
        "non_image_files": sum(scan.non_image_files for scan in scans),
        "orphan_masks": [m for scan in scans for m in scan.orphan_masks],
        "missing_classes": absent_classes(kept),
    }
    atomic_write_json(work / SUMMARY_NAME, summary)
    from mammacls.reporting.plots import dataset_overview_figure

    figure = dataset_overview_figure(kept, summary["counts"],
                                     lambda r: np.load(decoded_dir / f"{r.cache_name}.npy"))
    figure.savefig(work / OVERVIEW_NAME, dpi=110)
    return summary


def _source_summary(scan: ScanResult, decoded: list[ImageRecord], kept: list[ImageRecord]) -> dict:
    name = scan.source.name
    used = [r for r in kept if r.source == name]
    return {
        "name": name, "kind": scan.source.kind, "path": str(scan.source.path.resolve()),
        "images_found": len(scan.records), "images_used": len(used),
        "patients": len({r.patient for r in used if r.patient}) or None,
        "counts": count_table(used),
        "masks_attached": sum(len(r.mask_paths) for r in decoded if r.source == name),
        "missing_classes": absent_classes(used),
        "skipped": len(scan.skipped) + len(scan.records) - sum(1 for r in decoded if r.source == name),
    }


def count_table(records: Iterable[ImageRecord]) -> dict[str, dict[str, int]]:
    counts = {c: {s: 0 for s in (*SPLITS, "total")} for c in (*CLASSES, "total")}
    for r in records:
        for c in (r.label, "total"):
            counts[c][r.split] += 1
            counts[c]["total"] += 1
    return counts


def _write_manifest(target: Path, records, decoded_dir: Path, roots: dict[str, Path]) -> None:
    with open(target, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for r in records:
            name = r.cache_name
            has_mask = (decoded_dir / f"{name}_mask.npy").exists()
            root = roots[r.source]
            writer.writerow([
                relative_or_absolute(r.path.resolve(), root), r.label, r.split, r.group_id, r.sha256, r.file_sha256,
                r.width, r.height, ";".join(relative_or_absolute(m.resolve(), root) for m in r.mask_paths),
                f"decoded/{name}.npy", f"decoded/{name}_mask.npy" if has_mask else "",
                r.source, r.patient,
            ])
