"""DICOM ultrasound files: frames as 2-D uint8 grayscale, cropped to the ultrasound region.

Scanners write MONOCHROME1/2, RGB or YBR_FULL(_422), 8 or 16 bits, single frames
or cine loops, often compressed (JPEG baseline, JPEG-LS, JPEG 2000, RLE). pydicom
decodes them through its plugins: Pillow (JPEG baseline, JPEG 2000), pyjpegls
(JPEG-LS) and its own RLE decoder; all permissively licensed. JPEG Lossless
(process 14) needs ``pylibjpeg-libjpeg`` (GPL), which is not a dependency: such
files are refused with the command that installs it.

Nothing here reads, prints or returns a patient-identifying field, except
``patient_key``: a one-way hash of Patient ID that lets ``prepare`` keep one
patient's scans on one side of a split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mammacls.inference.pixels import (MIN_SIDE, ImageReadError, InMemoryFile, check_dimensions, colour_fraction_rgb,
                                      read_error)

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})

# Storage classes that carry a document, not an image.
_NON_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "an encapsulated CDA document",
    "1.2.840.10008.5.1.4.1.1.66": "raw data",
}
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # structured reports

# Sequence of Ultrasound Regions: spatial format 1 = 2-D image, data type 1 = tissue.
_REGION_2D, _REGION_TISSUE = 1, 1

_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg"
_NEEDS_PACKAGE = {  # transfer syntaxes our dependencies cannot decode: short name, what can
    "1.2.840.10008.1.2.4.57": ("JPEG Lossless", _LIBJPEG),
    "1.2.840.10008.1.2.4.70": ("JPEG Lossless SV1", _LIBJPEG),
    "1.2.840.10008.1.2.4.51": ("JPEG Extended 12-bit", _LIBJPEG),
}


def has_dicom_preamble(path: Path | InMemoryFile) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble."""
    if isinstance(path, InMemoryFile):
        return path.data[128:132] == b"DICM"
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_name(path: Path | InMemoryFile) -> bool:
    return path.suffix.lower() in DICOM_EXTENSIONS


@dataclass
class DicomFile:
    """What a decoder needs to know, without any patient field."""
    path: Path | InMemoryFile
    dataset: object  # pydicom Dataset, header only (pixel data is read frame by frame)
    frames: int
    crop: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (inclusive) of the ultrasound region
    frame_shape: tuple[int, int]  # rows, columns before cropping
    patient_key: str


def open_dicom(path: Path | InMemoryFile) -> DicomFile:
    """Read the header of ``path`` and check that its pixels can be decoded (ImageReadError if not)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = path if isinstance(path, InMemoryFile) else Path(path)
    if isinstance(path, Path) and path.is_dir():
        raise ImageReadError("is a directory")
    try:
        ds = pydicom.dcmread(_readable(path), defer_size=1024)  # pixel data stays on disk
    except InvalidDicomError:
        raise ImageReadError("not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # pydicom raises many types for truncated or malformed files
        raise read_error(exc, "read DICOM") from None
    sop_class = str(ds.get("SOPClassUID", ""))
    if "PixelData" not in ds:
        what = _NON_IMAGE_CLASSES.get(sop_class) or ("a structured report" if sop_class.startswith(_SR_PREFIX)
                                                     else "no image")
        raise ImageReadError(f"DICOM without pixel data ({what})")
    _check_decodable(ds)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    check_dimensions(columns, rows, what="frame")
    if frames < 1:
        raise ImageReadError("DICOM with no frames")
    return DicomFile(path, ds, frames, ultrasound_region(ds, rows, columns), (rows, columns), _patient_key(ds))


def _readable(path: Path | InMemoryFile):
    return path.stream() if isinstance(path, InMemoryFile) else path


def _check_decodable(ds) -> None:
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        return  # implicit little endian without meta: pydicom reads it as such
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageReadError(f"unsupported DICOM transfer syntax {syntax} ({getattr(syntax, 'name', syntax)})") from None
    if not decoder.is_available:
        name, how = _NEEDS_PACKAGE.get(str(syntax), (syntax.name, "see pydicom's pixel data decoders"))
        raise ImageReadError(f"no decoder installed for {name} data: {how}")


def _patient_key(ds) -> str:
    """A one-way hash of Patient ID (and its issuer): groups a patient's files, names nobody."""
    patient = str(ds.get("PatientID", "") or "").strip()
    if not patient:
        return ""
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    return "dcm-" + hashlib.sha256(f"{issuer}\x00{patient}".encode()).hexdigest()[:16]


def ultrasound_region(ds, rows: int, columns: int) -> tuple[int, int, int, int] | None:
    """The largest 2-D tissue region of the Sequence of Ultrasound Regions, inside the frame.

    Falls back to the largest 2-D region of any data type; None when the file has none
    (then the whole frame is used).
    """
    regions = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            box = tuple(int(item.get(k)) for k in ("RegionLocationMinX0", "RegionLocationMinY0",
                                                   "RegionLocationMaxX1", "RegionLocationMaxY1"))
        except (TypeError, ValueError):
            continue
        x0, y0 = max(box[0], 0), max(box[1], 0)
        x1, y1 = min(box[2], columns - 1), min(box[3], rows - 1)
        if x1 - x0 + 1 < MIN_SIDE or y1 - y0 + 1 < MIN_SIDE:
            continue
        spatial = int(item.get("RegionSpatialFormat") or 0)
        tissue = int(item.get("RegionDataType") or 0) == _REGION_TISSUE
        regions.append((spatial == _REGION_2D, tissue, (x1 - x0 + 1) * (y1 - y0 + 1), (x0, y0, x1, y1)))
    two_d = [r for r in regions if r[0]]
    if not two_d:
        return None
    return max(two_d, key=lambda r: (r[1], r[2]))[3]


def iter_frames(dicom: DicomFile, stats: dict | None = None) -> Iterator[np.ndarray]:
    """Yield every frame as 2-D uint8 grayscale, cropped to the ultrasound region, one at a time
    (a long cine loop never sits in memory whole)."""
    from pydicom.pixels import iter_pixels

    ds = dicom.dataset
    try:
        for frame in iter_pixels(_readable(dicom.path)):  # from the file, frame by frame
            gray, colour = to_gray_uint8(frame, ds)
            if dicom.crop is not None:
                x0, y0, x1, y1 = dicom.crop
                gray = gray[y0:y1 + 1, x0:x1 + 1]
            if stats is not None:
                stats["colour_fraction"] = colour
            yield np.ascontiguousarray(gray)
    except ImageReadError:
        raise
    except Exception as exc:  # decoder plugins raise their own error types
        raise read_error(exc, "decode DICOM pixel data") from None


def to_gray_uint8(frame: np.ndarray, ds) -> tuple[np.ndarray, float]:
    """One decoded frame (pydicom gives RGB for YBR data) -> uint8 gray and its colour fraction."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if frame.ndim == 3:  # colour: RGB after pydicom's YBR conversion
        rgb = _to_uint8(frame, ds)
        colour = colour_fraction_rgb(rgb)
        from PIL import Image

        return np.asarray(Image.fromarray(rgb, "RGB").convert("L")), colour  # Pillow's luma, as for PNGs
    gray = _to_uint8(frame, ds)
    if photometric == "MONOCHROME1":  # 0 is white
        gray = 255 - gray
    return gray, 0.0


def _to_uint8(frame: np.ndarray, ds) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    values = frame.astype(np.float64)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None and frame.ndim == 2:
        center, width = (float(v[0] if hasattr(v, "__len__") and not isinstance(v, str) else v)
                         for v in (center, width))
        low, high = center - width / 2, center + width / 2
    else:  # the stored bit range, as 16-bit PNGs map 0..65535 onto 0..255
        bits = int(ds.get("BitsStored") or 8 * frame.dtype.itemsize)
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if high <= low:
        return np.zeros(frame.shape, dtype=np.uint8)
    return np.rint(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)
