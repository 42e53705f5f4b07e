"""train --init: a run started from a trained model keeps its design, fine-tunes every member, records
its lineage, inherits what it saw, can freeze stages and can learn from a set without normal scans."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.errors import MammaclsError
from mammacls.inference.model_files import resolve_model, seen_fingerprints
from mammacls.nets.weights import load_network
from mammacls.training import TrainConfig, TrainReporter, train_model
from mammacls.training.config import INIT_LR
from tests.conftest import build_busbra_fixture

runner = CliRunner()
TINY = {"pretrained": False, "epochs": 1, "img_size": 32, "batch_size": 16}


def _states(name: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_network(resolve_model(name)).state_dict().items()}


@pytest.mark.slow
def test_init_keeps_the_design_records_lineage_and_inherits_what_it_saw(prepared, cache, tmp_path):
    base = train_model(TrainConfig(arch="resnet18", mask_guided=True, **TINY), data_dir=prepared[0], name="base")
    other_data = tmp_path / "more"
    build_busbra_fixture(other_data, patients=14)
    from mammacls.data.prepare import prepare_dataset

    more = prepare_dataset([prepared[1]["source"], str(other_data)])["prepared_dir"]
    adapted = train_model(TrainConfig(init="base", epochs=1, batch_size=16), data_dir=more, name="adapted")
    assert (adapted.arch, adapted.img_size, adapted.mask_guided, adapted.members) == ("resnet18", 32, True, 1)
    assert adapted.training.config["lr"] == INIT_LR and adapted.training.config["pretrained"] is False
    init = adapted.provenance.init
    assert init["model"] == "base" and init["sha256"] == base.weights.sha256 and init["trained_on"] == [
        "Dataset_BUSI_with_GT"]
    assert set(adapted.provenance.data["sources"]) == {"Dataset_BUSI_with_GT", "more"}
    before, after = _states("base"), _states("adapted")
    assert max((after[k].float() - before[k].float()).abs().max().item() for k in before) > 1e-4  # it learned
    # what the base saw stays "seen" by the adapted model, which saw the new images too
    base_seen = set(seen_fingerprints(resolve_model("base"))["sha256"])
    adapted_seen = set(seen_fingerprints(resolve_model("adapted"))["sha256"])
    assert base_seen < adapted_seen
    # a second generation names its grandparent
    again = train_model(TrainConfig(init="adapted", epochs=1, batch_size=16), data_dir=more, name="again")
    assert again.provenance.init["lineage"][0]["model"] == "base"


@pytest.mark.slow
def test_an_ensemble_init_fine_tunes_every_member_and_freeze_keeps_its_stages(prepared, cache):
    from mammacls.training.ensemble import ensemble_from_models

    for name, seed in (("a", 1), ("b", 2)):
        train_model(TrainConfig(arch="mobilenet_v2", seed=seed, **TINY), data_dir=prepared[0], name=name)
    ensemble_from_models(["a", "b"], name="ab")

    class StopAfterFirstEpoch(TrainReporter):
        def epoch_done(self, record, improved):
            raise KeyboardInterrupt  # as Ctrl-C: the checkpoint of epoch 1 is written

    with pytest.raises(KeyboardInterrupt):
        train_model(TrainConfig(init="ab", epochs=2, batch_size=16, freeze=2), data_dir=prepared[0],
                    name="ab-adapted", reporter=StopAfterFirstEpoch())
    adapted = train_model(TrainConfig(), resume=True, name="ab-adapted")  # the checkpoint knows its 2 members
    assert adapted.training.epochs_run == 2 and adapted.provenance.init["model"] == "ab"
    assert adapted.members == 2 and adapted.onnx is not None and adapted.refusal.ood.members == 2
    assert adapted.calibration is not None and adapted.training.status == "complete"
    before, after = _states("ab"), _states("ab-adapted")
    assert set(before) == set(after)
    for k in range(2):  # features.0-3 are the first two stages: weights and batch-norm statistics stay
        frozen = [key for key in before if key.startswith(tuple(f"members.{k}.features.{i}." for i in range(4)))]
        moving = [key for key in before if key.startswith(f"members.{k}.features.1") and "weight" in key
                  and key.split(".")[3].isdigit() and int(key.split(".")[3]) >= 14]
        assert frozen and moving
        assert all(torch.equal(before[key], after[key]) for key in frozen)
        assert max((after[key] - before[key]).abs().max().item() for key in moving) > 1e-5


@pytest.mark.slow
def test_lesion_only_data_trains_from_a_model_and_only_from_one(prepared, cache, tmp_path):
    from mammacls.data.prepare import prepare_dataset

    train_model(TrainConfig(arch="resnet18", **TINY), data_dir=prepared[0], name="knows-normal")
    build_busbra_fixture(tmp_path / "hospital", patients=16)
    lesions_only = prepare_dataset(tmp_path / "hospital")["prepared_dir"]
    with pytest.raises(MammaclsError, match="no normal images"):
        train_model(TrainConfig(arch="resnet18", **TINY), data_dir=lesions_only, name="scratch")
    messages = []

    class Capture:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

        def message(self, text):
            messages.append(text)

    card = train_model(TrainConfig(init="knows-normal", epochs=1, batch_size=16), data_dir=lesions_only,
                       name="hospital-adapted", reporter=Capture())
    assert card.training.status == "complete" and card.calibration is not None
    assert any("no normal scans" in text and "mix in a source" in text for text in messages)
    assert card.provenance.data["class_weights"]["hospital"]["normal"] == 0.0


def _one_line(result, fragment: str) -> None:
    assert result.exit_code != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_init_and_freeze_are_refused_in_one_line_before_anything_is_written(tiny_model, use_session_cache,
                                                                                  tmp_path):
    models = use_session_cache / "models"
    before = sorted(p.name for p in models.iterdir())
    _one_line(runner.invoke(app, ["train", "--init", "no-such-model"]), "--init no-such-model: no model named")
    _one_line(runner.invoke(app, ["train", "--init", "tiny", "--arch", "vgg16"]),
              "drop --arch vgg16 (it has resnet18)")
    _one_line(runner.invoke(app, ["train", "--init", "tiny", "--img-size", "64"]), "drop --img-size 64")
    _one_line(runner.invoke(app, ["train", "--init", "tiny", "--freeze", "6"]), "--freeze 6: resnet18's backbone has 5")
    foreign = tmp_path / "foreign"
    shutil.copytree(models / "tiny", foreign)
    record = json.loads((foreign / "metadata.json").read_text())
    record.pop("digest")  # a model from elsewhere, whose card carries no digest
    record["classes"] = ["cyst", "solid", "normal"]
    (foreign / "metadata.json").write_text(json.dumps(record))
    _one_line(runner.invoke(app, ["train", "--init", str(foreign)]), "classes ['cyst', 'solid', 'normal']")
    record["classes"] = ["benign", "malignant", "normal"]
    record["preprocessing"]["in_chans"] = 3
    (foreign / "metadata.json").write_text(json.dumps(record))
    _one_line(runner.invoke(app, ["train", "--init", str(foreign)]), "one grayscale channel")
    record["preprocessing"]["in_chans"] = 1
    record["preprocessing"]["mean"] = [0.5]
    (foreign / "metadata.json").write_text(json.dumps(record))
    _one_line(runner.invoke(app, ["train", "--init", str(foreign)]), "normalises its input with mean [0.5]")
    assert sorted(p.name for p in models.iterdir()) == before  # nothing half-written


def test_bf16_on_a_cpu_without_it_is_one_line(monkeypatch, prepared, cache):
    from mammacls.nets import compute

    monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(MammaclsError, match="precision bf16: this CPU has no native bf16"):
        train_model(TrainConfig(arch="resnet18", precision="bf16", **TINY), data_dir=prepared[0], name="bf16")
    assert not (cache / "models" / "bf16").exists()


def test_per_source_weights_balance_each_source_on_its_own():
    from mammacls.training.loss import ClassWeightedLoss

    labels = np.array([0] * 6 + [1] * 2 + [2] * 2 + [0] * 6 + [1] * 4)  # source a: 6/2/2; source b: 6/4, no normal
    sources = np.array(["a"] * 10 + ["b"] * 10)
    per_source = ClassWeightedLoss("per-source", labels, sources, 0.0)
    weights = per_source.image_weights(labels, sources)
    assert weights.mean() == pytest.approx(1.0)
    for source in ("a", "b"):  # within each source every class present weighs the same in total
        mine = sources == source
        totals = [weights[mine & (labels == c)].sum() for c in np.unique(labels[mine])]
        assert np.allclose(totals, totals[0])
    assert per_source.record()["b"]["normal"] == 0.0
    pooled = ClassWeightedLoss("pooled", labels, sources, 0.0)
    assert pooled.record()["normal"] == pytest.approx(20 / (3 * 2), abs=1e-3)  # pooled: the 2 normals look rarer
    assert per_source.record()["a"]["normal"] == pytest.approx(10 / (3 * 2), abs=1e-3)
    logits = torch.randn(20, 3)
    targets = torch.from_numpy(labels)
    plain = ClassWeightedLoss("none", labels, sources, 0.0)(logits, targets)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    same = per_source(logits, targets, torch.ones(20))
    assert same.item() == pytest.approx(plain.item(), rel=1e-6)
