"""Reading any image a user may hand us, and turning it into model input.

Every path into a model (prepare, train, evaluate, predict) goes through
``load_grayscale`` and ``resize_square`` so that the pixels a model sees at
predict time are produced exactly as they were at training time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mammacls.errors import MammaclsError
from mammacls.inference.pixels import ImageReadError, InMemoryFile, check_dimensions, colour_fraction_rgb, read_error

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".dcm", ".dicom"})


_EXIF_ORIENTATION = 0x0112


def is_mask_name(path: Path) -> bool:
    """BUSI masks are named ``NAME_mask.png`` or ``NAME_mask_N.png``."""
    stem = path.stem
    if stem.endswith("_mask"):
        return True
    head, sep, tail = stem.rpartition("_mask_")
    return bool(sep) and bool(head) and tail.isdigit()


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_dicom(path: Path | InMemoryFile) -> bool:
    """A ``.dcm``/``.dicom`` name, or any other name holding a DICOM Part 10 file."""
    from mammacls.inference.dicom import has_dicom_preamble, is_dicom_name

    return is_dicom_name(path) or (path.suffix.lower() not in IMAGE_EXTENSIONS and has_dicom_preamble(path))


def load_grayscale(path: Path | InMemoryFile, stats: dict | None = None) -> np.ndarray:
    """Decode ``path`` into a 2-D uint8 grayscale array.

    Handles 1/8/16/32-bit grayscale, RGB(A), palette and EXIF-rotated images, and
    single-frame DICOM (cropped to its ultrasound region; cine loops are refused here:
    ``predict`` reads them frame by frame). Raises ImageReadError with a short reason
    for anything else. When ``stats`` is given it receives ``colour_fraction``: the
    share of strongly coloured pixels, which grayscale conversion would otherwise hide;
    for DICOM also ``crop`` (the ultrasound region, or None), ``frame_shape`` and
    ``patient_key`` (a one-way hash of Patient ID).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    in_memory = isinstance(path, InMemoryFile)
    path = path if in_memory else Path(path)
    if is_dicom(path):
        return _load_dicom_single_frame(path, stats)
    try:
        if not in_memory and path.is_dir():
            raise ImageReadError("is a directory")
        if (len(path.data) if in_memory else path.stat().st_size) == 0:
            raise ImageReadError("empty file (0 bytes)")
        with Image.open(path.stream() if in_memory else path) as img:
            check_dimensions(*img.size)
            frames = getattr(img, "n_frames", 1)
            if frames > 1:  # one policy for files and folders: never silently the first frame
                raise ImageReadError(f"animated or multi-page image of {frames} frames: mammacls classifies "
                                     "single frames (and DICOM cine loops frame by frame); save the frame you "
                                     "want as a PNG")
            img.load()
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # transpose copies: only when needed
                img = ImageOps.exif_transpose(img)
            if stats is not None:
                stats["colour_fraction"] = colour_fraction(img)
            return _to_gray_array(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # missing, forbidden, damaged
        raise read_error(exc, "decode image") from None


def _load_dicom_single_frame(path: Path | InMemoryFile, stats: dict | None) -> np.ndarray:
    from mammacls.inference.dicom import iter_frames, open_dicom

    dicom = open_dicom(path)
    if dicom.frames > 1:
        raise ImageReadError(f"cine loop of {dicom.frames} frames: give one frame per labelled image "
                             "(mammacls predict reads every frame)")
    if stats is not None:
        stats.update(crop=dicom.crop, frame_shape=dicom.frame_shape, patient_key=dicom.patient_key)
    return next(iter_frames(dicom, stats))


def to_grayscale(image, name: str = "image") -> tuple[np.ndarray, float]:
    """A PIL image or numpy array as 2-D uint8 gray and its colour fraction, converted exactly as
    files are. Arrays: H x W (uint8; uint16 as 16-bit PNGs; floats in [0, 1]) or H x W x 3/4 uint8."""
    from PIL import Image

    if hasattr(image, "getbands"):  # a PIL image
        return _to_gray_array(image), colour_fraction(image)
    if not isinstance(image, np.ndarray):
        raise MammaclsError(f"{name}: expected a file path, a PIL image or a numpy array, got {type(image).__name__}")
    what = f"{name}: {image.dtype} array of shape {image.shape}"
    if image.ndim == 3 and image.shape[2] in (3, 4) and image.dtype == np.uint8:
        pil = Image.fromarray(image, "RGB" if image.shape[2] == 3 else "RGBA")
        return _to_gray_array(pil), colour_fraction(pil)
    if image.ndim != 2:
        raise MammaclsError(f"{what}: expected H x W gray or H x W x 3/4 uint8 RGB(A)")
    check_dimensions(image.shape[1], image.shape[0], before_decoding=False)  # decoded already: size only
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image), 0.0
    if image.dtype == np.uint16:
        return np.rint(image / 257.0).astype(np.uint8), 0.0
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise MammaclsError(f"{what}: float images must hold values in [0, 1]")
        return np.rint(image * 255.0).astype(np.uint8), 0.0
    raise MammaclsError(f"{what}: use uint8, uint16 or floats in [0, 1]")


def _to_gray_array(img) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            # 16-bit data (and 32-bit ints holding it) map 0..65535 onto 0..255.
            scaled = np.clip(arr, 0, 65535) / 257.0
        return np.rint(scaled).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite transparent pixels onto black, the background of an ultrasound frame.
        rgba = img.convert("RGBA")
        from PIL import Image

        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # palette, CMYK, YCbCr, 1-bit: through RGB, as Pillow's luma needs
    if img.mode == "RGB":
        img = img.convert("L")
    return np.array(img, dtype=np.uint8)


def colour_fraction(img) -> float:
    """Share of pixels whose RGB channels differ by more than CHROMA_LIMIT (0 for gray images)."""
    if img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return 0.0
    return colour_fraction_rgb(np.asarray(img if img.mode == "RGB" else img.convert("RGB")))


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 image to ``size`` x ``size`` (area filter when shrinking)."""
    import cv2

    height, width = gray.shape[:2]
    interpolation = cv2.INTER_AREA if size < min(height, width) else cv2.INTER_LINEAR
    return cv2.resize(gray, (size, size), interpolation=interpolation)


def load_mask_union(paths: list[Path], shape: tuple[int, int], crop: tuple[int, int, int, int] | None = None,
                    full_shape: tuple[int, int] | None = None) -> np.ndarray:
    """OR together an image's mask files into one uint8 {0, 1} array of ``shape``.

    For a DICOM cropped to its ultrasound region (``crop`` = x0, y0, x1, y1 inside
    ``full_shape``), a mask drawn on the whole frame is cropped the same way.
    """
    from PIL import Image

    union = np.zeros(shape, dtype=np.uint8)
    for path in paths:
        with Image.open(path) as mask_img:
            mask = np.asarray(mask_img.convert("L"))
        if crop is not None and mask.shape == full_shape:
            mask = mask[crop[1]:crop[3] + 1, crop[0]:crop[2] + 1]
        if mask.shape != shape:
            raise ImageReadError(f"mask {path.name} is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}")
        union |= (mask > 127).astype(np.uint8)
    return union
