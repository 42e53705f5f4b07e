"""Shared fixtures: a synthetic BUSI-layout dataset, prepared once, and a tiny model."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if os.environ.get("PYTEST_XDIST_WORKER"):
    # tests side by side (pytest -n): one thread each, not two busy-waiting threads per worker on 2 cores;
    # subprocesses started by tests inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REAL_BUSI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Dataset_BUSI_with_GT"
IMAGES_PER_CLASS = 14
SIZE = (48, 40)  # width, height


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than the CPUs this process may use (measured on 2 cores: 7:48 with 3
    workers, 8:13 with 2): while one waits on a child process, a server or a browser, the others compute."""
    from mammacls.nets.compute import usable_cpus  # affinity and a container's CPU quota

    return usable_cpus() + 1


def pytest_collection_modifyitems(config, items):
    """Files by a rough cost, heaviest first (stable: a file stays whole and in order), so that under
    pytest -n (whole files per worker, in this order: ``--no-loadscope-reorder``) the long ones start at
    once and the short ones fill the gaps at the end, instead of one worker finishing a long file alone.
    A test costs 1, a slow one 10 more, one on the real data 20 more (measured: those take 20-100 s)."""
    cost: dict = {}
    for item in items:
        weight = 1 + 10 * bool(item.get_closest_marker("slow")) + 20 * bool(item.get_closest_marker("realdata"))
        cost[item.path] = cost.get(item.path, 0) + weight
    items.sort(key=lambda item: -cost[item.path])


def tiny_conv_net():
    """A batch-norm-free 1-channel, 3-class net of 55 weights, initialised from torch's current seed."""
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3))


def textured_image(rng: np.random.Generator, label_index: int, size=SIZE) -> np.ndarray:
    """Speckle plus a class-dependent blob, so that a tiny model has something to learn."""
    width, height = size
    img = rng.integers(0, 90, size=(height, width)).astype(np.float64)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.integers(10, height - 10), rng.integers(10, width - 10)
    radius = 4 + 4 * label_index
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] += 120 if label_index != 2 else 0
    return np.clip(img, 0, 255).astype(np.uint8)


def save_rgb(path: Path, gray: np.ndarray) -> None:
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(path)


def save_mask(path: Path, shape, filled: bool, rng) -> None:
    mask = np.zeros(shape, dtype=np.uint8)
    if filled:
        y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        mask[y:y + 8, x:x + 8] = 255
    Image.fromarray(mask).convert("1").save(path)


def build_busi_fixture(root: Path, seed: int = 0) -> dict:
    """benign/ malignant/ normal/ with masks, a planted exact and near duplicate,
    a cross-label conflict, a corrupt image and a non-image file."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    planted: dict = {}
    for k, label in enumerate(("benign", "malignant", "normal")):
        folder = root / label
        folder.mkdir()
        for i in range(1, IMAGES_PER_CLASS + 1):
            gray = textured_image(rng, k)
            name = f"{label} ({i})"
            save_rgb(folder / f"{name}.png", gray)
            save_mask(folder / f"{name}_mask.png", gray.shape, label != "normal", rng)
        # a second lesion mask for one image: must be attached, never an image
        save_mask(root / label / f"{label} (1)_mask_1.png", gray.shape, label != "normal", rng)
    benign = root / "benign"
    base = np.array(Image.open(benign / "benign (2).png").convert("L"))
    save_rgb(benign / "benign (101).png", base)  # exact duplicate (same pixels)
    noisy = np.clip(base.astype(int) + rng.integers(-3, 4, size=base.shape), 0, 255).astype(np.uint8)
    save_rgb(benign / "benign (102).png", noisy)  # near duplicate
    planted["exact"] = ("benign/benign (2).png", "benign/benign (101).png")
    planted["near"] = ("benign/benign (2).png", "benign/benign (102).png")
    conflict = np.array(Image.open(benign / "benign (3).png").convert("L"))
    save_rgb(root / "malignant" / "malignant (103).png", conflict)
    planted["conflict"] = ("benign/benign (3).png", "malignant/malignant (103).png")
    (benign / "benign (104).png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    planted["corrupt"] = "benign/benign (104).png"
    (benign / "notes.txt").write_text("not an image")
    return planted


@pytest.fixture(scope="session")
def busi_dir(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("busi") / "Dataset_BUSI_with_GT"
    planted = build_busi_fixture(root)
    return root, planted


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty mammacls cache for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MAMMACLS_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session-cache")


@pytest.fixture(scope="session")
def prepared(busi_dir, session_cache) -> tuple[Path, dict]:
    """The synthetic dataset prepared once (read-only for tests)."""
    from mammacls.data.prepare import prepare_dataset

    with pytest.MonkeyPatch.context() as patch:  # session scope: the monkeypatch fixture is per test
        patch.setenv("MAMMACLS_CACHE_DIR", str(session_cache))
        summary = prepare_dataset(busi_dir[0])
    return Path(summary["prepared_dir"]), summary


@pytest.fixture(scope="session")
def tiny_model(prepared, session_cache):
    """A 2-epoch resnet18 at 32 px trained on the synthetic set, in the session cache."""
    from mammacls.training import TrainConfig, train_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAMMACLS_CACHE_DIR", str(session_cache))
        return train_model(TrainConfig(arch="resnet18", pretrained=False, epochs=2, img_size=32, batch_size=16),
                           data_dir=prepared[0], name="tiny")


@pytest.fixture
def use_session_cache(session_cache, monkeypatch) -> Path:
    monkeypatch.setenv("MAMMACLS_CACHE_DIR", str(session_cache))
    return session_cache


def real_busi_or_skip() -> Path:
    if not REAL_BUSI.is_dir():
        pytest.skip(f"real BUSI copy not found at {REAL_BUSI}")
    return REAL_BUSI


def _once_for_the_run(tmp_path_factory, name: str, make) -> Path:
    """``make(folder)`` once for the whole run, all pytest -n workers together (a file lock in their
    common temporary folder); returns the folder. Tests use what it holds as a user's runs would (a
    training may add its resized-image cache beside a prepared dataset: atomic writes), never change it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (folder / "complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / "complete").write_text("")
    return folder


def _prepared_once_through_the_cli(tmp_path_factory, name: str, args: list[str]) -> tuple[Path, dict, str]:
    """``mammacls prepare ARGS --json`` once for the run (``_once_for_the_run``), in a cache of its own:
    the prepared folder, the JSON document it printed and what it wrote on stderr."""
    from typer.testing import CliRunner

    from mammacls.cli import app

    def make(folder: Path) -> None:
        done = CliRunner().invoke(app, ["prepare", *args, "--json"], env={"MAMMACLS_CACHE_DIR": str(folder / "cache")})
        assert done.exit_code == 0, done.stderr
        (folder / "prepare.json").write_text(done.stdout, encoding="utf-8")
        (folder / "prepare.stderr").write_text(done.stderr, encoding="utf-8")

    folder = _once_for_the_run(tmp_path_factory, name, make)
    document = json.loads((folder / "prepare.json").read_text(encoding="utf-8"))
    return Path(document["prepared_dir"]), document, (folder / "prepare.stderr").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def real_busi_prepared(tmp_path_factory) -> tuple[Path, dict]:
    """The README's BUSI ``mammacls prepare`` line, as written, on the real copy, once for the run (its
    --json document: what the prepared folder's summary.json holds), for every test that starts from a
    prepared BUSI: the README walk-through itself, the card's reproduction, the fast-path training."""
    root = real_busi_or_skip()
    [line] = [c for c in readme_quickstart_commands() if c.startswith("mammacls prepare") and "BUS-BRA" not in c]
    args = shlex.split(line.replace("../shared/data/Dataset_BUSI_with_GT", str(root)))[2:]  # after "mammacls prepare"
    prepared_dir, document, _ = _prepared_once_through_the_cli(tmp_path_factory, "real-busi", args)
    return prepared_dir, document


@pytest.fixture(scope="session")
def real_two_sources_prepared(tmp_path_factory) -> tuple[Path, dict, str]:
    """``mammacls prepare BUSI BUS-BRA --json`` on the real data, once for the run: the prepared folder,
    the JSON document it printed and what it wrote on stderr."""
    busi, busbra = real_busi_or_skip(), real_busbra_or_skip()
    return _prepared_once_through_the_cli(tmp_path_factory, "real-two-sources", [str(busi), str(busbra)])


REAL_BUSBRA = REAL_BUSI.parent / "BUS-BRA"


def build_busbra_fixture(root: Path, patients: int = 12, seed: int = 1) -> list[dict]:
    """BUS-BRA's layout: bus_data.csv (ID, Case, Pathology), Images/bus_NNNN-s.png, Masks/mask_NNNN-s.png.
    Each patient has a left and a right image (different scans), benign or malignant, no normals."""
    rng = np.random.default_rng(seed)
    (root / "Images").mkdir(parents=True)
    (root / "Masks").mkdir()
    rows = []
    for case in range(1, patients + 1):
        label = "malignant" if case % 3 == 0 else "benign"
        for side in ("l", "r"):
            image_id = f"bus_{case:04d}-{side}"
            gray = textured_image(rng, 1 if label == "malignant" else 0, size=(44, 52))
            Image.fromarray(gray).save(root / "Images" / f"{image_id}.png")
            save_mask(root / "Masks" / f"mask_{case:04d}-{side}.png", gray.shape, True, rng)
            rows.append({"ID": image_id, "Case": str(case), "Pathology": label})
    with open(root / "bus_data.csv", "w", newline="", encoding="utf-8") as handle:
        handle.write("ID,Case,Histology,Pathology,BIRADS,Device\n")
        for row in rows:
            handle.write(f"{row['ID']},{row['Case']},x,{row['Pathology']},4,GE Logiq 7\n")
    return rows


def real_busbra_or_skip() -> Path:
    if not REAL_BUSBRA.is_dir():
        pytest.skip(f"real BUS-BRA copy not found at {REAL_BUSBRA}")
    return REAL_BUSBRA


def readme_quickstart_commands() -> list[str]:
    """Every `mammacls` command of the README's Quickstart, in order, trailing comments removed."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("mammacls "):
                commands.append(line)
    return commands


def schema_errors(name: str, document: dict) -> list[str]:
    """Where ``document`` breaks the shipped JSON Schema ``name`` (empty: it validates)."""
    import jsonschema

    from mammacls.schemas import load_schema

    validator = jsonschema.Draft202012Validator(load_schema(name))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
