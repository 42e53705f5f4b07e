"""Data: read a BUSI-layout folder, find duplicates, split it without leakage.

``prepare_dataset`` is the whole step: scan the class folders, attach masks,
decode every image to grayscale (cached as .npy so training never decodes a
PNG twice), group exact and near duplicates, set conflicts aside, split
train/val/test stratified by class with groups kept whole, and write a
manifest plus a summary.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mammacls import CLASSES, __version__
from mammacls.errors import MammaclsError
from mammacls.images import ImageReadError, is_image_name, is_mask_name, load_grayscale, load_mask_union
from mammacls.store import atomic_write_json, datasets_dir, record_latest_dataset, sha256_file

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
SUMMARY_NAME = "summary.json"
OVERVIEW_NAME = "overview.png"
MANIFEST_COLUMNS = (
    "path", "label", "split", "group_id", "sha256", "file_sha256",
    "width", "height", "mask_paths", "cache_file", "mask_file",
)

# Near-duplicate rule, tuned on BUSI against Pawłowska et al. 2023's published
# grouping: 64-bit DCT perceptual hash within 8 bits, or 32x32 thumbnails with
# Pearson correlation >= 0.97. Pair recall 0.94 after grouping, no false pair.
PHASH_MAX_DISTANCE = 8
THUMB_MIN_CORRELATION = 0.97


@dataclass
class ImageRecord:
    path: Path
    relpath: str
    label: str
    mask_paths: list[Path] = field(default_factory=list)
    sha256: str = ""
    file_sha256: str = ""
    width: int = 0
    height: int = 0
    phash: np.ndarray | None = None
    thumb: np.ndarray | None = None
    group_id: str = ""
    split: str = ""


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: list[dict[str, str]]
    non_image_files: int
    orphan_masks: list[str]
    missing_classes: list[str]


def scan_dataset(root: Path) -> ScanResult:
    """Find images and their masks under ``root/<class>/`` (recursively)."""
    root = Path(root)
    if not root.exists():
        raise MammaclsError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise MammaclsError(f"not a folder: {root}")
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise MammaclsError(
            f"no class folders in {root}: expected benign/, malignant/ and normal/ (BUSI layout)"
        )
    records: list[ImageRecord] = []
    skipped: list[dict[str, str]] = []
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
    return ScanResult(records, skipped, non_image, orphan_masks, missing)


def _class_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in CLASSES and child.name.lower() not in found:
            found[child.name.lower()] = child
    return {c: found[c] for c in CLASSES if c in found}


def _mask_owner_stem(mask: Path) -> Path:
    stem = mask.stem
    owner = stem[: -len("_mask")] if stem.endswith("_mask") else stem.rpartition("_mask_")[0]
    return mask.with_name(owner)


def _mask_order(mask: Path) -> tuple[int, str]:
    stem = mask.stem
    return (0, "") if stem.endswith("_mask") else (int(stem.rpartition("_mask_")[2]), stem)


# ---------------------------------------------------------------- decoding ---

def pixel_sha256(gray: np.ndarray) -> str:
    digest = hashlib.sha256(f"{gray.shape[0]}x{gray.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(gray).tobytes())
    return digest.hexdigest()


def perceptual_hash(gray: np.ndarray) -> np.ndarray:
    """64-bit DCT hash (as 63 bools: the DC term carries no shape)."""
    import cv2

    small = cv2.resize(gray.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].flatten()[1:]
    return low > np.median(low)


def phash_to_hex(bits: np.ndarray) -> str:
    return np.packbits(np.asarray(bits, dtype=bool)).tobytes().hex()


def phash_from_hex(text: str) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:63].astype(bool)


def thumbnail_vector(gray: np.ndarray) -> np.ndarray:
    """32x32 thumbnail, centred and unit-normed, so a dot product is a correlation."""
    import cv2

    vec = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    vec -= vec.mean()
    norm = np.linalg.norm(vec)
    return (vec / norm if norm > 0 else vec).astype(np.float32)


def _decode_one(record: ImageRecord, cache_path: Path, mask_cache_path: Path) -> list[dict[str, str]]:
    """Decode, fingerprint and cache one image. Returns problems with its masks."""
    gray = load_grayscale(record.path)
    record.height, record.width = gray.shape
    record.sha256 = pixel_sha256(gray)
    record.file_sha256 = sha256_file(record.path)
    record.phash = perceptual_hash(gray)
    record.thumb = thumbnail_vector(gray)
    np.save(cache_path, gray)
    problems = []
    good_masks = []
    for mask in record.mask_paths:
        try:
            load_mask_union([mask], gray.shape)
            good_masks.append(mask)
        except (ImageReadError, OSError, ValueError) as exc:
            problems.append({"path": str(mask), "reason": f"mask skipped: {exc}"})
    record.mask_paths = good_masks
    if good_masks:
        np.save(mask_cache_path, np.packbits(load_mask_union(good_masks, gray.shape), axis=None))
    return problems


# --------------------------------------------------------------- grouping ---

class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between rows of two boolean hash arrays (len(a) x len(b))."""
    a, b = a.astype(np.int32), b.astype(np.int32)
    # differing bits = ones of a against zeros of b, plus zeros of a against ones of b
    return a @ (1 - b.T) + (1 - a) @ b.T


def near_duplicate_pairs(
    phashes: np.ndarray, thumbs: np.ndarray, chunk: int = 512
) -> list[tuple[int, int]]:
    """Index pairs (i < j) that are exact or near duplicates by the rule above."""
    n = len(phashes)
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, chunk):
        block = slice(start, min(start + chunk, n))
        hamming = hamming_distances(phashes[block], phashes)
        corr = thumbs[block] @ thumbs.T
        close = (hamming <= PHASH_MAX_DISTANCE) | (corr >= THUMB_MIN_CORRELATION)
        rows, cols = np.nonzero(close)
        rows += start
        keep = rows < cols
        pairs.extend(zip(rows[keep].tolist(), cols[keep].tolist()))
    return pairs


def read_groups_csv(path: Path) -> list[tuple[str, str]]:
    """Rows (path, group_id) of a user-supplied grouping such as busi_groups.csv."""
    path = Path(path)
    if not path.is_file():
        raise MammaclsError(f"groups CSV not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"path", "group_id"} <= set(reader.fieldnames):
                raise MammaclsError(f"groups CSV {path} needs the columns path,group_id")
            return [(row["path"], row["group_id"]) for row in reader if row.get("path") and row.get("group_id")]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MammaclsError(f"cannot read groups CSV {path}: {exc}") from None


def assign_groups(
    records: list[ImageRecord], extra_groups: Iterable[tuple[str, str]] = ()
) -> dict[str, int]:
    """Give every record a ``group_id``; returns how each link kind contributed."""
    n = len(records)
    uf = _UnionFind(n)
    stats = Counter()
    by_hash: dict[str, int] = {}
    for i, record in enumerate(records):
        first = by_hash.setdefault(record.sha256, i)
        if first != i:
            uf.union(first, i)
            stats["exact_pairs"] += 1
    if n:
        phashes = np.stack([r.phash for r in records])
        thumbs = np.stack([r.thumb for r in records])
        for i, j in near_duplicate_pairs(phashes, thumbs):
            uf.union(i, j)
            stats["near_pairs"] += 1
    extra = list(extra_groups)
    if extra:
        index = {r.relpath: i for i, r in enumerate(records)}
        members: dict[str, list[int]] = defaultdict(list)
        for raw_path, group in extra:
            hit = _match_path(raw_path, index)
            if hit is None:
                stats["csv_unmatched"] += 1
            else:
                members[group].append(hit)
                stats["csv_matched"] += 1
        if stats["csv_matched"] == 0:
            raise MammaclsError("no row of the groups CSV names an image of this dataset (check its path column)")
        for idxs in members.values():
            for other in idxs[1:]:
                uf.union(idxs[0], other)
    roots: dict[int, str] = {}
    for i, record in enumerate(records):  # records are sorted, so ids are stable
        root = uf.find(i)
        if root not in roots:
            roots[root] = f"g{len(roots) + 1:05d}"
        record.group_id = roots[root]
    return dict(stats)


def _match_path(raw: str, index: dict[str, int]) -> int | None:
    parts = Path(raw.replace("\\", "/")).parts
    for k in range(len(parts)):
        hit = index.get("/".join(parts[k:]))
        if hit is not None:
            return hit
    return None


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
        raise MammaclsError(f"too few distinct images to split ({n_groups} groups; need at least 3)")
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


def default_prepared_dir(source: Path) -> Path:
    key = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:8]
    return datasets_dir() / f"{Path(source).resolve().name}-{key}"


def prepare_dataset(
    source: Path,
    out: Path | None = None,
    options: PrepareOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run the whole prepare step; returns the summary (also saved as summary.json)."""
    options = options or PrepareOptions()
    for name, frac in (("val", options.val_fraction), ("test", options.test_fraction)):
        if not 0.0 < frac < 0.5:
            raise MammaclsError(f"--{name}-fraction must be between 0 and 0.5 (got {frac})")
    source = Path(source)
    scan = scan_dataset(source)
    extra_groups = read_groups_csv(options.groups_csv) if options.groups_csv else []
    out = Path(out) if out else default_prepared_dir(source)
    _check_output_dir(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        summary = _prepare_into(work, out, source, scan, extra_groups, options, progress)
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    record_latest_dataset(out)
    return summary


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MammaclsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise MammaclsError(
            f"--out {out} is a non-empty folder that is not a prepared dataset; choose an empty or new folder"
        )


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _prepare_into(work, out, source, scan, extra_groups, options, progress) -> dict:
    decoded_dir = work / "decoded"
    decoded_dir.mkdir()
    records = scan.records
    skipped = list(scan.skipped)
    done = 0

    def task(item):
        i, record = item
        try:
            return i, _decode_one(record, decoded_dir / f"{i:05d}.npy", decoded_dir / f"{i:05d}_mask.npy"), None
        except ImageReadError as exc:
            return i, [], str(exc)

    ok = [False] * len(records)
    workers = options.workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, problems, error in pool.map(task, enumerate(records)):
            skipped.extend(problems)
            if error is None:
                ok[i] = True
            else:
                skipped.append({"path": str(records[i].path), "reason": error})
            done += 1
            if progress:
                progress(done, len(records))
    cache_names = {id(r): f"{i:05d}" for i, r in enumerate(records)}
    records = [r for i, r in enumerate(records) if ok[i]]
    if not records:
        raise MammaclsError(f"none of the {len(scan.records)} images in {source} could be read")

    link_stats = assign_groups(records, extra_groups)
    members: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        members[record.group_id].append(record)
    conflicts = [g for g, rs in members.items() if len({r.label for r in rs}) > 1]
    conflict_set = set(conflicts)
    kept = [r for r in records if options.keep_conflicts or r.group_id not in conflict_set]
    if not kept:
        raise MammaclsError("every image is in a conflicting group; nothing left to split (try --keep-conflicts)")

    splits = split_by_group(
        [r.label for r in kept], [r.group_id for r in kept],
        options.val_fraction, options.test_fraction, options.seed,
    )
    for record, split in zip(kept, splits):
        record.split = split

    manifest_path = out / MANIFEST_NAME
    _write_manifest(work / MANIFEST_NAME, kept, cache_names, decoded_dir, out)
    counts = count_table(kept)
    dup_groups = {g: rs for g, rs in members.items() if len(rs) > 1}
    summary = {
        "source": str(source.resolve()),
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
        "images_found": len(scan.records),
        "images_used": len(kept),
        "counts": counts,
        "masks_attached": sum(len(r.mask_paths) for r in records),
        "images_with_masks": sum(1 for r in records if r.mask_paths),
        "duplicate_groups": len(dup_groups),
        "images_in_duplicate_groups": sum(len(rs) for rs in dup_groups.values()),
        "duplicate_links": link_stats,
        "duplicate_group_members": {
            g: [r.relpath for r in rs] for g, rs in sorted(dup_groups.items())
        },
        "conflicts": len(conflicts),
        "conflict_groups": [
            {"group_id": g, "members": [{"path": r.relpath, "label": r.label} for r in members[g]],
             "excluded": not options.keep_conflicts}
            for g in sorted(conflicts)
        ],
        "excluded_images": len(records) - len(kept),
        "skipped": skipped,
        "non_image_files": scan.non_image_files,
        "orphan_masks": scan.orphan_masks,
        "missing_classes": scan.missing_classes,
    }
    atomic_write_json(work / SUMMARY_NAME, summary)
    from mammacls.plots import dataset_overview_figure

    figure = dataset_overview_figure(kept, counts, lambda r: np.load(decoded_dir / f"{cache_names[id(r)]}.npy"))
    figure.savefig(work / OVERVIEW_NAME, dpi=110)
    return summary


def count_table(records: Iterable[ImageRecord]) -> dict[str, dict[str, int]]:
    counts = {c: {s: 0 for s in (*SPLITS, "total")} for c in (*CLASSES, "total")}
    for r in records:
        for c in (r.label, "total"):
            counts[c][r.split] += 1
            counts[c]["total"] += 1
    return counts


def _write_manifest(target: Path, records, cache_names, decoded_dir: Path, out: Path) -> None:
    with open(target, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for r in records:
            name = cache_names[id(r)]
            has_mask = (decoded_dir / f"{name}_mask.npy").exists()
            writer.writerow([
                str(r.path.resolve()), r.label, r.split, r.group_id, r.sha256, r.file_sha256,
                r.width, r.height, ";".join(str(m.resolve()) for m in r.mask_paths),
                f"decoded/{name}.npy", f"decoded/{name}_mask.npy" if has_mask else "",
            ])


# ------------------------------------------------------- reading it back ---

@dataclass
class PreparedDataset:
    root: Path
    rows: list[dict[str, str]]
    summary: dict
    manifest_sha256: str

    def split(self, name: str) -> list[dict[str, str]]:
        return [row for row in self.rows if row["split"] == name]

    def load_image(self, row: dict[str, str]) -> np.ndarray:
        cached = self.root / row["cache_file"]
        if cached.is_file():
            return np.load(cached, allow_pickle=False)
        return load_grayscale(Path(row["path"]))

    def load_mask(self, row: dict[str, str]) -> np.ndarray:
        shape = (int(row["height"]), int(row["width"]))
        if not row.get("mask_file"):
            return np.zeros(shape, dtype=np.uint8)
        packed = np.load(self.root / row["mask_file"], allow_pickle=False)
        return np.unpackbits(packed)[: shape[0] * shape[1]].reshape(shape)


def is_prepared_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def load_prepared(path: Path | None = None) -> PreparedDataset:
    """Open a prepared dataset (default: the one ``prepare`` wrote last)."""
    if path is None:
        from mammacls.store import latest_dataset

        path = latest_dataset()
        if path is None or not is_prepared_dir(path):
            raise MammaclsError("no prepared dataset yet: run mammacls prepare DATA_DIR first")
    path = Path(path)
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
    for row in rows:
        if row["label"] not in CLASSES or row["split"] not in SPLITS:
            raise MammaclsError(f"{manifest}: bad label/split in row for {row['path']}")
    summary = {}
    if (path / SUMMARY_NAME).is_file():
        import json

        summary = json.loads((path / SUMMARY_NAME).read_text(encoding="utf-8"))
    return PreparedDataset(path, rows, summary, sha256_file(manifest))
