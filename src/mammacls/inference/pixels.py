"""What every decoder shares: size limits, the per-file read error and the colour measure."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from mammacls.errors import MammaclsError

# Refuse images above this many pixels before decoding them (decompression bombs).
# 50 MP is far above any ultrasound frame (BUSI's largest is about 0.7 MP).
MAX_PIXELS = 50_000_000

# Smallest side we accept: below this there is nothing to classify.
MIN_SIDE = 16

# A pixel is "coloured" when its channels differ by more than this (of 255).
CHROMA_LIMIT = 40


class ImageReadError(MammaclsError):
    """One file could not be read as an image (reported per file, not fatal)."""


@dataclass(frozen=True)
class InMemoryFile:
    """A file held in memory (an upload to ``mammacls serve``): the decoders read it as they read a
    path, and it is never written to disk."""
    name: str
    data: bytes = b""

    @property
    def suffix(self) -> str:
        return PurePath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePath(self.name).stem

    def stream(self) -> io.BytesIO:
        return io.BytesIO(self.data)

    def __str__(self) -> str:
        return self.name


def check_dimensions(width: int, height: int, *, what: str = "image", before_decoding: bool = True) -> None:
    """Refuse a frame by its size: above MAX_PIXELS while it is still encoded (decompression bombs),
    or with a side below MIN_SIDE."""
    if before_decoding and width * height > MAX_PIXELS:
        raise ImageReadError(f"{what} too large ({width}x{height} = {width * height:,} pixels, "
                             f"limit {MAX_PIXELS:,}): refused before decoding")
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(f"image too small ({width}x{height}, need at least {MIN_SIDE} px a side)")


def colour_fraction_rgb(rgb: np.ndarray) -> float:
    """``colour_fraction`` of an H x W x 3 uint8 array."""
    sample = rgb[::4, ::4].astype(np.int16)  # a share: every 4th pixel will do
    red, green, blue = sample[..., 0], sample[..., 1], sample[..., 2]
    # channel by channel: max/min along a length-3 axis is ~20x slower in numpy (2.5 ms for a BUSI scan)
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    return float((spread > CHROMA_LIMIT).mean())


def read_error(exc: BaseException, doing: str) -> ImageReadError:
    """The one line for a file that could not be read: missing, forbidden, or why ``doing`` it failed."""
    if isinstance(exc, FileNotFoundError):
        return ImageReadError("file not found")
    if isinstance(exc, PermissionError):
        return ImageReadError("permission denied")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ImageReadError(f"cannot {doing} ({text[:160]})")
