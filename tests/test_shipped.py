"""The shipped default model: integrity, size, examples, and the model card's figures."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.errors import MammaclsError
from mammacls.inference.model_files import resolve_model
from mammacls.nets.weights import HALF_PRECISION_MIN_ELEMENTS, load_network, publish_model
from tests.conftest import real_busi_or_skip

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "default"
runner = CliRunner()


def test_shipped_model_is_small_verified_and_refuses_tampering(tmp_path):
    # the wheel must stay <= 80 MB: weights (float16 kernels) and the ONNX export together well below
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 75 * 1024 * 1024
    ref = resolve_model("default")
    assert ref.source == "shipped" and ref.card.arch in ("resnet18", "mobilenet_v2")
    assert ref.card.schema == "mammacls-model/2" and json.loads((SHIPPED / "metadata.json").read_text())["schema"] \
        == "mammacls-model/2"  # migrated on disk, not only when read
    assert ref.card.onnx.file == "model.onnx" and (SHIPPED / "model.onnx").is_file()
    assert "prepared_dir" not in (SHIPPED / "metadata.json").read_text()  # nothing of the build machine
    assert "prepared_dir" not in ref.sidecar("training_data")
    assert (SHIPPED / "metadata.json").stat().st_size < 20_000  # fingerprints live in training_data.json
    load_network(ref)  # sha256 checked on load
    copy = tmp_path / "default"
    shutil.copytree(SHIPPED, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(MammaclsError, match="does not match the sha256"):
        load_network(resolve_model(str(copy)))


def test_examples_predict_with_no_cache_and_no_dataset(cache):
    result = runner.invoke(app, ["predict", str(REPO / "examples"), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["model"]["source"] == "shipped"
    labels = {Path(p["path"]).name.split("_")[0]: p["label"] for p in document["predictions"]}
    assert labels == {"benign": "benign", "malignant": "malignant", "normal": "normal"}
    assert all(p["status"] == "ok" for p in document["predictions"])


def test_default_model_predicts_without_importing_torch(cache):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mammacls", "predict",
                           str(REPO / "examples" / "benign_105.png"), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "import time:" in line}
    assert "onnxruntime" in imported and not {m for m in imported if m == "torch" or m.startswith("torch.")}
    document = json.loads(done.stdout)
    assert document["model"]["source"] == "shipped" and document["model"]["backend"] == "onnxruntime"


def test_publish_keeps_small_tensors_float32_and_predictions_close(tiny_model, use_session_cache, tmp_path):
    from safetensors import safe_open

    from mammacls.nets.networks import predict_proba

    ref = resolve_model("tiny")
    record = publish_model(ref, tmp_path / "shipped")
    with safe_open(str(tmp_path / "shipped" / "model.safetensors"), framework="pt") as handle:
        dtypes = {k: (handle.get_slice(k).get_dtype(), int(np.prod(handle.get_slice(k).get_shape())))
                  for k in handle.keys()}
    assert any(d == "F16" for d, _ in dtypes.values())
    assert all((d == "F16") == (n >= HALF_PRECISION_MIN_ELEMENTS) for d, n in dtypes.values() if d in ("F16", "F32"))
    assert record.weights.storage_dtype.startswith("float16")
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    before = predict_proba(load_network(ref), images)
    after = predict_proba(load_network(resolve_model(str(tmp_path / "shipped"))), images)
    assert np.abs(before - after).max() < 1e-3


@pytest.mark.slow
@pytest.mark.realdata
def test_evaluate_default_reproduces_the_model_card(real_busi_prepared, cache):
    busi = real_busi_or_skip()
    card = json.loads((SHIPPED / "card_figures.json").read_text())
    from mammacls.data.prepared import load_prepared

    rows = load_prepared(real_busi_prepared[0]).rows
    test = sorted(Path(r["path"]).relative_to(busi.resolve()).as_posix() for r in rows if r["split"] == "test")
    assert test == card["test_images"]  # the same split
    result = runner.invoke(app, ["evaluate", "--model", "default", "--data", str(real_busi_prepared[0]), "--json"])
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["models"][0]["metrics"]
    # Counts are exact. Figures that follow from the confusion matrix alone match to rounding; figures that
    # depend on probabilities (AUC, intervals, temperature, ECE) may move slightly under another
    # torch/numpy/Python build: an AUC changes by 1/(31*85) ≈ 4e-4 when one malignant/other pair swaps order.
    assert metrics["n"] == card["n"] and metrics["confusion_matrix"] == card["confusion_matrix"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert metrics[key] == pytest.approx(card[key], abs=1e-9), key
    assert metrics["per_class"]["malignant"]["recall"] == pytest.approx(card["malignant_recall"], abs=1e-9)
    assert metrics["roc_auc_macro"] == pytest.approx(card["roc_auc_macro"], abs=2e-3)
    for key, interval in card["ci95"].items():
        assert metrics["ci95"][key] == pytest.approx(interval, abs=1e-2), key
    assert metrics["calibration"]["temperature"] == pytest.approx(card["temperature"], rel=1e-3)
    # normal answers have a temperature of their own; benign and malignant ones share the pooled one
    assert metrics["calibration"]["class_temperatures"] == pytest.approx(card["class_temperatures"], rel=1e-3)
    assert card["class_temperatures"][:2] == [card["temperature"]] * 2 and card["class_temperatures"][2] > 1.5
    assert metrics["calibration"]["after"]["ece"] == pytest.approx(card["ece_calibrated"], abs=2e-3)
