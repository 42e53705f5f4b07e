"""Runs that stop early: what is kept is usable or gone, what is said is true, and an unfinished model
is never used as if it were finished."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.errors import MammaclsError
from mammacls.training import TrainConfig, TrainReporter, train_model

runner = CliRunner()
TINY = {"arch": "resnet18", "pretrained": False, "img_size": 32, "batch_size": 16}


class _StopAt(TrainReporter):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_done(self, epoch, loss):
        if epoch == self.epoch:
            raise KeyboardInterrupt  # Ctrl-C in the middle of that epoch


def _one_line(result, fragment: str, code: int) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error")]  # beside train's log
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_ctrl_c_before_the_first_epoch_says_nothing_was_saved(prepared, cache, monkeypatch):
    from mammacls.training import batches

    def interrupt(self, epoch, reporter):
        raise KeyboardInterrupt

    monkeypatch.setattr(batches.EpochRunner, "run", interrupt)
    result = runner.invoke(app, ["train", *"--arch resnet18 --no-pretrained --epochs 2 --img-size 32".split(),
                                 "--data", str(prepared[0]), "--name", "early"])
    _one_line(result, "interrupted before the first epoch finished: nothing was saved", 130)
    assert not (cache / "models" / "early").exists()


@pytest.mark.slow
def test_an_unfinished_model_is_refused_by_predict_and_evaluate_unless_allowed(prepared, cache, tmp_path):
    from PIL import Image

    from tests.conftest import textured_image

    import numpy as np

    with pytest.raises(KeyboardInterrupt) as stopped:
        train_model(TrainConfig(epochs=3, **TINY), data_dir=prepared[0], name="cut", reporter=_StopAt(2))
    assert stopped.value.epochs_saved == 1  # epoch 1 is kept, resumable
    train_model(TrainConfig(epochs=1, **TINY), data_dir=prepared[0], name="done")
    scan = tmp_path / "scan.png"
    Image.fromarray(textured_image(np.random.default_rng(0), 1)).save(scan)
    _one_line(runner.invoke(app, ["predict", str(scan), "--model", "cut"]),
              "model cut did not finish training (no calibration, no refusal gate): continue it with "
              "mammacls train --resume --name cut, or pass --allow-unfinished", 1)
    allowed = runner.invoke(app, ["predict", str(scan), "--model", "cut", "--allow-unfinished", "--json"])
    assert allowed.exit_code == 0, allowed.stderr
    document = json.loads(allowed.stdout)
    assert document["calibrated"] is False and document["model"]["finished"] is False
    assert "did not finish training" in allowed.stderr
    _one_line(runner.invoke(app, ["evaluate", "--model", "cut"]), "model cut did not finish training", 1)
    listed = runner.invoke(app, ["evaluate", "--json", "--bootstrap", "100", "--data", str(prepared[0])])
    assert listed.exit_code == 0, listed.stderr
    assert [m["name"] for m in json.loads(listed.stdout)["models"]] == ["done"]
    assert "left out cut: its training did not finish" in listed.stderr
    import mammacls

    with pytest.raises(MammaclsError, match="did not finish"):
        mammacls.load_model("cut")
    resumed = train_model(TrainConfig(), resume=True, name="cut")
    assert resumed.training.status == "complete" and mammacls.load_model("cut").calibrated is True


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_a_resumable_run_or_nothing(prepared, cache, monkeypatch):
    from mammacls.training import loop

    real = loop.write_checkpoint
    calls = []

    def full_disk_at(call: int):
        def write(path, *args, **kwargs):
            calls.append(path)
            if len(calls) >= call:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, *args, **kwargs)
        return write

    monkeypatch.setattr(loop, "write_checkpoint", full_disk_at(2))
    with pytest.raises(MammaclsError, match="cannot write .*checkpoint.safetensors: No space left on device; "
                                            "the last finished epoch is kept") as failed:
        train_model(TrainConfig(epochs=3, **TINY), data_dir=prepared[0], name="full")
    assert "\n" not in str(failed.value)
    assert (cache / "models" / "full" / "checkpoint.safetensors").is_file()  # epoch 1: resume works
    calls.clear()
    monkeypatch.setattr(loop, "write_checkpoint", full_disk_at(1))
    with pytest.raises(MammaclsError, match="nothing of first was kept"):
        train_model(TrainConfig(epochs=2, **TINY), data_dir=prepared[0], name="first")
    assert not (cache / "models" / "first").exists()  # no leftover: the name is free again
    monkeypatch.setattr(loop, "write_checkpoint", real)
    assert train_model(TrainConfig(epochs=1, **TINY), data_dir=prepared[0], name="first").training.status == "complete"


def test_a_libraries_full_disk_error_becomes_an_oserror_naming_the_file(tmp_path):
    from mammacls.store import writing

    class SafetensorError(Exception):
        pass

    with pytest.raises(OSError) as raised:
        with writing(tmp_path / "model.safetensors"):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "model.safetensors")
    with pytest.raises(ValueError):  # anything else passes through untouched
        with writing(tmp_path / "x"):
            raise ValueError("not a write error")


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_full_disk_in_prepare_is_one_line_and_keeps_the_dataset_before(busi_dir, cache, monkeypatch):
    import numpy as np

    first = runner.invoke(app, ["prepare", str(busi_dir[0]), "--json"])
    assert first.exit_code == 0, first.stderr
    datasets = cache / "datasets"
    before = (_tree_size(datasets), sorted(p.name for p in datasets.iterdir()))
    real_save, saved = np.save, []

    def full_disk(path, *args, **kwargs):
        if len(saved) >= 5:  # a few images in: the disk fills
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(path)
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(np, "save", full_disk)
    again = runner.invoke(app, ["prepare", str(busi_dir[0])])
    _one_line(again, "No space left on device; the dataset prepared before is unchanged", 1)
    assert (_tree_size(datasets), sorted(p.name for p in datasets.iterdir())) == before  # nothing left behind


def test_a_full_disk_under_predict_output_is_one_line_and_resumable(tiny_model, use_session_cache, busi_dir,
                                                                    tmp_path, monkeypatch):
    from mammacls.inference import results_file

    out = tmp_path / "results.jsonl"
    real_write, calls = results_file.ResultsFile.write, []

    def full_after_one_batch(self, records):
        if records:
            calls.append(len(records))
        if len(calls) > 1:
            self._handle.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return real_write(self, records)

    monkeypatch.setattr(results_file.ResultsFile, "write", full_after_one_batch)
    folder = str(busi_dir[0] / "benign")
    failed = runner.invoke(app, ["predict", folder, "--model", "tiny", "--output", str(out), "--batch-size", "4"])
    _one_line(failed, f"cannot write {out}: No space left on device; the records written before are kept", 1)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kept) == calls[0] > 0
    monkeypatch.setattr(results_file.ResultsFile, "write", real_write)
    resumed = runner.invoke(app, ["predict", folder, "--model", "tiny", "--output", str(out), "--resume"])
    assert resumed.exit_code in (0, 1), resumed.stderr  # 1: the planted corrupt image is an error record
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert len(paths) == len(set(paths)) and len(paths) > len(kept)  # every input once


def test_the_steps_after_the_last_epoch_are_named_in_a_log(prepared, cache):
    done = runner.invoke(app, ["train", *"--arch resnet18 --no-pretrained --epochs 1 --img-size 32".split(),
                               "--data", str(prepared[0]), "--name", "logged"])
    assert done.exit_code == 0, done.stderr
    shown = done.stdout + done.stderr
    assert "calibrating on validation, fitting the refusal densities …" in shown
    assert shown.index("calibrating on validation") < shown.index("saved logged")
