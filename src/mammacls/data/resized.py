"""A prepared dataset at one training size, cached beside it: every image resized, its lesion mask
resized the same way, and each image's perceptual hash, so that a run (a repeat, a warm start,
calibrate) begins in seconds instead of decoding, fingerprinting and resizing everything again.

``<prepared>/resized/<size>/`` holds ``images.npy`` (N x S x S uint8, manifest order),
``masks.npy`` (bit-packed rows), ``thumbs.npy`` (the 32 x 32 duplicate-check thumbnails) and
``index.json`` (the manifest's sha256, the image count and the perceptual hashes), each written atomically, the index last: a cache whose index does not match
its manifest is rebuilt. A cache that cannot be written (disk full, read-only) is only a slower start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mammacls.data.dedup import perceptual_hash, phash_to_hex, thumbnail
from mammacls.data.prepared import ManifestRow
from mammacls.inference.images import resize_square
from mammacls.store import atomic_path, atomic_write_json

RESIZED_DIR = "resized"
FORMAT = 2


@dataclass
class ResizedImages:
    """All images of a prepared dataset at ``size``, in manifest order."""

    size: int
    images: np.ndarray  # N x S x S uint8
    packed_masks: np.ndarray  # N x ceil(S*S/8) uint8 (np.packbits of each S x S {0, 1} mask)
    phashes: list[str]  # hex perceptual hash of each full-size image
    thumbs: np.ndarray  # N x 32 x 32 uint8 thumbnails of the full-size images (dedup.thumbnail)
    positions: dict[str, int]  # manifest path -> row position

    def rows(self, rows: list[ManifestRow]) -> np.ndarray:
        return np.array([self.positions[row["path"]] for row in rows], dtype=np.int64)

    def masks(self, positions: np.ndarray) -> np.ndarray:
        side = self.size
        unpacked = np.unpackbits(self.packed_masks[positions], axis=1)[:, : side * side]
        return unpacked.reshape(len(positions), side, side)


def resized_images(dataset, size: int, *, warn=None) -> ResizedImages:
    """The cached images of ``dataset`` at ``size``; built (and saved, when it can be) on first use."""
    folder = Path(dataset.root) / RESIZED_DIR / str(int(size))
    positions = {row["path"]: k for k, row in enumerate(dataset.rows)}
    cached = _read(folder, dataset, size)
    if cached is not None:
        images, masks, thumbs, phashes = cached
        return ResizedImages(size, images, masks, phashes, thumbs, positions)
    images, masks, thumbs, phashes = _build(dataset, size)
    try:
        _write(folder, dataset, {"images.npy": images, "masks.npy": masks, "thumbs.npy": thumbs}, phashes)
    except OSError as exc:
        if warn is not None:
            warn(f"warning: could not cache the {size} px images in {folder} ({exc.strerror or exc}); "
                 "the next run resizes them again")
    return ResizedImages(size, images, masks, phashes, thumbs, positions)


def _build(dataset, size: int):
    images = np.empty((len(dataset.rows), size, size), dtype=np.uint8)
    masks = np.zeros((len(dataset.rows), (size * size + 7) // 8), dtype=np.uint8)
    thumbs = np.empty((len(dataset.rows), 32, 32), dtype=np.uint8)
    phashes = []
    for k, row in enumerate(dataset.rows):
        full = dataset.load_image(row)
        images[k] = resize_square(full, size)
        phashes.append(phash_to_hex(perceptual_hash(full)))
        thumbs[k] = thumbnail(full)
        if row.get("mask_file"):
            mask = resize_square(dataset.load_mask(row) * np.uint8(255), size) >= 128
            masks[k] = np.packbits(mask.ravel())
    return images, masks, thumbs, phashes


def _read(folder: Path, dataset, size: int):
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        if (index.get("format") != FORMAT or index.get("manifest_sha256") != dataset.manifest_sha256
                or index.get("images") != len(dataset.rows) or len(index.get("phashes", ())) != len(dataset.rows)):
            return None
        images = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
        masks = np.load(folder / "masks.npy", mmap_mode="r", allow_pickle=False)
        thumbs = np.load(folder / "thumbs.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    n = len(dataset.rows)
    if images.shape != (n, size, size) or masks.shape != (n, (size * size + 7) // 8) or thumbs.shape != (n, 32, 32):
        return None
    return images, masks, thumbs, list(index["phashes"])


def _write(folder: Path, dataset, arrays: dict[str, np.ndarray], phashes: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        with atomic_path(folder / name) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
    atomic_write_json(folder / "index.json", {"format": FORMAT, "manifest_sha256": dataset.manifest_sha256,
                                              "images": len(dataset.rows), "phashes": phashes})
