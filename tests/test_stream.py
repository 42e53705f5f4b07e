"""Streaming predict: results appended batch by batch, resumed after a kill, sharded."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.errors import MammaclsError
from mammacls.inference.inputs import in_shard, parse_shard
from mammacls.predict import predict_paths
from mammacls.inference.results_file import ResultsFile

runner = CliRunner()


def _scans(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        gray = rng.integers(0, 120, (64, 80), dtype=np.uint8)
        gray[20:40, 30:50] += 100
        paths.append(folder / f"scan{i:04d}.png")
        Image.fromarray(gray).save(paths[-1])
    return paths


def _records(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        return list(csv.DictReader(open(path, newline="")))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_results_file_resume_drops_what_a_kill_left_half_written(tmp_path):
    out = tmp_path / "results.jsonl"
    probs = {"benign": 0.5, "malignant": 0.3, "normal": 0.2}
    with ResultsFile(out) as sink:
        sink.write([{"path": "a.png", "label": "benign", "status": "ok", "probabilities": probs},
                    {"path": "bad.png", "status": "error", "error": "not an image"}])
        sink.write([{"path": "c.dcm#frame=1", "file": "c.dcm", "frame": 1, "label": "benign", "status": "ok"}])
    with open(out, "a") as handle:  # the cine's summary never came, and the last line was cut
        handle.write('{"path": "d.png", "lab')
    with ResultsFile(out, resume=True) as sink:
        assert sink.done == {"a.png", "bad.png"}
    assert [r["path"] for r in _records(out)] == ["a.png", "bad.png"]


def test_csv_results_resume_too(tmp_path):
    out = tmp_path / "results.csv"
    with ResultsFile(out) as sink:
        sink.write([{"path": "a.png", "label": "normal", "status": "ok",
                     "probabilities": {"benign": 0.1, "malignant": 0.1, "normal": 0.8}}])
    with open(out, "a") as handle:
        handle.write("b.png,,,,beni")
    with ResultsFile(out, resume=True) as sink:
        assert sink.done == {"a.png"}
    (row,) = _records(out)
    assert row["path"] == "a.png" and float(row["p_normal"]) == pytest.approx(0.8)


@pytest.mark.parametrize("name, resume, message", [
    ("results.txt", False, "name a .jsonl or .csv file"),
    ("exists.jsonl", False, "exists: add resume to continue it"),
])
def test_results_file_refusals(tmp_path, name, resume, message):
    (tmp_path / "exists.jsonl").write_text("")
    with pytest.raises(MammaclsError, match=message):
        ResultsFile(tmp_path / name, resume=resume)


def test_shards_partition_the_inputs():
    paths = [Path(f"archive/{i:05d}.dcm") for i in range(3000)]
    shards = [[p for p in paths if in_shard(p, (k, 4))] for k in range(1, 5)]
    assert sorted(p for s in shards for p in s) == sorted(paths)  # each input in exactly one shard
    assert all(600 < len(s) < 900 for s in shards)  # about a quarter each
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "x", "1/0", "2"):
        with pytest.raises(MammaclsError, match="K/N"):
            parse_shard(bad)


def test_sharded_runs_cover_every_input_once(tmp_path, cache):
    scans = _scans(tmp_path / "scans", 12)
    outputs = []
    for k in (1, 2, 3):
        outputs.append(tmp_path / f"shard{k}.csv")
        result = runner.invoke(app, ["predict", str(tmp_path / "scans"), "--shard", f"{k}/3",
                                     "--output", str(outputs[-1]), "--workers", "2"])
        assert result.exit_code == 0, result.stderr
        assert "records appended" in result.stdout
    seen = Counter(r["path"] for out in outputs for r in _records(out))
    assert set(seen) == {str(p) for p in scans} and set(seen.values()) == {1}


def test_streamed_results_match_the_in_memory_ones(tmp_path, cache):
    scans = _scans(tmp_path / "scans", 5)
    (tmp_path / "scans" / "broken.png").write_bytes(b"\x89PNG not really")
    in_memory = predict_paths([tmp_path / "scans"], batch_size=2)
    streamed = predict_paths([tmp_path / "scans"], batch_size=2, output=tmp_path / "r.jsonl")
    assert streamed["predictions"] == [] and streamed["status_counts"] == in_memory["status_counts"]
    records = _records(tmp_path / "r.jsonl")
    assert [r for r in records if r["status"] != "error"] == in_memory["predictions"]
    assert [r["path"] for r in records if r["status"] == "error"] == [str(tmp_path / "scans" / "broken.png")]
    assert len(records) == len(scans) + 1


@pytest.mark.slow
def test_kill_in_the_middle_then_resume_predicts_every_input_exactly_once(tmp_path, cache):
    scans = _scans(tmp_path / "scans", 80)
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "mammacls", "predict", str(tmp_path / "scans"), "--output", str(out),
               "--batch-size", "2", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "MAMMACLS_CACHE_DIR": str(cache)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    before = out.read_text().count("\n")
    assert 6 <= before < len(scans), "the kill should land in the middle of the run"
    done = subprocess.run(command + ["--resume"], capture_output=True, text=True,
                          env={**os.environ, "MAMMACLS_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr[-2000:]
    answered = re.search(r"(\d+) already answered", done.stdout)
    assert answered and int(answered.group(1)) >= 6
    seen = Counter(r["path"] for r in _records(out))
    assert set(seen) == {str(p) for p in scans} and set(seen.values()) == {1}


def test_resume_needs_an_output(tmp_path, cache):
    _scans(tmp_path / "scans", 1)
    result = runner.invoke(app, ["predict", str(tmp_path / "scans"), "--resume"])
    assert result.exit_code == 1 and "--resume needs --output" in result.stderr


def test_resume_refuses_another_model_or_shard(tmp_path, tiny_model, use_session_cache):
    _scans(tmp_path / "scans", 3)
    out = tmp_path / "r.jsonl"
    first = runner.invoke(app, ["predict", str(tmp_path / "scans"), "--output", str(out), "--shard", "1/2",
                                "--model", "default"])
    assert first.exit_code == 0, first.stderr
    meta = json.loads((tmp_path / "r.jsonl.meta.json").read_text())
    assert meta["model"] == "default" and meta["shard"] == "1/2"
    for extra, what in ((["--shard", "2/2", "--model", "default"], "shard"),
                        (["--shard", "1/2", "--model", "tiny"], "model sha256")):
        again = runner.invoke(app, ["predict", str(tmp_path / "scans"), "--output", str(out), "--resume", *extra])
        assert again.exit_code == 1 and f"was begun with {what}" in again.stderr
