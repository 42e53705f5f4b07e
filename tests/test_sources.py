"""Several sources in one dataset: BUS-BRA's layout, a user's CSV, patients, duplicates across sources."""

import csv
import json
import shlex
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mammacls.data.prepare import PrepareOptions, prepare_dataset

from mammacls.data.prepared import load_prepared
from mammacls.errors import MammaclsError
from mammacls.data.sources import open_source, parse_source_spec, scan_source
from tests.conftest import build_busbra_fixture, readme_quickstart_commands, real_busbra_or_skip, real_busi_or_skip

REPO = Path(__file__).resolve().parents[1]


def _manifest(folder: Path) -> list[dict]:
    return load_prepared(folder).rows  # paths resolved against their source


def _straddling(rows: list[dict], key: str) -> list[str]:
    splits = defaultdict(set)
    for row in rows:
        if row[key]:
            splits[(row["source"], row[key])].add(row["split"])
    return [k for k, s in splits.items() if len(s) > 1]


def _write_csv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _partition(rows: list[dict], key: str) -> set[frozenset]:
    """The grouping of a manifest as a set of sets of sha256 (independent of group names)."""
    members = defaultdict(set)
    for row in rows:
        members[row[key]].add(row["sha256"])
    return {frozenset(m) for m in members.values()}


@pytest.fixture(scope="module")
def busbra_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("busbra") / "BUS-BRA"
    build_busbra_fixture(root)
    return root


def test_sources_are_recognised_from_their_own_files(busi_dir, busbra_dir, tmp_path):
    assert open_source(busi_dir[0]).kind == "busi"
    assert open_source(busbra_dir).kind == "bus-bra"
    table = _write_csv(tmp_path / "mine.csv", "path,label", ["a.png,benign"])
    assert (open_source(table).kind, open_source(table).name) == ("csv", "mine")
    assert parse_source_spec(f"hospitalA={busbra_dir}") == ("hospitalA", busbra_dir)
    assert parse_source_spec(str(busbra_dir)) == (None, busbra_dir)
    assert open_source(f"hospitalA={busbra_dir}").name == "hospitalA"


def test_busbra_reader_attaches_masks_and_patients(busbra_dir):
    scan = scan_source(open_source(busbra_dir))
    assert len(scan.records) == 24 and scan.missing_classes == ["normal"]
    first = scan.records[0]
    assert (first.relpath, first.patient, first.label) == ("Images/bus_0001-l.png", "1", "benign")
    assert [m.name for m in first.mask_paths] == ["mask_0001-l.png"]


def test_parent_folder_gets_a_hint_naming_the_sources_inside(busi_dir, tmp_path):
    parent = busi_dir[0].parent
    with pytest.raises(MammaclsError, match=r"did you mean .*Dataset_BUSI_with_GT\?") as info:
        open_source(parent)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("header, lines, message", [
    ("path,label", ["x.png,bening"], r"line 2: label 'bening' is not one of benign, malignant, normal"),
    ("file,label", ["x.png,benign"], r"lacks the column\(s\) path"),
    ("path,label", ["x.png,benign", "x.png,benign"], r"line 3: x.png is listed twice \(first on line 2\)"),
    ("path,label", ["missing.png,benign"], r"no readable image is listed"),
])
def test_bad_csv_sources_are_one_line_errors(tmp_path, cache, header, lines, message):
    table = _write_csv(tmp_path / "bad.csv", header, lines)
    with pytest.raises(MammaclsError, match=message) as info:
        prepare_dataset(table, out=tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_two_sources_with_one_name_are_refused(busi_dir, busbra_dir, cache, tmp_path):
    with pytest.raises(MammaclsError, match="two sources are named x"):
        prepare_dataset([f"x={busi_dir[0]}", f"x={busbra_dir}"], out=tmp_path / "out")
    with pytest.raises(MammaclsError, match="two sources are at"):
        prepare_dataset([busbra_dir, f"again={busbra_dir}"], out=tmp_path / "out")


def test_patients_stay_whole_and_each_source_keeps_its_own_split(busi_dir, busbra_dir, tmp_path, cache):
    alone = _manifest(Path(prepare_dataset(busi_dir[0], out=tmp_path / "busi")["prepared_dir"]))
    summary = prepare_dataset([busi_dir[0], busbra_dir], out=tmp_path / "both", options=PrepareOptions())
    rows = _manifest(tmp_path / "both")
    assert {r["source"] for r in rows} == {"Dataset_BUSI_with_GT", "BUS-BRA"}
    busi_rows = [r for r in rows if r["source"] == "Dataset_BUSI_with_GT"]
    # BUSI's split does not depend on what else is prepared with it
    assert [(r["path"], r["split"]) for r in busi_rows] == [(r["path"], r["split"]) for r in alone]
    bra_rows = [r for r in rows if r["source"] == "BUS-BRA"]
    assert len(bra_rows) == 24 and len({r["patient"] for r in bra_rows}) == 12
    assert not _straddling(rows, "patient") and not _straddling(rows, "group_id")
    assert {r["split"] for r in bra_rows} == {"train", "val", "test"}
    by_name = {s["name"]: s for s in summary["sources"]}
    assert by_name["BUS-BRA"]["patients"] == 12 and by_name["BUS-BRA"]["missing_classes"] == ["normal"]
    assert by_name["BUS-BRA"]["counts"]["total"]["total"] == 24
    assert by_name["Dataset_BUSI_with_GT"]["counts"]["total"]["total"] == len(alone)
    assert summary["patients"] == 12 and summary["missing_classes"] == []
    assert load_prepared(tmp_path / "both").source_names() == ["Dataset_BUSI_with_GT", "BUS-BRA"]


def test_a_duplicate_across_sources_joins_one_group_and_split(busi_dir, tmp_path, cache):
    """A hospital's CSV that holds a copy of a BUSI image: both copies end in one split."""
    root = busi_dir[0]
    alone = {r["path"]: r["split"] for r in _manifest(Path(prepare_dataset(root, out=tmp_path / "a")["prepared_dir"]))}
    extra = tmp_path / "hospital"
    extra.mkdir()
    rng = np.random.default_rng(4)
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(extra / f"own{i}.png")
        lines.append(f"own{i}.png,{'malignant' if i % 2 else 'benign'},p{i}")
    copied = {split: next(p for p, s in alone.items() if s == split and "/benign/" in p) for split in ("test", "train")}
    for split, source_path in copied.items():
        shutil.copy(source_path, extra / f"copy-of-{split}.png")
        lines.append(f"copy-of-{split}.png,benign,")
    table = _write_csv(extra / "labels.csv", "path,label,patient", lines)
    summary = prepare_dataset([root, table], out=tmp_path / "both")
    rows = {r["path"]: r for r in _manifest(tmp_path / "both")}
    assert summary["cross_source"]["groups"] >= 2 and summary["cross_source"]["duplicate_pairs"] >= 2
    for split, source_path in copied.items():
        twin = rows[str((extra / f"copy-of-{split}.png").resolve())]
        assert twin["group_id"] == rows[source_path]["group_id"]
        assert twin["split"] == rows[source_path]["split"] == split  # the earlier source decides
    assert {p: r["split"] for p, r in rows.items() if r["source"] == "Dataset_BUSI_with_GT"} == alone


def test_csv_source_prepares_the_same_as_the_busbra_reader(busbra_dir, tmp_path, cache):
    with open(busbra_dir / "bus_data.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    lines = [f"{busbra_dir / 'Images' / (r['ID'] + '.png')},{r['Pathology']},{r['Case']},"
             f"{busbra_dir / 'Masks' / ('mask_' + r['ID'][4:] + '.png')}" for r in table]
    as_csv = _write_csv(tmp_path / "busbra.csv", "path,label,patient,mask", lines)
    _assert_same_preparation(busbra_dir, as_csv, tmp_path)


def _assert_same_preparation(native: Path, as_csv: Path, tmp_path: Path) -> None:
    a = _manifest(Path(prepare_dataset(native, out=tmp_path / "native")["prepared_dir"]))
    b = _manifest(Path(prepare_dataset(as_csv, out=tmp_path / "csv")["prepared_dir"]))
    keep = ("path", "label", "split", "sha256", "width", "height", "mask_paths", "patient")
    assert [{k: r[k] for k in keep} for r in a] == [{k: r[k] for k in keep} for r in b]
    assert _partition(a, "group_id") == _partition(b, "group_id")
    assert all(r["mask_file"] for r in a + b)
    dataset_a, dataset_b = load_prepared(tmp_path / "native"), load_prepared(tmp_path / "csv")
    for ra, rb in zip(dataset_a.rows, dataset_b.rows):
        assert np.array_equal(dataset_a.load_mask(ra), dataset_b.load_mask(rb))


@pytest.mark.realdata
def test_real_busbra_rows_as_csv_prepare_the_same_as_the_native_reader(tmp_path, cache):
    """A few real BUS-BRA rows as path,label,patient,mask against a BUS-BRA folder holding those rows."""
    real = real_busbra_or_skip()
    with open(real / "bus_data.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header, table = reader.fieldnames, list(reader)
    picked = [r for r in table if int(r["Case"]) % 20 == 0][:40]
    assert len({r["Case"] for r in picked}) >= 10
    subset = tmp_path / "BUS-BRA"
    (subset / "Images").mkdir(parents=True)
    (subset / "Masks").mkdir()
    with open(subset / "bus_data.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(picked)
    lines = []
    for r in picked:
        image, mask = f"Images/{r['ID']}.png", f"Masks/mask_{r['ID'][4:]}.png"
        shutil.copy(real / image, subset / image)
        shutil.copy(real / mask, subset / mask)
        lines.append(f"{image},{r['Pathology']},{r['Case']},{mask}")
    as_csv = _write_csv(subset / "rows.csv", "path,label,patient,mask", lines)  # paths relative to the CSV
    _assert_same_preparation(subset, as_csv, tmp_path)


@pytest.mark.slow
@pytest.mark.realdata
def test_real_two_source_prepare_and_per_source_evaluation_of_the_shipped_model(real_two_sources_prepared, cache):
    """BUSI + BUS-BRA: BUSI's test split is today's 116 images, no patient or duplicate group straddles
    splits; the shipped (BUSI-only) model's BUSI figures equal its card, BUS-BRA gets its own block."""
    from typer.testing import CliRunner

    from mammacls.cli import app

    busi, busbra = real_busi_or_skip(), real_busbra_or_skip()
    runner = CliRunner()
    prepared_dir, summary, shown = real_two_sources_prepared  # mammacls prepare BUSI BUS-BRA --json
    assert "per source" in shown
    rows = _manifest(prepared_dir)
    card = json.loads((REPO / "weights" / "default" / "card_figures.json").read_text())
    busi_test = sorted(Path(r["path"]).relative_to(busi.resolve()).as_posix() for r in rows
                       if r["source"] == "Dataset_BUSI_with_GT" and r["split"] == "test")
    assert busi_test == card["test_images"]
    assert not _straddling(rows, "patient") and not _straddling(rows, "group_id")
    by_name = {s["name"]: s for s in summary["sources"]}
    bra = by_name["BUS-BRA"]
    assert (bra["images_used"], bra["patients"], bra["missing_classes"]) == (1499, 855, ["normal"])
    assert bra["counts"]["benign"]["total"] == 1037 and bra["counts"]["malignant"]["total"] == 462
    assert by_name["Dataset_BUSI_with_GT"]["images_used"] == 762
    assert summary["cross_source"]["groups"] == 0 and summary["conflicts"] == 8

    result = runner.invoke(app, ["evaluate", "--model", "default", "--data", str(prepared_dir), "--json",
                                 "--bootstrap", "200"])
    assert result.exit_code == 0, result.stderr
    assert "per source" in result.stderr
    metrics = json.loads(result.stdout)["models"][0]["metrics"]
    sources = metrics["sources"]
    assert set(sources) == {"Dataset_BUSI_with_GT", "BUS-BRA", "all sources"}
    selective, n = metrics["selective"], sources["all sources"]["n"]  # the mistakes, wrong and sure or not
    accepted = round(selective["coverage"] * n)
    assert selective["sure_errors"]["errors"] == accepted - round(selective["accuracy_accepted"] * accepted)
    by_source = selective["sure_errors_by_source"]
    assert set(by_source) == {"Dataset_BUSI_with_GT", "BUS-BRA"}
    assert sum(f["sure"] for f in by_source.values()) == selective["sure_errors"]["sure"]
    assert sum(f["errors"] for f in by_source.values()) == selective["sure_errors"]["errors"] > 0
    on_busi = sources["Dataset_BUSI_with_GT"]
    assert on_busi["n"] == card["n"] and on_busi["accuracy"] == pytest.approx(card["accuracy"], abs=1e-6)
    on_bra = sources["BUS-BRA"]
    assert on_bra["n"] == 225 and on_bra["classes_absent"] == ["normal"] and "recall_normal" not in on_bra
    low, high = on_bra["ci95"]["malignant_auc"]
    assert low <= on_bra["malignant_auc"] <= high and 0.0 < low < high < 1.0
    assert "malignant_sensitivity_at_set_spec90" in on_bra["ci95"]
    assert 0.0 <= on_bra["predicted_absent"]["normal"] <= 1.0
    # the README's external-validation line, as written: only the 225 BUS-BRA scans the model never saw
    [line] = [c for c in readme_quickstart_commands() if "--drop-overlap" in c]
    args = shlex.split(line.replace("../shared/data/BUS-BRA", str(busbra)))[1:] + ["--json", "--bootstrap", "200"]
    external = runner.invoke(app, args)
    assert external.exit_code == 0, external.stderr
    document = json.loads(external.stdout)
    assert document["data"]["n"] == 225 and len({d["path"] for d in document["data"]["dropped_overlap"]}) == 1274
    assert document["models"][0]["metrics"]["sources"]["BUS-BRA"]["malignant_auc"] == pytest.approx(
        on_bra["malignant_auc"], abs=1e-6)  # the same images as the prepared test split


def test_subset_metrics_score_only_the_classes_present():
    from mammacls.evaluation.metrics import compute_metrics, subset_metrics

    rng = np.random.default_rng(0)
    y = np.array([0] * 60 + [1] * 30)  # benign and malignant only
    p_mal = np.clip(np.where(y == 1, 0.7, 0.3) + rng.normal(0, 0.2, len(y)), 0.01, 0.98)
    p_normal = np.where(np.arange(len(y)) % 10 == 0, 5.0, 0.01)  # every 10th image called normal
    probabilities = np.stack([1 - p_mal, p_mal, p_normal], axis=1)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    m = subset_metrics(y, probabilities, val_threshold=0.5, resamples=300, seed=1)
    assert m["counts"] == {"benign": 60, "malignant": 30} and m["classes_absent"] == ["normal"]
    assert m["predicted_absent"]["normal"] == pytest.approx(0.1)
    assert "recall_normal" not in m and m["roc_auc_macro"] is None
    from sklearn.metrics import roc_auc_score

    assert m["malignant_auc"] == pytest.approx(roc_auc_score(y == 1, probabilities[:, 1]))
    for key in ("accuracy", "macro_f1", "malignant_auc", "malignant_sensitivity_at_set_spec90",
                "malignant_sensitivity_at_val_threshold"):
        low, high = m["ci95"][key]
        assert low <= m[key] <= high and high - low < 0.5, key
    # the 3-class figures say nothing about the absent class either
    full = compute_metrics(y, probabilities)
    assert full["per_class"]["normal"]["recall"] is None and full["per_class"]["normal"]["f1"] is None
    assert full["per_class"]["normal"]["precision"] == 0.0  # it was predicted, always wrongly


def test_evaluate_an_outside_csv_without_normals(tiny_model, use_session_cache, prepared, tmp_path):
    """External validation in one command: a hospital's benign/malignant CSV, never prepared."""
    from typer.testing import CliRunner

    from mammacls.cli import app
    from tests.conftest import textured_image

    rng = np.random.default_rng(77)  # fresh images: not the model's training data
    outside = tmp_path / "hospital"
    outside.mkdir()
    lines = []
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(16):
        label = "malignant" if i % 2 else "benign"
        # stripes: a structure the training images lack, so none is a near-duplicate of them
        stripes = 80 * (1 + np.sin((xx * np.cos(i) + yy * np.sin(i)) / (2 + i % 5)))
        gray = np.clip(textured_image(rng, i % 2, size=(64, 64)) * 0.3 + stripes, 0, 255).astype(np.uint8)
        Image.fromarray(gray).save(outside / f"scan{i}.png")
        lines.append(f"scan{i}.png,{label},patient{i // 2}")
    table = _write_csv(outside / "labels.csv", "path,label,patient", lines)
    result = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--data", str(table), "--json",
                                      "--bootstrap", "200"])
    assert result.exit_code == 0, result.stderr
    assert "classes absent from this set: normal" in result.stderr
    document = json.loads(result.stdout)
    assert document["data"]["classes_absent"] == ["normal"] and document["data"]["sources"] == {"hospital": 16}
    metrics = document["models"][0]["metrics"]
    assert metrics["per_class"]["normal"]["recall"] is None
    block = metrics["sources"]["hospital"]  # a generic labels.csv is named after its folder
    assert block["counts"] == {"benign": 8, "malignant": 8}
    assert {"malignant_auc", "malignant_sensitivity_at_set_spec90"} <= set(block["ci95"])
    assert set(block["predicted_absent"]) == {"normal"}
