"""The torch-free inference package and the Python API: mammacls.load_model(...).predict(...)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mammacls
from mammacls.errors import MammaclsError
from mammacls.inference import Prediction
from tests.dicom_files import ultrasound_dicom

REPO = Path(__file__).resolve().parents[1]
INFERENCE = REPO / "src" / "mammacls" / "inference"
EXAMPLE = REPO / "examples" / "benign_105.png"
ALLOWED_PROJECT_MODULES = {"mammacls", "mammacls.errors", "mammacls.store", "mammacls.archs"}  # archs: plain data


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_nothing_under_inference_imports_torch_or_the_training_side():
    modules = sorted(INFERENCE.glob("*.py"))
    assert len(modules) >= 8
    for module in modules:
        for name in _imports(module):
            root = name.split(".")[0]
            assert root not in ("torch", "torchvision"), f"{module.name} imports {name}"
            if root == "mammacls":
                assert name in ALLOWED_PROJECT_MODULES or name.startswith("mammacls.inference"), \
                    f"{module.name} imports {name}: inference may only use errors, store, archs and itself"


def test_importing_every_inference_module_loads_no_torch():
    names = [f"mammacls.inference.{p.stem}" for p in sorted(INFERENCE.glob("*.py")) if p.stem != "__init__"]
    code = f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_readme_python_example_runs_without_torch(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code + "\nimport sys\nassert not any(m.split('.')[0] == 'torch' for m in sys.modules)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "MAMMACLS_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "benign" in done.stdout


def test_paths_pil_images_and_arrays_give_the_same_answer(cache):
    classifier = mammacls.load_model("default")
    gray = np.asarray(Image.open(EXAMPLE).convert("L"))
    inputs = [str(EXAMPLE), Image.open(EXAMPLE), gray, np.repeat(gray[..., None], 3, axis=2),
              gray.astype(np.uint16) * 257, gray / 255.0]
    answers = classifier.predict(inputs)
    assert len(answers) == len(inputs) and all(isinstance(a, Prediction) for a in answers)
    assert answers[0].source == str(EXAMPLE) and answers[2].source == "<image 2>"
    for answer in answers:
        assert answer.status == "ok" and answer.label == "benign"
        assert answer.probabilities == pytest.approx(answers[0].probabilities, abs=1e-5)
    assert classifier.predict(gray)[0].probabilities == pytest.approx(answers[0].probabilities, abs=1e-5)
    assert json.loads(json.dumps(answers[0].to_dict()))["label"] == "benign"


def test_the_gate_and_errors_answer_per_input(cache, tmp_path):
    classifier = mammacls.load_model("default")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    blank = np.zeros((300, 300), np.uint8)
    photo = np.random.default_rng(0).integers(0, 120, (300, 300, 3), dtype=np.uint8)
    photo[..., 0] += 120  # strongly red: not B-mode
    cine = ultrasound_dicom(tmp_path / "loop.dcm", np.asarray(Image.open(EXAMPLE).convert("L")), frames=3)
    answers = classifier.predict([broken, blank, photo, cine])
    assert [a.status for a in answers[:3]] == ["error", "rejected", "rejected"]
    assert "not an image" in answers[0].reason and "blank" in answers[1].reason and "coloured" in answers[2].reason
    loop = answers[3]
    assert len(loop.frames) == 3 and loop.frames[1].source.endswith("loop.dcm#frame=2") and loop.status == "ok"


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 4, 4), np.uint8), "expected H x W gray"),
    (np.full((64, 64), 2.0), "values in \\[0, 1\\]"),
    (np.zeros((64, 64), np.int64), "use uint8, uint16 or floats"),
    (42, "expected a file path, a PIL image or a numpy array, got int"),
])
def test_bad_array_inputs_name_the_argument(cache, bad, message):
    with pytest.raises(MammaclsError, match=r"images\[1\].*" + message):
        mammacls.load_model("default").predict([str(EXAMPLE), bad])


def test_predict_and_cli_agree(cache):
    from typer.testing import CliRunner

    from mammacls.cli import app

    result = CliRunner().invoke(app, ["predict", str(EXAMPLE), "--json"])
    (record,) = json.loads(result.stdout)["predictions"]
    (answer,) = mammacls.load_model().predict(str(EXAMPLE))
    assert (answer.label, answer.status, answer.probabilities) == (record["label"], record["status"],
                                                                    record["probabilities"])
