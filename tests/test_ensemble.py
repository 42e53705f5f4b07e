"""Ensembles: several members saved as one model, run by every path, gated per member."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.errors import MammaclsError
from mammacls.inference.gate import distances
from mammacls.training.refusal import fit_density, robust_threshold

runner = CliRunner()


@pytest.fixture(scope="module")
def duo(prepared, session_cache, tmp_path_factory):
    """A 2-member mask-guided MobileNetV2 ensemble (random weights) assembled on the synthetic set."""
    import os

    import torch

    from mammacls.data.prepared import load_prepared
    from mammacls.training.ensemble import assemble_ensemble
    from mammacls.nets.networks import attach_lesion_decoder, build_model

    torch.manual_seed(0)
    members = [attach_lesion_decoder("mobilenet_v2", build_model("mobilenet_v2")).eval() for _ in range(2)]
    target = tmp_path_factory.mktemp("ensemble") / "duo"
    old = os.environ.get("MAMMACLS_CACHE_DIR")
    os.environ["MAMMACLS_CACHE_DIR"] = str(session_cache)
    try:
        record = assemble_ensemble([m.state_dict() for m in members], arch="mobilenet_v2", img_size=32,
                                   dataset=load_prepared(prepared[0]), name="duo", target=target,
                                   trained_on=[set(), set()])
    finally:
        if old is None:
            os.environ.pop("MAMMACLS_CACHE_DIR", None)
        else:
            os.environ["MAMMACLS_CACHE_DIR"] = old
    return {"dir": target, "record": record, "members": members}


def test_ensemble_averages_its_members_and_both_backends_agree(duo):
    from mammacls.nets.networks import predict_logits
    from mammacls.inference.onnx_backend import OnnxBackend
    from mammacls.runtime import TorchBackend
    from mammacls.inference.model_files import resolve_model
    from mammacls.nets.weights import load_network

    record = duo["record"]
    assert record.members == 2 and record.training.ensemble["members"] == 2 and record.mask_guided
    assert len(record.refusal.ood.member_thresholds) == 2
    assert record.refusal.ood.threshold == 1.0 and record.onnx.features
    ref = resolve_model(str(duo["dir"]))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    expected = np.mean([predict_logits(m, images) for m in duo["members"]], axis=0)
    assert np.abs(predict_logits(load_network(ref), images) - expected).max() < 1e-4
    onnx_logits, onnx_features = OnnxBackend(ref).logits_and_features(images)
    torch_logits, torch_features = TorchBackend(ref, "cpu").logits_and_features(images)
    assert onnx_features.shape == torch_features.shape == (5, 2 * 1280)  # the members' features side by side
    assert np.abs(onnx_logits - torch_logits).max() < 1e-3
    assert np.abs(onnx_features - torch_features).max() < 1e-3


def test_predict_explains_and_maps_lesions_with_an_ensemble(duo, busi_dir, tmp_path):
    scan = next(Path(busi_dir[0], "benign").glob("*[0-9].png"))
    result = runner.invoke(app, ["predict", str(scan), "--model", str(duo["dir"]), "--json",
                                 "--explain", str(tmp_path / "cam"), "--lesion-map", str(tmp_path / "lesion")])
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["predictions"][0]
    assert Path(entry["explanation"]).is_file() and Path(entry["lesion_map"]).is_file()
    assert entry["status"] in ("ok", "uncertain", "rejected") and "ood_distance" in entry
    plain = runner.invoke(app, ["predict", str(scan), "--model", str(duo["dir"]), "--json"])
    assert plain.exit_code == 0, plain.stderr
    assert json.loads(plain.stdout)["model"]["backend"] == "onnxruntime"


def test_members_that_saw_the_validation_images_are_refused(prepared, cache, tmp_path):
    import torch

    from mammacls.data.prepared import load_prepared
    from mammacls.training.ensemble import assemble_ensemble
    from mammacls.nets.networks import build_model

    dataset = load_prepared(prepared[0])
    seen = {dataset.split("val")[0]["sha256"]}
    torch.manual_seed(0)
    states = [build_model("resnet18").state_dict() for _ in range(2)]
    with pytest.raises(MammaclsError, match="member 2 trained on 1 validation images"):
        assemble_ensemble(states, arch="resnet18", img_size=32, dataset=dataset, name="x", target=tmp_path / "x",
                          trained_on=[set(), seen])
    assert not (tmp_path / "x").exists()
    with pytest.raises(MammaclsError, match="at least 2 members"):
        from mammacls.training.ensemble import stack_member_states

        stack_member_states(states[:1])


def test_one_odd_member_cannot_reject_alone_but_all_three_can():
    rng = np.random.default_rng(4)
    centres = rng.normal(0, 4, size=(3, 20))
    labels = rng.integers(0, 3, size=500)

    def members(points):  # three members see the same images, each in its own feature space
        return np.hstack([points, points * 2, -points])

    train = members(centres[labels] + rng.normal(size=(500, 20)))
    val = members(centres[rng.integers(0, 3, size=150)] + rng.normal(size=(150, 20)))
    fitted = fit_density(train, labels, val, 3, members=3, dims=8, spread=4.0)
    assert fitted["threshold"] == 1.0 and len(fitted["member_thresholds"]) == 3
    near = members(centres[rng.integers(0, 3, size=200)] + rng.normal(size=(200, 20)))
    odd = near.copy()
    odd[:, 20:40] += 40  # only the second member's features are far
    far = members(rng.normal(0, 4, size=(200, 20)) + 15)
    assert (distances(fitted["arrays"], near) <= 1.0).mean() >= 0.97
    assert (distances(fitted["arrays"], odd) <= 1.0).mean() >= 0.97
    assert (distances(fitted["arrays"], far) > 1.0).mean() >= 0.97


def test_robust_threshold_hardly_moves_with_one_extreme_image():
    rng = np.random.default_rng(5)
    held_out = rng.chisquare(8, size=120) ** 0.5
    base = robust_threshold(held_out, 4.0)
    with_outlier = robust_threshold(np.append(held_out, 60.0), 4.0)
    assert base > np.median(held_out)
    assert abs(with_outlier - base) / base < 0.05
    # the top quantile it replaces jumps with that one image
    assert np.quantile(np.append(held_out, 60.0), 0.995) / np.quantile(held_out, 0.995) > 1.5


def test_an_image_is_refused_by_an_ensemble_gate_when_every_member_finds_it_far(duo, tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (120, 160), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    result = runner.invoke(app, ["predict", str(tmp_path / "noise.png"), "--model", str(duo["dir"]), "--json"])
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["predictions"][0]
    assert entry["status"] == "rejected", entry


@pytest.mark.slow
def test_cli_combines_repeated_runs_and_refuses_fold_models(prepared, cache, busi_dir):
    import shutil

    from mammacls.store import models_dir
    from mammacls.training import TrainConfig, augmentation_preset, train_repeats
    from mammacls.inference.model_files import resolve_model

    # the shipped recipe's ingredients at toy scale: scanner augmentation on whole batches, lesion masks
    config = TrainConfig(arch="mobilenet_v2", pretrained=False, epochs=1, img_size=32, seed=3,
                         augmentation=augmentation_preset("scanner"), mask_guided=True)
    summary = train_repeats(config, repeats=2, data_dir=prepared[0], name="rep")
    assert all(run["name"].startswith("rep-seed") for run in summary["runs"])
    member = resolve_model("rep-seed3").card
    assert member.training.config["augmentation"]["scanner"] is True
    assert member.training.val_metrics["lesion_dice"] is not None
    result = runner.invoke(app, ["ensemble", "--model", "rep-seed3", "--model", "rep-seed4", "--name", "rep-ens"])
    assert result.exit_code == 0, result.stderr
    assert "rep-ens: 2 x mobilenet_v2" in result.stderr
    scan = next(Path(busi_dir[0], "malignant").glob("*[0-9].png"))
    predicted = runner.invoke(app, ["predict", str(scan), "--model", "rep-ens", "--json"])
    assert predicted.exit_code == 0, predicted.stderr
    assert json.loads(predicted.stdout)["model"]["members"] == 2
    again = runner.invoke(app, ["ensemble", "--model", "rep-seed3", "--model", "rep-seed4", "--name", "rep-ens"])
    assert again.exit_code != 0 and "exists already" in again.stderr
    alone = runner.invoke(app, ["ensemble", "--model", "rep-seed3", "--name", "solo"])
    assert alone.exit_code != 0 and "at least 2 models" in alone.stderr

    # cross-validation folds of train+val: each trained on part of the validation split
    for fold in (1, 2):
        shutil.copytree(models_dir() / f"rep-seed{fold + 2}", models_dir() / f"cv-fold{fold}")
        ref = resolve_model(f"cv-fold{fold}")
        ref.update_card(training=dataclasses.replace(ref.card.training,
                                                     group={"kind": "cv", "run": "cv", "member": fold, "of": 2}))
    folds = runner.invoke(app, ["ensemble", "--model", "cv-fold1", "--model", "cv-fold2", "--name", "cv-ens"])
    assert folds.exit_code != 0 and "validation images" in folds.stderr
    assert folds.stderr.count("\n") == 1  # one line, no traceback
    assert not (models_dir() / "cv-ens").exists()


def test_evaluate_report_names_an_ensemble(duo, prepared, tmp_path):
    result = runner.invoke(app, ["evaluate", "--model", str(duo["dir"]), "--data", str(prepared[0]), "--json",
                                 "--bootstrap", "100", "--report", "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.stderr
    [entry] = json.loads(result.stdout)["models"]
    assert entry["model"]["members"] == 2 and entry["metrics"]["selective"]["checked"]
    assert "ensemble of 2" in (tmp_path / "r" / "index.html").read_text()


@pytest.mark.parametrize("bad", ["../outside", "default"])
def test_model_names_stay_inside_the_cache(bad, cache):
    for command in (["ensemble", "--model", "x", "--model", "y", "--name", bad],
                    ["train", "--name", bad, "--epochs", "1"]):
        result = runner.invoke(app, command)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and "--name" in lines[0], (command, result.stderr)
    assert not (cache / "outside").exists()
