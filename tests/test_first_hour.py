"""What a new user meets in the first hour, through the console script as they would run it."""

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import build_busbra_fixture, build_busi_fixture, readme_quickstart_commands

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "mammacls"


def _run(args: list[str], env: dict, cwd: Path | None = None, timeout: int = 300,
         importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "mammacls", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _env(cache: Path, **extra) -> dict:
    return {**os.environ, "MAMMACLS_CACHE_DIR": str(cache), "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **extra}


def _imported(stderr: str) -> set[str]:
    """Top-level modules named by ``-X importtime``."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", stderr)}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line and not line.startswith("import time:")]


def _tree_digest(*folders: Path) -> str:
    """Names and bytes of every file under ``folders`` (caches of Python excluded)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(folder)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("first-hour")
    build_busi_fixture(root / "data" / "Dataset_BUSI_with_GT")
    build_busbra_fixture(root / "data" / "BUS-BRA")
    return {"busi": root / "data" / "Dataset_BUSI_with_GT", "busbra": root / "data" / "BUS-BRA"}


def test_help_lists_each_choice_once_by_what_it_takes(tmp_path):
    shown = {}
    for command in ("train", "predict", "prepare", "evaluate", "use", "serve"):
        done = _run([command, "--help"], _env(tmp_path))
        assert done.returncode == 0, done.stderr
        shown[command] = done.stdout
        options = done.stdout.split("Options")[-1]  # every option that takes text says what it takes
        assert "<str>" not in options and "<list[str]>" not in options, command
    assert "{PATH}..." in shown["predict"]
    for choices in ("resnet18|vgg16|mobilenet_v2", "light|standard|strong|scanner", "per-source|pooled|none",
                    "auto|fp32|bf16", "auto|channels-last|contiguous"):
        assert shown["train"].count(choices) == 1, (choices, shown["train"])
    for command in ("train", "predict", "evaluate", "serve"):  # each choice listed once, by its metavar
        assert shown[command].count("auto|cpu|cuda") == 1 and "auto | cpu | cuda" not in shown[command], command
    top = _run(["--help"], _env(tmp_path)).stdout
    assert "--version" in top and not re.search(r"--version\s+<bool>", top), top


def test_the_typer_app_itself_renders_the_choices():
    """The metavars come from the options Typer builds, not from anything done to Click's objects after."""
    from typer.testing import CliRunner

    from mammacls.cli import app

    shown = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "160"}).stdout
    assert "auto|onnx|torch" in shown and "auto|cpu|cuda" in shown and "K/N" in shown, shown


@pytest.mark.parametrize("args, message", [
    (["train", "--arch", "resnet50"], "unknown architecture 'resnet50': choose one of resnet18, vgg16, mobilenet_v2 "
                                      "(did you mean resnet18?)"),
    (["train", "--epochs", "0"], "--epochs must be at least 1"),
    (["predict", "nosuch.png"], "file not found: nosuch.png"),
])
def test_early_refusals_answer_before_torch_or_the_model_loads(tmp_path, args, message):
    done = _run(args, _env(tmp_path), cwd=tmp_path, importtime=True)
    assert done.returncode != 0
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and message in lines[0], lines
    assert not {"torch", "onnxruntime", "torchvision"} & _imported(done.stderr)


@pytest.mark.parametrize("args, message", [
    (["train", "--epochs", "many"], "Invalid value for '--epochs'"),
    (["predict"], "Missing argument"),
    (["train", "--nope"], "No such option: --nope"),
])
def test_usage_errors_are_one_line_too(tmp_path, args, message):
    done = _run(args, _env(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert f"(see mammacls {args[0]} --help)" in lines[0]


def test_obvious_architecture_spellings_are_accepted():
    from mammacls.training import TrainConfig

    for spelling, arch in (("VGG16", "vgg16"), ("MobileNet-V2", "mobilenet_v2"), ("mobilenetv2", "mobilenet_v2"),
                           ("ResNet-18", "resnet18")):
        config = TrainConfig(arch=spelling)
        config.validate()
        assert config.arch == arch


def test_report_dir_alone_writes_the_report(tiny_model, use_session_cache, prepared, tmp_path):
    from typer.testing import CliRunner

    from mammacls.cli import app

    out = tmp_path / "my-report"
    result = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--report-dir", str(out), "--bootstrap", "100"])
    assert result.exit_code == 0, result.stderr
    assert (out / "index.html").is_file() and (out / "metrics.json").is_file()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<th>kind</th>" in page and "<div class=models>" in page and "grid-template-columns" in page
    shown = result.stdout + result.stderr
    assert "confident (accuracy" not in shown  # the old wording read as a contradiction
    assert re.search(r"refusal: predict would reject \d+ of these images and mark \d+ uncertain", shown)


def test_rejected_prediction_shows_no_usable_label(tmp_path):
    """A blank frame is refused: the table shows — instead of a confident-looking label."""
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300), 128, dtype=np.uint8)).save(blank)
    done = _run(["predict", str(blank)], _env(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "blank.png" in line)
    assert "—" in row and "rejected" in row
    assert not re.search(r"\b(benign|malignant|normal)\b", row)
    assert "model: default" in done.stderr and "the shipped model" in done.stderr


def test_use_chooses_the_model_predict_uses_and_says_why(tiny_model, use_session_cache, tmp_path):
    from typer.testing import CliRunner

    from mammacls.cli import app
    from mammacls.store import record_chosen_model

    runner = CliRunner()
    image = REPO / "examples" / "benign_105.png"
    try:
        assert "default (shipped)" in runner.invoke(app, ["use"]).stdout
        before = runner.invoke(app, ["predict", str(image), "--json"])
        assert json.loads(before.stdout)["model"]["name"] == "default"  # training tiny did not switch it
        assert runner.invoke(app, ["use", "tiny"]).exit_code == 0
        after = runner.invoke(app, ["predict", str(image), "--json"])
        assert json.loads(after.stdout)["model"]["name"] == "tiny"
        assert "model: tiny" in after.stderr and "chosen with mammacls use" in after.stderr
        wrong = runner.invoke(app, ["use", "tinny"])
        assert wrong.exit_code != 0 and "did you mean tiny?" in wrong.stderr
    finally:
        record_chosen_model(None)


@pytest.mark.slow
def test_shipped_model_is_never_written_export_goes_to_the_cache(tmp_path):
    """export --model default: the ONNX copy lands in the cache, the package is untouched, and
    predict with the shipped model then runs without importing torch."""
    env = _env(tmp_path / "cache")
    before = _tree_digest(REPO / "weights", PACKAGE)
    done = _run(["export", "--model", "default"], env)
    assert done.returncode == 0, done.stderr
    assert "derived" in done.stdout + done.stderr
    assert list((tmp_path / "cache" / "derived").glob("*default*/model.onnx"))
    predicted = _run(["predict", str(REPO / "examples"), "--json"], env, importtime=True)
    assert predicted.returncode == 0, _error_lines(predicted.stderr)
    document = json.loads(predicted.stdout)
    assert document["model"]["backend"] == "onnxruntime" and "torch" not in _imported(predicted.stderr)
    labels = {Path(p["path"]).name.split("_")[0]: p["label"] for p in document["predictions"]}
    assert labels == {"benign": "benign", "malignant": "malignant", "normal": "normal"}
    assert _tree_digest(REPO / "weights", PACKAGE) == before


def _start_training(env: dict, name: str, epochs: int, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mammacls", "train", "--arch", "resnet18", "--no-pretrained",
                             "--epochs", str(epochs), "--img-size", "32", "--patience", "1000", "--name", name],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_concurrent_commands_refuse_in_one_true_line_and_sigterm_is_resumable(synthetic, tmp_path):
    """Real processes on one cache: a second train of the same name and a prepare of the dataset being
    trained on are refused naming the running train; predict beside it works; SIGTERM leaves a
    resumable run; a run stopped before its first epoch leaves no folder."""
    cache = tmp_path / "cache"
    env = _env(cache)
    assert _run(["prepare", str(synthetic["busi"])], env).returncode == 0
    first = _start_training(env, "x", 6, tmp_path)  # stopped after epoch 1, resumed to the end
    try:
        _wait_for(cache / "models" / "x" / "checkpoint.safetensors", first)
        first.send_signal(signal.SIGSTOP)  # paused mid-run, holding its locks, while the others try
        second = _run(["train", "--arch", "resnet18", "--no-pretrained", "--epochs", "1", "--name", "x"], env)
        lines = _error_lines(second.stderr)
        assert second.returncode != 0 and len(lines) == 1
        assert f"model x is in use by process {first.pid} (mammacls train --name x)" in lines[0]
        again = _run(["prepare", str(synthetic["busi"])], env)
        assert again.returncode != 0 and f"process {first.pid} (mammacls train --name x)" in again.stderr
        early = _run(["predict", str(synthetic["busi"] / "normal"), "--model", "x", "--json"], env)
        assert early.returncode == 1 and f"model x is still training (process {first.pid}" in early.stderr
        beside = _run(["predict", str(synthetic["busi"] / "normal"), "--model", "x", "--json", "--allow-unfinished"],
                      env)
        assert beside.returncode == 0, beside.stderr
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)  # delivered as soon as it runs again
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130 and "mammacls train --resume" in err
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert (cache / "models" / "x" / "checkpoint.safetensors").is_file()
    meta = json.loads((cache / "models" / "x" / "metadata.json").read_text())
    assert meta["training"]["status"] == "training" and meta["training"]["best_epoch"] >= 1
    early = _start_training(env, "early", 5, tmp_path)
    time.sleep(0.5)  # still importing: stopped long before its first epoch
    early.send_signal(signal.SIGTERM)
    early.communicate(timeout=120)
    assert not (cache / "models" / "early").exists()
    resumed = _run(["train", "--resume", "--name", "x", "--json"], env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["training"]["status"] == "complete"


def _serve_answers(line: str, cache: Path) -> None:
    """The README's serve line, on a free port: it prints its address, classifies an example, stops on SIGTERM."""
    import httpx

    server = subprocess.Popen([sys.executable, "-m", "mammacls", *shlex.split(line)[1:], "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "MAMMACLS_CACHE_DIR": str(cache)})
    try:
        first = server.stdout.readline()
        assert first.startswith("mammacls serve: http://127.0.0.1:"), first
        url = first.split()[2]
        scan = REPO / "examples" / "malignant_102.png"
        answer = httpx.post(f"{url}/v1/predict", files=[("files", (scan.name, scan.read_bytes()))], timeout=60)
        assert answer.json()["predictions"][0]["label"] == "malignant"
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)


@pytest.mark.slow
def test_readme_quickstart_walkthrough(synthetic, tmp_path, monkeypatch):
    """The Quickstart top to bottom on the synthetic set, in an empty cache: every command exits 0,
    predict uses the model the README says, and nothing under the package changes. (In one process,
    through the same Typer app the console script runs, to import torch once.)"""
    from typer.testing import CliRunner

    from mammacls.cli import _report_option_value, app
    from mammacls.nets.imagenet import hub_checkpoint_path, imagenet_weights

    commands = readme_quickstart_commands()
    assert any("prepare" in c and "BUS-BRA" in c for c in commands) and any("--lesion-map" in c for c in commands)
    have_imagenet = hub_checkpoint_path(imagenet_weights("mobilenet_v2", "IMAGENET1K_V1")).is_file()
    monkeypatch.setenv("MAMMACLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    before = _tree_digest(REPO / "weights", PACKAGE)
    for command in commands:
        line = (command.replace("../shared/data/Dataset_BUSI_with_GT", str(synthetic["busi"]))
                .replace("../shared/data/BUS-BRA", str(synthetic["busbra"]))
                .replace("examples/", str(REPO / "examples") + "/")
                .replace("malignant (106)", "malignant (1)"))  # the synthetic set is smaller
        line = re.sub(r"--epochs \d+", "--epochs 1", line)
        line = re.sub(r"--img-size \d+", "--img-size 32", line)
        if not have_imagenet:
            line = line.replace("--imagenet-weights IMAGENET1K_V1", "--no-pretrained")
        if line.startswith("mammacls serve"):  # runs until stopped: a real process, asked once, then SIGTERM
            _serve_answers(line, tmp_path / "cache")
            continue
        done = runner.invoke(app, _report_option_value(shlex.split(line)[1:]))
        assert done.exit_code == 0, (command, done.stderr[-2000:])
        if line.startswith("mammacls evaluate --model two-sources"):  # trained on both: a table per source
            shown = done.stdout + done.stderr
            assert "two-sources: per source" in shown and "BUS-BRA" in shown and "Dataset_BUSI_with_GT" in shown
        if line.startswith("mammacls predict"):
            expected = re.search(r"--model (\S+)", line)
            assert f"model: {expected.group(1) if expected else 'default'} " in done.stderr, (command, done.stderr)
    assert _tree_digest(REPO / "weights", PACKAGE) == before
    assert (tmp_path / "mammacls-report" / "index.html").is_file()


def test_calibrate_accepts_a_dataset_prepared_again_and_never_writes_a_read_only_model(
        tiny_model, use_session_cache, busi_dir, prepared, tmp_path, monkeypatch):
    """calibrate agrees with evaluate: a dataset prepared again elsewhere (other paths, same images and
    seed) is the model's; for the read-only shipped model the refit goes to the cache."""
    import shutil

    from mammacls.data.prepare import prepare_dataset

    from mammacls.store import record_latest_dataset

    elsewhere = tmp_path / "copy" / "Dataset_BUSI_with_GT"
    shutil.copytree(busi_dir[0], elsewhere)
    prepare_dataset(elsewhere, out=tmp_path / "prepared-again")  # now the latest; tiny's own folder stays too
    try:
        _recalibrate_a_read_only_copy(use_session_cache, tmp_path, monkeypatch)
    finally:
        record_latest_dataset(prepared[0])  # other tests use the session's dataset


def _recalibrate_a_read_only_copy(use_session_cache, tmp_path, monkeypatch):
    import shutil

    from mammacls.training import recalibrate
    from mammacls.inference.model_files import resolve_model

    shipped = tmp_path / "package" / "default"
    shutil.copytree(use_session_cache / "models" / "tiny", shipped)
    for leftover in ("model.onnx", "checkpoint.safetensors"):
        (shipped / leftover).unlink(missing_ok=True)
    meta = json.loads((shipped / "metadata.json").read_text())
    meta["onnx"] = None
    meta.pop("digest")  # a hand-made record, as a model of mammacls 0.2 had: no digest to check
    (shipped / "metadata.json").write_text(json.dumps(meta))
    training_data = json.loads((shipped / "training_data.json").read_text())
    training_data["prepared_dir"] = str(tmp_path / "gone")  # as on the machine that built it
    (shipped / "training_data.json").write_text(json.dumps(training_data))
    monkeypatch.setattr("mammacls.inference.model_files.shipped_model_dir", lambda: shipped)
    before = _tree_digest(shipped)
    ref = resolve_model("default")
    assert ref.read_only
    record = recalibrate(ref, device="cpu")
    assert _tree_digest(shipped) == before  # the package was not written
    overlay = ref.files_dir / "overlay.json"
    assert overlay.is_file() and (ref.files_dir / "ood.safetensors").is_file()
    assert record.temperature == json.loads(overlay.read_text())["calibration"]["temperature"]
    again = resolve_model("default")  # opened again: the refit is read from the cache
    assert again.card.refusal == record.refusal and again.card.calibration == record.calibration
    assert again.file("ood.safetensors").parent == ref.files_dir
    from mammacls.inference.gate import model_density

    assert model_density(again) is not None  # the refitted file, found and sha256-checked as predict does
