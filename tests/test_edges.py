"""What a new user hit at the edges: GIFs, misleading messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pathlib import Path
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.errors import MammaclsError
from tests.conftest import save_rgb, textured_image

runner = CliRunner()


def _gif(path, frames: int) -> None:
    rng = np.random.default_rng(frames)
    images = [Image.fromarray(textured_image(rng, 1, size=(96, 80))) for _ in range(frames)]
    images[0].save(path, save_all=frames > 1, append_images=images[1:], duration=40)


def test_one_gif_policy_for_files_and_folders(tmp_path, tiny_model, use_session_cache):
    _gif(tmp_path / "still.gif", 1)
    _gif(tmp_path / "cine.gif", 5)
    for args in ([str(tmp_path / "still.gif"), str(tmp_path / "cine.gif")], [str(tmp_path)]):
        result = runner.invoke(app, ["predict", *args, "--model", "tiny", "--json"])
        assert result.exit_code == 1, result.stderr  # one input failed, the other was predicted
        document = json.loads(result.stdout)
        assert [p["path"].rsplit("/", 1)[-1] for p in document["predictions"]] == ["still.gif"]
        assert len(document["errors"]) == 1 and document["errors"][0]["path"].endswith("cine.gif")
        assert "animated or multi-page image of 5 frames" in document["errors"][0]["error"]
        assert document["ignored_files"] == 0


def test_too_few_images_to_split_says_which_count_is_short(tmp_path, cache):
    rng = np.random.default_rng(0)
    for k, label in enumerate(("benign", "malignant", "normal")):
        (tmp_path / "tiny" / label).mkdir(parents=True)
        for i in range(2):
            save_rgb(tmp_path / "tiny" / label / f"{label} ({i}).png", textured_image(rng, k))
    from mammacls.data.prepare import prepare_dataset

    with pytest.raises(MammaclsError) as refused:
        prepare_dataset(tmp_path / "tiny")
    assert "6 groups" in str(refused.value) and "2 in the largest class" in str(refused.value)


def _model_copy(use_session_cache, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(use_session_cache / "models" / "tiny", target)
    return target


def test_a_changed_weights_file_or_card_is_refused_whichever_backend_runs(tiny_model, use_session_cache, tmp_path):
    scan = tmp_path / "scan.png"
    Image.fromarray(textured_image(np.random.default_rng(0), 1)).save(scan)
    folder = _model_copy(use_session_cache, tmp_path)
    assert runner.invoke(app, ["predict", str(scan), "--model", str(folder)]).exit_code == 0
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    for backend in ("onnx", "torch"):
        result = runner.invoke(app, ["predict", str(scan), "--model", str(folder), "--backend", backend])
        assert result.exit_code == 1 and "model.safetensors does not match the sha256" in result.stderr, backend
        assert len(result.stderr.strip().splitlines()) == 1
    folder = _model_copy(use_session_cache, tmp_path / "again")
    record = json.loads((folder / "metadata.json").read_text())
    record["calibration"]["temperature"] = 5.0
    (folder / "metadata.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["predict", str(scan), "--model", str(folder)])
    assert result.exit_code == 1 and "metadata.json was changed after it was written" in result.stderr
    # the hint names what --model takes: the folder, not its basename
    record["calibration"]["temperature"] = tiny_model.calibration.temperature
    (folder / "metadata.json").write_text(json.dumps(record))
    (folder / "model.onnx").unlink()
    result = runner.invoke(app, ["predict", str(scan), "--model", str(folder), "--backend", "onnx"])
    assert f"mammacls export --model {folder}" in result.stderr


def test_evaluate_names_every_row_it_leaves_out(tiny_model, use_session_cache, tmp_path):
    rng = np.random.default_rng(3)
    lines = []
    for i in range(6):
        save_rgb(tmp_path / f"s{i}.png", textured_image(rng, i % 2))
        lines.append(f"s{i}.png,{'malignant' if i % 2 else 'benign'}")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes((tmp_path / "s0.png").read_bytes()[:60])
    lines += ["gone.png,benign", "empty.png,benign", "cut.png,malignant"]
    (tmp_path / "scans.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    result = runner.invoke(app, ["evaluate", "--model", "tiny", "--data", str(tmp_path / "scans.csv"),
                                 "--bootstrap", "100", "--allow-overlap"])
    assert result.exit_code == 0, result.stderr
    named = [line for line in result.stdout.splitlines() if line.startswith("skipped ")]  # no --json: stdout
    assert len(named) == 3 and {n.split(":")[0].rsplit("/", 1)[-1] for n in named} == {"gone.png", "empty.png",
                                                                                        "cut.png"}
    assert "6 images, 3 skipped" in result.stdout


def test_model_files_get_one_mode(tiny_model, use_session_cache):
    import os
    import stat

    folder = use_session_cache / "models" / "tiny"
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_near_duplicate_needs_the_thumbnails_to_agree_with_the_hash():
    from mammacls.data.dedup import near_duplicates

    hamming = np.array([[8, 8, 3, 12, 9]])
    correlation = np.array([[0.40, 0.87, 0.95, 0.98, 0.90]])
    # another lesion at distance 8 (0.40), BUSI's weakest true pair within 8 bits (0.87), a clear one,
    # a re-crop the hash misses but the thumbnails catch, and one too far for the hash and too weak
    assert near_duplicates(hamming, correlation).tolist() == [[False, True, True, True, False]]


def test_an_overlap_is_named_and_drop_overlap_scores_the_rest(tiny_model, use_session_cache, prepared, tmp_path):
    import shutil

    from mammacls.data.prepared import load_prepared

    train_row = load_prepared(prepared[0]).split("train")[0]
    shutil.copy(train_row["path"], tmp_path / "copy.png")
    rng = np.random.default_rng(11)
    lines = ["copy.png," + train_row["label"]]
    for i in range(8):
        save_rgb(tmp_path / f"new{i}.png", textured_image(rng, i % 3))
        lines.append(f"new{i}.png,{('benign', 'malignant', 'normal')[i % 3]}")
    (tmp_path / "manifest.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    data = str(tmp_path / "manifest.csv")
    refused = runner.invoke(app, ["evaluate", "--model", "tiny", "--data", data, "--bootstrap", "100"])
    assert refused.exit_code == 1
    lines_out = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines_out) == 1 and "1 of 9 evaluation images overlap" in lines_out[0]
    assert f"copy.png is a copy of Dataset_BUSI_with_GT:{Path(train_row['path']).name}" in lines_out[0]
    assert "--drop-overlap" in lines_out[0]
    dropped = runner.invoke(app, ["evaluate", "--model", "tiny", "--data", data, "--bootstrap", "100",
                                  "--drop-overlap", "--json"])
    assert dropped.exit_code == 0, dropped.stderr
    document = json.loads(dropped.stdout)
    assert document["data"]["n"] == 8 and len(document["data"]["dropped_overlap"]) == 1
    assert document["models"][0]["overlap"]["images"] == 0
    assert "8 images, 1 dropped as seen in training" in dropped.stderr
    assert document["data"]["sources"] == {tmp_path.name: 8}  # a generic manifest.csv: named after its folder


def test_a_killed_prepare_leaves_nothing_the_next_one_keeps(busi_dir, cache, tmp_path):
    import os

    from mammacls.data.prepare import prepare_dataset

    out = tmp_path / "elsewhere" / "prepared"  # beside the cache folder: only what prepare leaves there
    out.parent.mkdir()
    (out.parent / f".{out.name}.abc123.partial").mkdir()  # what kill -9 left behind
    ((out.parent / f".{out.name}.abc123.partial") / "decoded.npy").write_bytes(b"x" * 1000)
    locks = cache / "locks"
    locks.mkdir(parents=True)
    (locks / "dataset-x.999999.holder").write_text("process 999999 (mammacls prepare)")  # a dead process
    prepare_dataset(busi_dir[0], out=out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]
    assert not list(locks.glob("*.999999.holder"))
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current


def test_piped_tables_keep_intervals_on_one_line(prepared, tiny_model, use_session_cache):
    import subprocess
    import sys

    env = {**__import__("os").environ, "MAMMACLS_CACHE_DIR": str(use_session_cache)}
    env.pop("COLUMNS", None)
    done = subprocess.run([sys.executable, "-m", "mammacls", "evaluate", "--model", "tiny", "--data",
                           str(prepared[0]), "--bootstrap", "100"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("│ tiny")]  # tables: stdout without --json
    assert rows and all(line.count("[") == line.count("]") for line in rows)  # no interval split across lines


def test_the_report_says_what_a_reader_needs_to_trust_it(tiny_model, use_session_cache, prepared, tmp_path):
    """Issue 25 #11: statuses in the gallery, an external set called so, overlaps and refusals named,
    a class the set lacks shown as absent, specificity with its interval, a kind for every model, and
    the training curves."""
    import re
    import shutil

    from mammacls.data.prepared import load_prepared

    train_row = next(r for r in load_prepared(prepared[0]).split("train") if r["label"] != "normal")
    shutil.copy(train_row["path"], tmp_path / "seen.png")
    rng = np.random.default_rng(5)
    lines = ["seen.png," + train_row["label"]]
    for i in range(10):
        save_rgb(tmp_path / f"scan{i}.png", textured_image(rng, i % 2, size=(96, 80)))
        lines.append(f"scan{i}.png,{'malignant' if i % 2 else 'benign'}")
    Image.fromarray(np.full((80, 96), 128, dtype=np.uint8)).save(tmp_path / "blank.png")  # refused: a blank frame
    lines.append("blank.png,benign")
    (tmp_path / "hospital.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    done = runner.invoke(app, ["evaluate", "--model", "tiny", "--data", str(tmp_path / "hospital.csv"),
                               "--bootstrap", "100", "--allow-overlap", "--report", "--report-dir",
                               str(tmp_path / "report"), "--json"])
    assert done.exit_code == 0, done.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    document = json.loads(done.stdout)
    selective = document["models"][0]["metrics"]["selective"]
    rejected = {Path(r["path"]).name: r["reason"] for r in selective["rejected_images"]}
    assert len(rejected) == selective["rejected"] and "blank" in rejected["blank.png"]
    assert f"Rejected images ({len(rejected)})" in page and f"blank.png: {rejected['blank.png']}" in page
    assert "Misclassified images of the external set" in page and "test images" not in page
    assert re.search(r"status <(b|span class=flag)>(ok|uncertain|rejected)<", page)
    assert f"seen.png: identical of Dataset_BUSI_with_GT:{Path(train_row['path']).name}" in page
    assert re.search(r"<td>normal</td><td colspan=5>absent from this set \(\d+ images predicted normal\)", page)
    malignant = document["models"][0]["metrics"]["malignant"]
    low, high = malignant["specificity_ci95"]
    comparison = page.split("<h2>Comparison</h2>", 1)[1].split("</table>", 1)[0]
    assert f"<td>{malignant['specificity']:.3f} <small>[{low:.2f}–{high:.2f}]</small></td>" in comparison
    assert "<span class=tag>from scratch</span>" in page
    assert 'alt="training_curves tiny"' in page and (tmp_path / "report" / "training_curves_tiny.png").is_file()
