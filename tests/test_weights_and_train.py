import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mammacls import CLASSES
from mammacls.errors import MammaclsError
from mammacls.inference.card import ModelCard, Preprocessing, TrainingSummary
from mammacls.nets.networks import build_model, predict_proba
from mammacls.training import TrainConfig, TrainReporter, train_model
from mammacls.inference.model_files import CHECKPOINT_FILE, list_cached_models, resolve_model
from mammacls.nets.weights import load_network, save_model
from tests.conftest import tiny_conv_net


def _meta(arch="mobilenet_v2", size=32):
    return ModelCard(name="m", arch=arch, preprocessing=Preprocessing(img_size=size))


def test_safetensors_round_trip_gives_identical_predictions(tmp_path):
    net = build_model("mobilenet_v2").eval()
    record = save_model(net, _meta(), tmp_path / "m")
    ref = resolve_model(str(tmp_path / "m"))
    loaded = load_network(ref)
    images = np.random.default_rng(0).integers(0, 255, size=(3, 32, 32)).astype(np.uint8)
    assert np.array_equal(predict_proba(net, images), predict_proba(loaded, images))
    assert record.weights.sha256 == ref.card.weights.sha256 and len(record.weights.sha256) == 64
    # a lone .safetensors file still describes itself through its header
    (tmp_path / "m" / "metadata.json").unlink()
    lone = resolve_model(str(tmp_path / "m" / "model.safetensors"))
    assert lone.card.arch == "mobilenet_v2" and lone.card.img_size == 32
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_tampered_weights_are_refused(tmp_path):
    save_model(build_model("resnet18"), _meta("resnet18"), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(MammaclsError, match="corrupt or was modified"):
        load_network(resolve_model(str(tmp_path / "m")))


def test_foreign_and_pickle_files_are_refused(tmp_path):
    pickle_file = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pickle_file)
    with pytest.raises(MammaclsError, match="never unpickles"):
        resolve_model(str(pickle_file))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(MammaclsError, match="not a valid safetensors"):
        resolve_model(str(junk))


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_model(build_model("resnet18"), _meta("resnet18"), tmp_path / "m")
    meta_path = tmp_path / "m" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["arch"] = "mobilenet_v2"
    meta.pop("digest")  # a card written by hand (no digest), naming the wrong architecture
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(MammaclsError, match="does not fit a mobilenet_v2"):
        load_network(resolve_model(str(tmp_path / "m")))


def test_unknown_model_name_lists_what_exists(cache, monkeypatch):
    with pytest.raises(MammaclsError, match="no model named 'nope'"):
        resolve_model("nope")
    assert resolve_model(None).source == "shipped"  # empty cache: the shipped default
    monkeypatch.setattr("mammacls.inference.model_files.shipped_model_dir", lambda: None)
    with pytest.raises(MammaclsError, match="no shipped default model in this installation"):
        resolve_model(None)


def test_trained_model_card_is_complete(tiny_model, use_session_cache):
    card = tiny_model
    assert card.schema == "mammacls-model/2" and card.arch == "resnet18" and card.classes == CLASSES
    assert card.preprocessing.input_size == (1, 32, 32) and len(card.preprocessing.mean) == 1
    assert card.training.status == "complete" and card.training.config["seed"] == 42
    assert card.training.best_epoch in (1, 2) and card.training.epochs_run == 2
    assert set(card.training.val_metrics) >= {"accuracy", "macro_f1", "roc_auc_macro"}
    assert len(card.provenance.data["manifest_sha256"]) == 64 and card.provenance.versions["torch"]
    # the temperature is fitted on validation: it can only lower the validation NLL (1.0 was a candidate)
    assert card.calibration.val_after["nll"] <= card.calibration.val_before["nll"] + 1e-9
    assert card.calibration.fitted_on == "val" and card.refusal.ood.file == "ood.safetensors"
    assert len(card.weights.sha256) == 64 and card.onnx.file == "model.onnx"
    ref = resolve_model("tiny")
    assert ref.card == card  # what train returns is what a reader parses back
    history = ref.sidecar("history")
    assert [h["epoch"] for h in history] == [1, 2] and "test" not in json.dumps(history)
    prints = ref.sidecar("training_data")["train_val_fingerprints"]
    assert len(prints["sha256"]) == card.provenance.data["train_images"] + card.provenance.data["val_images"]
    assert "tiny" in [r.name for r in list_cached_models()]  # other tests add theirs to this cache
    folder = use_session_cache / "models" / "tiny"
    assert len((folder / "metadata.json").read_bytes()) < 20_000  # bulky data live in the sibling files
    assert not (folder / CHECKPOINT_FILE).exists()
    assert set(load_file(str(folder / "model.safetensors"))) == set(build_model("resnet18").state_dict())


class _StopAfter(TrainReporter):
    def __init__(self, epoch):
        self.epoch = epoch

    def epoch_done(self, record, improved):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_resume_after_interrupt_equals_an_uninterrupted_run(prepared, cache):
    config = dict(arch="mobilenet_v2", pretrained=False, epochs=3, img_size=32, batch_size=16, patience=5)
    train_model(TrainConfig(**config), data_dir=prepared[0], name="full")
    with pytest.raises(KeyboardInterrupt):
        train_model(TrainConfig(**config), data_dir=prepared[0], name="cut", reporter=_StopAfter(2))
    assert (cache / "models" / "cut" / CHECKPOINT_FILE).is_file()
    assert (cache / "models" / "cut" / "model.safetensors").is_file()  # best so far is usable
    resumed = train_model(TrainConfig(), resume=True)  # picks the interrupted run; settings from checkpoint
    assert resumed.name == "cut" and resumed.training.epochs_run == 3
    for a, b in zip(resolve_model("full").sidecar("history"), resolve_model("cut").sidecar("history")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_macro_f1"] == pytest.approx(b["val_macro_f1"])
    a = load_file(str(cache / "models" / "full" / "model.safetensors"))
    b = load_file(str(cache / "models" / "cut" / "model.safetensors"))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    with pytest.raises(MammaclsError, match="nothing to resume"):
        train_model(TrainConfig(), resume=True)


@pytest.mark.parametrize("change, message", [
    ({"arch": "alexnet"}, "unknown architecture"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"img_size": 8}, "img_size must be at least 32"),
    ({"lr": -1.0}, "lr must be a positive"),
    ({"device": "gpu"}, "unknown device 'gpu': choose one of auto, cpu, cuda"),
])
def test_bad_training_options_are_clear_errors_naming_the_parameter(prepared, cache, change, message):
    with pytest.raises(MammaclsError, match=message) as caught:
        train_model(TrainConfig(**{"pretrained": False, **change}), data_dir=prepared[0])
    assert caught.value.parameter == next(iter(change))  # the library names its own argument ...
    assert "--" not in str(caught.value)  # ... not a command-line option
    if caught.value.message.startswith(caught.value.parameter):
        option = "--" + caught.value.parameter.replace("_", "-")
        assert caught.value.with_option_names().startswith(option)  # which the CLI shows instead


def test_training_without_a_prepared_dataset_says_what_to_do(cache):
    with pytest.raises(MammaclsError, match="run mammacls prepare"):
        train_model(TrainConfig(pretrained=False, epochs=1))


def test_duplicate_run_name_is_refused(tiny_model, use_session_cache, prepared):
    with pytest.raises(MammaclsError, match="exists already"):
        train_model(TrainConfig(pretrained=False), data_dir=prepared[0], name="tiny")


def test_predict_uses_the_shipped_model_unless_another_is_chosen(cache):
    """Training a model never silently changes what predict uses; mammacls use does, and says so."""
    from mammacls.store import record_chosen_model

    for name, score in (("weak", 0.4), ("strong", 0.8)):
        card = _meta().replace(name=name, training=TrainingSummary(val_metrics={"macro_f1": score}))
        save_model(build_model("mobilenet_v2"), card,
                   cache / "models" / name)
    ref = resolve_model(None)
    assert ref.source == "shipped" and "mammacls use" in ref.why
    record_chosen_model("weak")
    chosen = resolve_model(None)
    assert (chosen.name, chosen.source) == ("weak", "cache") and "chosen with mammacls use" in chosen.why
    assert resolve_model("strong").why == "--model"
    shutil.rmtree(cache / "models" / "weak")
    with pytest.raises(MammaclsError, match=r"the model chosen with 'mammacls use' \(weak\) is gone"):
        resolve_model(None)
    record_chosen_model(None)
    assert resolve_model(None).source == "shipped"
    with pytest.raises(MammaclsError, match="did you mean strong"):
        resolve_model("strnog")


def test_vgg16_on_cpu_prints_a_time_estimate_from_the_runs_own_second_step():
    from mammacls.nets.compute import Compute
    from mammacls.training.batches import EpochRunner
    from mammacls.training.distributed import SINGLE
    from mammacls.training.loop import cpu_time_estimate
    from mammacls.training.loss import ClassWeightedLoss

    messages = []

    class Capture(TrainReporter):
        def message(self, text):
            messages.append(text)

    config = TrainConfig(arch="vgg16", img_size=32, epochs=5, batch_size=8)
    cpu_time_estimate(config, batches=11, n_val=24, reporter=Capture())(3.0)  # 33 s + 3 s of validation
    assert messages == ["CPU time estimate: about 0.6 min per epoch for vgg16 at 32 px (3 min for 5 epochs); "
                        "a smaller --img-size or a CUDA GPU is faster"]
    fast = TrainConfig(arch="resnet18", img_size=32, epochs=5, batch_size=8)
    cpu_time_estimate(fast, batches=10, n_val=24, reporter=Capture())(3.0)  # 33 s an epoch: not worth a word
    cpu_time_estimate(fast, batches=10, n_val=24, reporter=Capture())(6.0)  # 66 s: it is
    assert len(messages) == 2 and "about 1.1 min per epoch for resnet18" in messages[1]
    # the runner times its own second step once (the first pays one-off costs), preparation included
    timed = []
    torch.manual_seed(0)
    net = tiny_conv_net()
    labels = np.arange(24) % 3
    runner = EpochRunner(TrainConfig(arch="resnet18", batch_size=8, img_size=12), SINGLE,
                         Compute("cpu", "fp32", "contiguous"), net,
                         ClassWeightedLoss("none", labels, np.zeros(len(labels)), label_smoothing=0.0),
                         torch.optim.SGD(net.parameters(), lr=0.1), np.zeros((24, 12, 12), dtype=np.uint8), labels,
                         None, None)
    runner.on_step_timed = timed.append
    for epoch in (1, 2):
        runner.run(epoch, TrainReporter())
    assert len(timed) == 1 and 0.0 < timed[0] < 30.0


def test_progress_shows_the_steps_after_the_last_epoch(prepared, cache):
    """The reporter hears every epoch, then the finishing steps by name (no stale batch bar)."""
    events = []

    class Capture(TrainReporter):
        def epoch_done(self, record, improved):
            events.append(("epoch", record["epoch"]))

        def stage(self, text):
            events.append(("stage", text))

    train_model(TrainConfig(arch="resnet18", pretrained=False, epochs=2, img_size=32, batch_size=16),
                data_dir=prepared[0], name="staged", reporter=Capture())
    assert events[:2] == [("epoch", 1), ("epoch", 2)]
    assert [text for kind, text in events[2:]] == ["calibrating on validation, fitting the refusal densities",
                                                   "exporting to ONNX"]


def test_predict_progress_knows_its_total_from_the_start(tiny_model, use_session_cache, busi_dir):
    from mammacls.predict import predict_paths

    calls = []
    predict_paths([busi_dir[0] / "normal"], model="tiny", batch_size=4, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, calls[-1][1]) and calls[-1][0] == calls[-1][1] > 4
