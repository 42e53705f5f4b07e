"""Which files to predict: files and folders expanded, and a deterministic shard of them."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mammacls.errors import MammaclsError
from mammacls.inference.images import is_dicom, is_image_name, is_mask_name


@dataclass
class Inputs:
    files: list[Path] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    ignored: int = 0  # non-image files and BUSI masks met while walking folders


def collect_inputs(paths: Iterable[Path]) -> Inputs:
    """Expand files and folders (recursively, not following links into loops).

    In folders: images by extension, and DICOM files by extension or, without one
    of the image extensions, by their DICM preamble (archives often have no suffix).
    """
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
                    if (is_image_name(candidate) and not is_mask_name(candidate)) or is_dicom(candidate):
                        add(candidate)
                    else:
                        found.ignored += 1
        elif path.exists():
            add(path)
        else:
            found.errors.append({"path": str(path), "error": "file not found"})
    return found


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` (1 <= K <= N) -> (K, N)."""
    index, sep, count = str(text).partition("/")
    try:
        k, n = int(index), int(count)
    except ValueError:
        k = n = 0
    if not sep or n < 1 or not 1 <= k <= n:
        raise MammaclsError(f"shard {text!r}: use K/N with 1 <= K <= N, e.g. 3/8")
    return k, n


def in_shard(path: Path, shard: tuple[int, int]) -> bool:
    """Deterministic 1/N of the inputs by a hash of the path as given: the same on every machine
    and stable when files are added (an index in a listing would shift)."""
    k, n = shard
    return zlib.crc32(str(path).encode("utf-8", "surrogateescape")) % n == k - 1
