import json
import shlex
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mammacls import __version__
from mammacls.cli import _report_option_value, app
from tests.conftest import readme_quickstart_commands, real_busi_or_skip, textured_image

runner = CliRunner()


def _one_line_error(result, fragment: str, code: int = 1) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_help_and_import_do_not_load_torch():
    code = "import sys, mammacls.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mammacls", "--help"],
                          capture_output=True, text=True, check=True)
    assert "prepare" in done.stdout and "predict" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "sklearn" not in imported


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"mammacls {__version__}"


def test_prepare_json_is_one_document_on_stdout(busi_dir, cache, tmp_path):
    result = runner.invoke(app, ["prepare", str(busi_dir[0]), "--json", "--seed", "3"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    for key in ("manifest", "counts", "duplicate_groups", "conflicts", "skipped"):
        assert key in document
    assert Path(document["manifest"]).is_file()
    assert document["conflicts"] == 1 and len(document["skipped"]) == 1
    assert "train" in result.stderr  # the summary table went to stderr
    assert (cache / "latest_dataset.txt").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["prepare", "/definitely/not/here"], "dataset not found"),
    (["prepare", "."], "no class folders"),
    (["train", "--no-pretrained", "--epochs", "1"], "no prepared dataset yet"),
    (["evaluate"], "no trained models"),
    (["predict", "x.png"], "no shipped default model in this installation"),
    (["predict", "x.png", "--model", "missing-model"], "no model named"),
    (["predict", "nothing-here.png"], "file not found: nothing-here.png"),
])
def test_bad_input_is_one_clear_line(args, fragment, cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((80, 80), 90, dtype=np.uint8)).save(tmp_path / "x.png")  # the model is the problem
    monkeypatch.setattr("mammacls.inference.model_files.shipped_model_dir", lambda: None)  # as if none were installed
    _one_line_error(runner.invoke(app, args), fragment)


def test_usage_errors_exit_2(cache):
    assert runner.invoke(app, ["train", "--epochs", "many"]).exit_code == 2
    assert runner.invoke(app, ["predict"]).exit_code == 2
    unknown = runner.invoke(app, ["train", "--arch", "alexnet", "--no-pretrained"])  # a choice is parsed as an option
    assert unknown.exit_code == 2 and "unknown architecture 'alexnet'" in unknown.stderr
    assert "choose one of" in unknown.stderr and "mobilenet_v2" in unknown.stderr


def test_train_cli_saves_a_model(prepared, cache):
    result = runner.invoke(app, ["train", "--arch", "resnet18", "--no-pretrained", "--epochs", "1",
                                 "--img-size", "32", "--data", str(prepared[0]), "--name", "cli", "--json"])
    assert result.exit_code == 0, result.stderr
    meta = json.loads(result.stdout)
    assert meta["name"] == "cli" and meta["arch"] == "resnet18" and meta["preprocessing"]["img_size"] == 32
    assert (cache / "models" / "cli" / "model.safetensors").is_file()
    assert "epoch   1" in result.stderr


def test_evaluate_compares_all_cached_models_and_writes_a_report(tiny_model, use_session_cache, prepared,
                                                                 tmp_path):
    report_dir = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", "--data", str(prepared[0]), "--report", "--report-dir",
                                 str(report_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    [entry] = document["models"]
    metrics = entry["metrics"]
    for key in ("accuracy", "macro_f1", "roc_auc_macro", "roc_auc_weighted", "per_class", "confusion_matrix"):
        assert key in metrics
    assert set(metrics["per_class"]) == {"benign", "malignant", "normal"}
    assert set(metrics["per_class"]["benign"]) >= {"precision", "recall", "f1", "support"}
    assert sum(map(sum, metrics["confusion_matrix"])) == document["data"]["n"] == prepared[1]["counts"]["total"]["test"]
    html_text = (report_dir / "index.html").read_text()
    _assert_self_contained_html(html_text)
    assert "tiny" in html_text
    assert (report_dir / "confusion_matrix_tiny.png").stat().st_size > 5000
    assert (report_dir / "roc_tiny.png").is_file()
    assert json.loads((report_dir / "metrics.json").read_text())["models"][0]["name"] == "tiny"


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _assert_self_contained_html(text: str) -> None:
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert checker.images and all(src.startswith("data:image/png;base64,") for src in checker.images)
    assert "http://" not in text and "https://" not in text


def _write_inputs(folder: Path) -> dict[str, Path]:
    """Every kind of file predict must accept or reject with a reason."""
    rng = np.random.default_rng(0)
    gray = textured_image(rng, 1, size=(64, 48))
    folder.mkdir()
    files = {}
    files["rgb"] = folder / "scan (1) ü.png"
    Image.fromarray(np.stack([gray] * 3, -1)).save(files["rgb"])
    files["rgba"] = folder / "rgba.png"
    Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1)).save(files["rgba"])
    files["gray16"] = folder / "sixteen.tif"
    Image.fromarray(gray.astype(np.uint16) * 257).save(files["gray16"])
    files["palette"] = folder / "palette.bmp"
    Image.fromarray(gray).convert("P").save(files["palette"])
    files["exif_jpeg"] = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    Image.fromarray(gray).save(files["exif_jpeg"], exif=exif)
    bad = {}
    bad["empty"] = folder / "empty.png"
    bad["empty"].write_bytes(b"")
    bad["not_image"] = folder / "letter.png"
    bad["not_image"].write_text("Dear colleague, this is not an image.")
    bad["truncated"] = folder / "truncated.png"
    bad["truncated"].write_bytes(files["rgb"].read_bytes()[:300])
    bad["bomb"] = folder / "bomb.png"
    Image.new("1", (9000, 9000)).save(bad["bomb"])
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return {"ok": files, "bad": bad}


def test_predict_reports_bad_files_and_still_predicts_the_rest(tiny_model, use_session_cache, tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    missing = tmp_path / "in" / "missing.png"
    result = runner.invoke(app, ["predict", str(tmp_path / "in"), str(missing), "--model", "tiny", "--json"])
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["model"]["name"] == "tiny"
    predicted = {Path(p["path"]).name: p for p in document["predictions"]}
    assert set(predicted) == {p.name for p in inputs["ok"].values()}
    for p in predicted.values():
        assert p["label"] in ("benign", "malignant", "normal")
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    errors = {Path(e["path"]).name: e["error"] for e in document["errors"]}
    assert errors["empty.png"].startswith("empty file")
    assert "not an image" in errors["letter.png"]
    assert "cannot decode" in errors["truncated.png"]
    assert "too large" in errors["bomb.png"] and "before decoding" in errors["bomb.png"]
    assert errors["missing.png"] == "file not found"
    assert document["ignored_files"] == 1


def test_predict_converts_modes_like_training(tiny_model, use_session_cache, tmp_path):
    from mammacls.inference.images import load_grayscale

    inputs = _write_inputs(tmp_path / "in")["ok"]
    reference = load_grayscale(inputs["rgb"])
    assert np.array_equal(load_grayscale(inputs["rgba"]), reference)
    assert np.array_equal(load_grayscale(inputs["gray16"]), reference)
    assert np.array_equal(load_grayscale(inputs["palette"]), reference)
    rotated = load_grayscale(inputs["exif_jpeg"])
    assert rotated.shape == reference.shape[::-1]


def test_predict_survives_a_symlink_loop(tiny_model, use_session_cache, tmp_path):
    folder = tmp_path / "loop"
    folder.mkdir()
    Image.fromarray(textured_image(np.random.default_rng(1), 0)).save(folder / "a.png")
    (folder / "again").symlink_to(folder)
    result = runner.invoke(app, ["predict", str(folder), "--json"])
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["predictions"]) == 1


def test_predict_with_a_corrupt_model_file_is_a_clear_error(tmp_path, cache):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not safetensors at all")
    Image.fromarray(np.full((80, 80), 90, dtype=np.uint8)).save(tmp_path / "x.png")
    _one_line_error(runner.invoke(app, ["predict", str(tmp_path / "x.png"), "--model", str(fake)]),
                    "not a valid safetensors")


@pytest.mark.slow
@pytest.mark.realdata
def test_real_busi_end_to_end(real_busi_prepared, cache, tmp_path, monkeypatch):
    """The README quickstart's BUSI commands, as written, on the real dataset: prepare (the run's shared
    real_busi_prepared is that very line), 1-epoch train, evaluate --report, predict a test-split scan."""
    from mammacls.store import record_latest_dataset

    root = real_busi_or_skip()
    commands = [c for c in readme_quickstart_commands() if "BUS-BRA" not in c and "--model" not in c
                and "--name" not in c and "examples/" not in c and c.split()[1] != "serve"]
    assert [c.split()[1] for c in commands] == ["prepare", "train", "evaluate", "predict"]
    prepared_dir, summary = real_busi_prepared
    record_latest_dataset(prepared_dir)  # what that prepare left in the user's cache for the next lines
    monkeypatch.chdir(tmp_path)
    documents = []
    for command in commands[1:]:
        args = shlex.split(command.replace("../shared/data/Dataset_BUSI_with_GT", str(root)))[1:]
        args += [] if "--json" in args or args[0] == "train" else ["--json"]
        result = runner.invoke(app, _report_option_value(args))
        assert result.exit_code == 0, (command, result.stderr)
        documents.append(json.loads(result.stdout) if "--json" in args else None)
    _, evaluated, predicted = documents
    assert summary["images_found"] == 780
    assert summary["masks_attached"] == 798
    assert [p.name for p in (cache / "models").iterdir()] == [evaluated["models"][0]["name"]]  # the one trained
    assert evaluated["data"]["n"] == summary["counts"]["total"]["test"]
    metrics = evaluated["models"][0]["metrics"]  # one epoch proves nothing of skill; the scoring must add up
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == metrics["n"] == evaluated["data"]["n"]
    assert matrix.sum(axis=1).tolist() == [summary["counts"][c]["test"] for c in ("benign", "malignant", "normal")]
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    low, high = metrics["ci95"]["accuracy"]
    assert low <= metrics["accuracy"] <= high and high - low < 0.3
    _assert_self_contained_html((tmp_path / "mammacls-report" / "index.html").read_text())
    [prediction] = predicted["predictions"]
    scan = Path(prediction["path"])
    assert scan.parent == root / "malignant"
    rows = [line for line in (prepared_dir / "manifest.csv").read_text().splitlines()
            if line.startswith(f"malignant/{scan.name},")]
    assert rows and all(",test," in line for line in rows)  # the README's example is a test-split scan


def test_predict_on_a_folder_without_images_is_an_error(tiny_model, use_session_cache, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    _one_line_error(runner.invoke(app, ["predict", str(tmp_path / "docs")]), "no images found")


def test_evaluate_scores_every_image_of_a_busi_folder(tiny_model, use_session_cache, busi_dir, prepared):
    # the folder holds the model's own training images: refused unless --allow-overlap, then flagged
    refused = runner.invoke(app, ["evaluate", "--model", "tiny", "--data", str(busi_dir[0])])
    seen = prepared[1]["counts"]["total"]["train"] + prepared[1]["counts"]["total"]["val"]
    _one_line_error(refused, f"{seen} of 45 evaluation images overlap the training/validation data of model tiny")
    assert "--allow-overlap" in refused.stderr
    result = runner.invoke(app, ["evaluate", "--model", "tiny", "--data", str(busi_dir[0]), "--json",
                                 "--allow-overlap"])
    assert result.exit_code == 0, result.stderr
    assert "inflated" in result.stderr
    document = json.loads(result.stdout)
    overlap = document["models"][0]["overlap"]
    assert overlap["images"] >= seen and overlap["identical"] >= seen
    # every readable image, conflicts included; the corrupt one is reported as skipped
    assert document["data"]["n"] == 3 * 14 + 3
    assert [Path(s["path"]).name for s in document["data"]["skipped"]] == ["benign (104).png"]
    assert document["data"]["counts"] == {"benign": 14 + 2, "malignant": 14 + 1, "normal": 14}


def test_report_takes_an_optional_folder():
    from mammacls.cli import _report_option_value

    assert _report_option_value(["evaluate", "--report"]) == ["evaluate", "--report"]
    assert _report_option_value(["evaluate", "--report", "out"]) == ["evaluate", "--report", "--report-dir", "out"]
    assert _report_option_value(["evaluate", "--report=out", "--json"]) == [
        "evaluate", "--report", "--report-dir", "out", "--json"]
    assert _report_option_value(["evaluate", "--report", "--json"]) == ["evaluate", "--report", "--json"]
    assert _report_option_value(["predict", "--report", "x"]) == ["predict", "--report", "x"]


@pytest.mark.slow
def test_report_folder_through_the_installed_command(tiny_model, session_cache, prepared, tmp_path):
    """--report DIR as a shell passes it; on a machine without a GPU evaluate never imports torch
    (ONNX Runtime scores, the device is decided from the driver's files)."""
    import os

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mammacls", "evaluate", "--data", str(prepared[0]),
                           "--bootstrap", "100", "--report", str(tmp_path / "my report")],
                          capture_output=True, text=True, env={**os.environ, "MAMMACLS_CACHE_DIR": str(session_cache),
                                                               "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-1500:]
    assert (tmp_path / "my report" / "index.html").is_file()
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and not {"torch", "torchvision"} & imported


def test_json_errors_are_one_document_on_stdout_too(cache):
    result = runner.invoke(app, ["train", "--epochs", "0", "--json", "--no-pretrained"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"error": "--epochs must be at least 1 (got 0)", "parameter": "--epochs",
                                         "exit_code": 1}
    assert len(result.stderr.strip().splitlines()) == 1
    done = subprocess.run([sys.executable, "-m", "mammacls", "predict", "x.png", "--json", "--batch-size", "many"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--batch-size" in json.loads(done.stdout)["error"]
