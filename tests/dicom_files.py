"""Ultrasound DICOM files built with pydicom from image arrays, as scanners write them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
SECRET_PATIENT = "Doe^Jane-SECRET"


def _dataset(sop_class: str, transfer_syntax: str, patient_id: str = "PID-SECRET-0001"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = SECRET_PATIENT, patient_id, "19700101"
    return ds


def _pixels(ds, frames: list[np.ndarray], photometric: str, bits: int = 8) -> None:
    first = frames[0]
    ds.Rows, ds.Columns = first.shape[:2]
    ds.SamplesPerPixel = 3 if first.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    dtype = np.uint8 if bits == 8 else np.uint16
    ds.PixelData = np.stack(frames).astype(dtype).tobytes()


def ultrasound_dicom(path: Path, gray: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 8,
                     frames: int = 1, compression: str | None = None,
                     region: tuple[int, int, int, int] | None = None, border: int = 0,
                     patient_id: str = "PID-SECRET-0001") -> Path:
    """A US DICOM of ``gray`` (uint8). ``border`` pads it with scanner UI (bright text-like blocks)
    around the image; ``region`` (x0, y0, x1, y1) then records where the image is."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    image = gray
    if border:
        canvas = np.zeros((gray.shape[0] + 2 * border, gray.shape[1] + 2 * border), np.uint8)
        canvas[:border // 2, :] = 255  # a white title bar
        canvas[-border // 2:, : canvas.shape[1] // 3] = 200
        canvas[border:border + gray.shape[0], border:border + gray.shape[1]] = gray
        image = canvas
    stack = [np.roll(image, 3 * k, axis=1) if k else image for k in range(frames)]  # a cine: moving probe
    ds = _dataset(US_MULTIFRAME_STORAGE if frames > 1 else US_IMAGE_STORAGE, ExplicitVRLittleEndian, patient_id)
    if photometric == "RGB" or photometric.startswith("YBR"):
        stack = [np.repeat(f[..., None], 3, axis=2) for f in stack]
        _pixels(ds, stack, "RGB")
    elif photometric == "MONOCHROME1":
        _pixels(ds, [(255 - f) for f in stack], "MONOCHROME1")
    elif bits == 16:
        _pixels(ds, [f.astype(np.uint16) * 257 for f in stack], "MONOCHROME2", bits=16)
    else:
        _pixels(ds, stack, "MONOCHROME2")
    if region is not None:
        item = Dataset()
        item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = 1, 1, 0
        (item.RegionLocationMinX0, item.RegionLocationMinY0,
         item.RegionLocationMaxX1, item.RegionLocationMaxY1) = region
        ds.SequenceOfUltrasoundRegions = Sequence([item])
    if compression:
        _compress(ds, compression, stack)
    ds.save_as(path, enforce_file_format=True)
    return path


def _compress(ds, compression: str, stack: list[np.ndarray]) -> None:
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

    if compression == "rle":
        ds.compress(RLELossless)
    elif compression == "jpeg-ls":
        ds.compress(JPEGLSLossless)
    elif compression in ("jpeg", "j2k"):  # what scanners write: JPEG baseline (YBR_FULL_422) or JPEG 2000
        encoded = []
        for frame in stack:
            buffer = io.BytesIO()
            image = Image.fromarray(frame)
            if compression == "jpeg":
                image.save(buffer, "JPEG", quality=92, subsampling=1 if frame.ndim == 3 else 0)
            else:
                image.save(buffer, "JPEG2000", irreversible=False, no_jp2=True)
            encoded.append(buffer.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if compression == "jpeg" else JPEG2000Lossless
        if compression == "jpeg" and ds.SamplesPerPixel == 3:
            ds.PhotometricInterpretation = "YBR_FULL_422"
        if compression == "jpeg":
            ds.LossyImageCompression = "01"
    else:
        raise ValueError(compression)


def pdf_dicom(path: Path) -> Path:
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _dataset(ENCAPSULATED_PDF_STORAGE, ExplicitVRLittleEndian)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.save_as(path, enforce_file_format=True)
    return path


def report_dicom(path: Path) -> Path:
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _dataset(BASIC_TEXT_SR_STORAGE, ExplicitVRLittleEndian)
    ds.ValueType = "CONTAINER"
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_lossless_dicom(path: Path, gray: np.ndarray) -> Path:
    """A JPEG Lossless (process 14) file: no decoder among our dependencies."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    ds = _dataset(US_IMAGE_STORAGE, JPEGLosslessSV1)
    _pixels(ds, [gray], "MONOCHROME2")
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 64 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path
