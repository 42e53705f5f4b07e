import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.errors import MammaclsError
from mammacls.predict import predict_paths
from tests.conftest import textured_image

runner = CliRunner()


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(5)
    for i in range(7):
        gray = textured_image(rng, i % 3, size=(70 + 9 * i, 50 + 5 * i))
        Image.fromarray(np.stack([gray] * 3, -1)).save(folder / f"scan {i}.png")
    return folder


def test_training_writes_an_onnx_export_recorded_in_metadata(tiny_model, session_cache):
    record = tiny_model.onnx
    folder = session_cache / "models" / "tiny"
    assert (folder / record.file).is_file()
    assert json.loads((folder / "metadata.json").read_text())["onnx"]["sha256"] == record.sha256
    import onnx

    props = {p.key: json.loads(p.value) for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert props["mammacls.img_size"] == 32 and props["mammacls.classes"] == ["benign", "malignant", "normal"]


def test_onnx_and_torch_probabilities_agree(tiny_model, use_session_cache, scans):
    fast = predict_paths([scans], model="tiny", backend="onnx", batch_size=3)
    eager = predict_paths([scans], model="tiny", backend="torch", batch_size=3)
    assert fast["model"]["backend"] == "onnxruntime" and eager["model"]["backend"] == "torch"
    assert [p["path"] for p in fast["predictions"]] == [p["path"] for p in eager["predictions"]]
    assert len(fast["predictions"]) == 7
    for a, b in zip(fast["predictions"], eager["predictions"]):
        for c in ("benign", "malignant", "normal"):
            assert a["probabilities"][c] == pytest.approx(b["probabilities"][c], abs=1e-4)


def test_cli_predict_on_cpu_never_imports_torch(tiny_model, session_cache, scans):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mammacls", "predict", str(scans / "scan 0.png"), "--model", "tiny",
         "--json"],
        capture_output=True, text=True, env={**_env(), "MAMMACLS_CACHE_DIR": str(session_cache)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "import time:" in line}
    assert "onnxruntime" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    assert json.loads(done.stdout)["model"]["backend"] == "onnxruntime"


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "MAMMACLS_CACHE_DIR"}


@pytest.fixture
def model_copy(tiny_model, session_cache, tmp_path) -> Path:
    folder = tmp_path / "tiny-copy"
    shutil.copytree(session_cache / "models" / "tiny", folder)
    return folder


def test_model_without_export_uses_torch_with_a_hint_then_export_fixes_it(model_copy, scans, cache):
    meta_path = model_copy / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["onnx"] = None
    meta.pop("digest")  # as a model of mammacls 0.1 was: no export, no digest
    meta_path.write_text(json.dumps(meta))
    (model_copy / "model.onnx").unlink()
    result = runner.invoke(app, ["predict", str(scans / "scan 1.png"), "--model", str(model_copy), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"]["backend"] == "torch"
    assert "mammacls export" in result.stderr
    result = runner.invoke(app, ["predict", str(scans / "scan 1.png"), "--model", str(model_copy),
                                 "--backend", "onnx"])
    assert result.exit_code == 1 and "has no ONNX export" in result.stderr
    result = runner.invoke(app, ["export", "--model", str(model_copy)])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["predict", str(scans / "scan 1.png"), "--model", str(model_copy), "--json"])
    assert json.loads(result.stdout)["model"]["backend"] == "onnxruntime"


def test_tampered_onnx_file_is_refused(model_copy, scans, cache):
    onnx_file = model_copy / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(MammaclsError, match="corrupt or modified"):
        predict_paths([scans], model=str(model_copy))


def test_unknown_backend_is_a_clear_error(tiny_model, use_session_cache, scans):
    result = runner.invoke(app, ["predict", str(scans), "--backend", "tensorrt"])
    assert result.exit_code == 2 and "unknown backend 'tensorrt'" in result.stderr and "onnx" in result.stderr


def test_prefetch_keeps_order_and_covers_every_file(tiny_model, use_session_cache, scans):
    for batch_size in (1, 2, 7, 50):
        result = predict_paths([scans], batch_size=batch_size)
        assert [Path(p["path"]).name for p in result["predictions"]] == [f"scan {i}.png" for i in range(7)]
