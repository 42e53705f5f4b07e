"""Fuzz-style robustness of image reading: every input ends as an image or one clear reason."""

import io

import numpy as np
import pytest
from PIL import Image

from mammacls.inference.images import load_grayscale

from mammacls.inference.pixels import ImageReadError

FORMATS = [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("TIFF", ".tif")]
MODES = ["L", "RGB", "RGBA", "P", "I;16", "1", "LA", "CMYK", "F", "I"]


def _encode(rng, mode: str, fmt: str) -> bytes | None:
    width, height = int(rng.integers(16, 90)), int(rng.integers(16, 90))
    base = Image.fromarray(rng.integers(0, 255, size=(height, width, 3)).astype(np.uint8))
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65535, size=(height, width))).astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(rng.normal(size=(height, width)).astype(np.float32))
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 70000, size=(height, width)).astype(np.int32))
    else:
        img = base.convert(mode)
    buffer = io.BytesIO()
    try:
        img.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        return None  # this format cannot store this mode: nothing to test
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, suffix", FORMATS)
def test_every_mode_decodes_or_fails_with_a_reason(tmp_path, fmt, suffix):
    rng = np.random.default_rng(len(fmt))
    decoded = 0
    for i in range(60):
        mode = MODES[i % len(MODES)]
        data = _encode(rng, mode, fmt)
        if data is None:
            continue
        path = tmp_path / f"ü image ({i}){suffix}"
        mutation = i // len(MODES) % 4
        if mutation == 1:
            data = data[: max(1, int(len(data) * rng.uniform(0.05, 0.9)))]  # truncated
        elif mutation == 2:
            cut = int(rng.integers(8, max(9, len(data))))
            data = data[:cut] + bytes(rng.integers(0, 256, size=16).astype(np.uint8)) + data[cut + 16:]  # corrupted
        path.write_bytes(data)
        try:
            gray = load_grayscale(path)
        except ImageReadError as exc:
            assert str(exc) and "\n" not in str(exc)
            assert mutation in (1, 2), f"intact {mode} {fmt} refused: {exc}"
            continue
        decoded += 1
        assert gray.dtype == np.uint8 and gray.ndim == 2 and min(gray.shape) >= 16
    assert decoded >= 15


def test_random_bytes_are_never_an_image(tmp_path):
    rng = np.random.default_rng(9)
    for i in range(40):
        path = tmp_path / f"noise {i}.png"
        path.write_bytes(bytes(rng.integers(0, 256, size=int(rng.integers(0, 4000))).astype(np.uint8)))
        with pytest.raises(ImageReadError):
            load_grayscale(path)


def test_tiny_and_directory_inputs_are_refused(tmp_path):
    Image.new("L", (8, 200)).save(tmp_path / "sliver.png")
    with pytest.raises(ImageReadError, match="too small"):
        load_grayscale(tmp_path / "sliver.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        load_grayscale(tmp_path / "folder.png")
