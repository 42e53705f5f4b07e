"""DICOM input: decoders, photometric interpretations, ultrasound regions, cine loops, bad files,
and DICOM as a prepare/evaluate source; no patient field ever leaves the file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.inference.images import load_grayscale
from mammacls.inference.pixels import ImageReadError
from tests.conftest import real_busi_or_skip
from tests.dicom_files import (SECRET_PATIENT, jpeg_lossless_dicom, pdf_dicom, report_dicom,
                               ultrasound_dicom)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "benign_105.png"
runner = CliRunner()


def _example_gray() -> np.ndarray:
    return np.asarray(Image.open(EXAMPLE).convert("L"))


LOSSLESS = {
    "uncompressed": {},
    "monochrome1": {"photometric": "MONOCHROME1"},
    "16-bit": {"bits": 16},
    "rgb": {"photometric": "RGB"},
    "rle": {"compression": "rle"},
    "jpeg-ls": {"compression": "jpeg-ls"},
    "jpeg-2000": {"compression": "j2k"},
}


@pytest.mark.parametrize("variant", sorted(LOSSLESS))
def test_lossless_dicom_gives_the_png_pixels(tmp_path, variant):
    gray = _example_gray()
    path = ultrasound_dicom(tmp_path / "scan.dcm", gray, **LOSSLESS[variant])
    assert np.array_equal(load_grayscale(path), gray)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "RGB"])  # RGB is stored as YBR_FULL_422
def test_jpeg_baseline_dicom_is_close_to_the_png(tmp_path, photometric):
    gray = _example_gray()
    decoded = load_grayscale(ultrasound_dicom(tmp_path / "scan.dcm", gray, compression="jpeg",
                                              photometric=photometric))
    assert decoded.shape == gray.shape
    assert np.abs(decoded.astype(int) - gray.astype(int)).mean() < 2.0  # quality 92: small loss


def test_ultrasound_region_crops_away_the_scanner_interface(tmp_path):
    gray = _example_gray()
    height, width = gray.shape
    border = 40
    with_region = ultrasound_dicom(tmp_path / "region.dcm", gray, border=border,
                                   region=(border, border, border + width - 1, border + height - 1))
    without = ultrasound_dicom(tmp_path / "full.dcm", gray, border=border)
    stats: dict = {}
    assert np.array_equal(load_grayscale(with_region, stats), gray)
    assert stats["crop"] == (border, border, border + width - 1, border + height - 1)
    assert load_grayscale(without).shape == (height + 2 * border, width + 2 * border)


@pytest.mark.parametrize("maker, reason", [
    (pdf_dicom, "DICOM without pixel data (an encapsulated PDF)"),
    (report_dicom, "DICOM without pixel data (a structured report)"),
])
def test_documents_are_refused_with_a_reason(tmp_path, maker, reason):
    with pytest.raises(ImageReadError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_grayscale(maker(tmp_path / "doc.dcm"))


def test_codec_without_decoder_names_the_package(tmp_path):
    with pytest.raises(ImageReadError, match="no decoder installed for JPEG Lossless.*pip install pylibjpeg"):
        load_grayscale(jpeg_lossless_dicom(tmp_path / "lossless.dcm", _example_gray()))


def test_cine_is_refused_as_one_labelled_image(tmp_path):
    with pytest.raises(ImageReadError, match="cine loop of 3 frames"):
        load_grayscale(ultrasound_dicom(tmp_path / "cine.dcm", _example_gray(), frames=3))


def _dicom_folder(folder: Path) -> Path:
    gray = _example_gray()
    folder.mkdir()
    ultrasound_dicom(folder / "plain.dcm", gray)
    ultrasound_dicom(folder / "jpeg.dcm", gray, compression="jpeg", photometric="RGB")
    ultrasound_dicom(folder / "IM000003", gray, border=40,  # archives often have no extension
                     region=(40, 40, 40 + gray.shape[1] - 1, 40 + gray.shape[0] - 1))
    ultrasound_dicom(folder / "cine.dcm", gray, frames=4, compression="jpeg")
    pdf_dicom(folder / "report.dcm")
    jpeg_lossless_dicom(folder / "lossless.dcm", gray)
    (folder / "notes.dcm").write_text("not a DICOM file")
    return folder


def test_predict_reads_dicom_frames_and_reports_bad_files_one_line_each(tmp_path, cache):
    folder = _dicom_folder(tmp_path / "archive")
    result = runner.invoke(app, ["predict", str(folder), str(EXAMPLE), "--json"])
    assert result.exit_code == 1  # three unreadable files
    document = json.loads(result.stdout)
    by_path = {Path(p["path"]).name: p for p in document["predictions"]}
    assert set(by_path) == {"plain.dcm", "jpeg.dcm", "IM000003", "benign_105.png",
                            *(f"cine.dcm#frame={k}" for k in range(1, 5))}
    png = by_path["benign_105.png"]["probabilities"]
    for name in ("plain.dcm", "IM000003"):  # lossless, and the region crop restores the very image
        assert by_path[name]["probabilities"] == pytest.approx(png, abs=1e-4)
    assert by_path["cine.dcm#frame=2"]["frame"] == 2 and by_path["cine.dcm#frame=2"]["file"].endswith("cine.dcm")
    (summary,) = document["cine"]
    assert summary["frames"] == 4 and summary["status"] == "ok"
    assert summary["label"] == max(summary["probabilities"], key=summary["probabilities"].get)
    errors = {Path(e["path"]).name: e["error"] for e in document["errors"]}
    assert set(errors) == {"report.dcm", "lossless.dcm", "notes.dcm"}
    lines = [line for line in result.stderr.splitlines() if line.startswith("cannot predict")]
    assert len(lines) == 3 and all(len(line) < 250 for line in lines)
    assert SECRET_PATIENT not in result.stdout + result.stderr and "PID-SECRET" not in result.stdout + result.stderr


def test_dicom_csv_source_prepares_with_patients_grouped_and_nothing_identifying(tmp_path, cache, busi_dir):
    from mammacls.data.prepare import prepare_dataset
    from mammacls.evaluation.evaluate import load_eval_set

    root, _ = busi_dir
    folder = tmp_path / "dicoms"
    folder.mkdir()
    rows = []
    for k, source in enumerate(sorted(p for p in root.glob("*/*.png") if "_mask" not in p.name)[::2]):
        try:
            gray = np.asarray(Image.open(source).convert("L"))
        except OSError:  # the fixture's planted corrupt file
            continue
        dicom = ultrasound_dicom(folder / f"{k:03d}.dcm", gray, patient_id=f"PID-SECRET-{k // 2:04d}",
                                 compression="rle" if k % 3 == 0 else None)
        rows.append({"path": dicom.name, "label": source.parent.name})
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    summary = prepare_dataset(folder / "labels.csv", out=tmp_path / "prepared")
    manifest = list(csv.DictReader(open(tmp_path / "prepared" / "manifest.csv")))
    assert len(manifest) == len(rows) and not summary["skipped"]  # every DICOM decoded, none lost
    assert len({row["patient"] for row in manifest}) == len({int(Path(r["path"]).stem) // 2 for r in rows})
    patients = {}
    for row in manifest:
        patients.setdefault(row["patient"], set()).add(row["split"])
    assert patients and all(p.startswith("dcm-") for p in patients)
    assert all(len(splits) == 1 for splits in patients.values())  # a patient's two scans: one side
    written = "".join(p.read_text(errors="ignore") for p in (tmp_path / "prepared").rglob("*")
                      if p.is_file() and p.suffix in (".csv", ".json", ".txt"))
    assert "PID-SECRET" not in written and SECRET_PATIENT not in written
    eval_set = load_eval_set(folder / "labels.csv")  # evaluate --data on a DICOM source
    assert len(eval_set.images) == len(rows)


@pytest.mark.realdata
def test_busi_scans_as_compressed_dicom_predict_like_the_png(tmp_path, cache):
    busi = real_busi_or_skip()
    sources = [busi / "malignant" / "malignant (12).png", busi / "benign" / "benign (30).png"]
    folder = tmp_path / "busi-dicom"
    folder.mkdir()
    for source in sources:
        gray = np.asarray(Image.open(source).convert("L"))
        ultrasound_dicom(folder / f"{source.stem}.dcm", gray, compression="jpeg-ls")
    pngs = json.loads(runner.invoke(app, ["predict", *map(str, sources), "--json"]).stdout)["predictions"]
    dicoms = json.loads(runner.invoke(app, ["predict", str(folder), "--json"]).stdout)["predictions"]
    by_stem = {Path(p["path"]).stem: p for p in dicoms}
    for png in pngs:
        same = by_stem[Path(png["path"]).stem]
        assert same["label"] == png["label"]
        assert same["probabilities"] == pytest.approx(png["probabilities"], abs=1e-4)
