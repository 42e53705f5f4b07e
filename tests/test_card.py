"""The model card: typed, versioned, validated once; schema-1 models (mammacls 0.1-0.2) migrated."""

import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from mammacls.errors import MammaclsError
from mammacls.inference.card import SCHEMA, ModelCard, Preprocessing, migrate_v1
from mammacls.inference.model_files import migrate_model_folder, resolve_model, safetensors_header
from mammacls.nets.networks import build_model, predict_proba
from mammacls.nets.weights import load_network, save_model


def _v1_record(weights_sha256: str) -> dict:
    """A record as mammacls 0.2 wrote it: one flat dict, bulky parts and a build-machine path inside."""
    return {
        "format": "mammacls-model/1", "name": "old", "arch": "mobilenet_v2",
        "classes": ["benign", "malignant", "normal"], "num_classes": 3, "in_chans": 1, "img_size": 32,
        "input_size": [1, 32, 32], "interpolation": "area (shrink) / bilinear (enlarge), square resize",
        "mean": [0.449], "std": [0.226], "input_range": "grayscale uint8 / 255", "pretrained": None,
        "config": {"arch": "mobilenet_v2", "seed": 7, "epochs": 2}, "seed": 7, "device": "cpu",
        "mask_guided": False, "status": "complete", "best_epoch": 2, "epochs_run": 2,
        "val_metrics": {"accuracy": 0.5, "macro_f1": 0.4, "roc_auc_macro": 0.6},
        "history": [{"epoch": 1, "val_macro_f1": 0.3}, {"epoch": 2, "val_macro_f1": 0.4}],
        "data": {"prepared_dir": "/home/someone/.cache/mammacls/datasets/x", "manifest_sha256": "ab" * 32,
                 "train_images": 2, "val_images": 1, "train_val_groups": ["g1", "g2"],
                 "train_val_fingerprints": {"sha256": ["a", "b", "c"], "phash": ["0", "1", "2"]}},
        "temperature": 1.5, "min_confidence": 0.45,
        "calibration": {"method": "temperature scaling", "fitted_on": "val", "temperature": 1.5},
        "malignant_threshold_spec90": 0.3, "malignant_threshold_spec90_raw": 0.35,
        "recipe_search": {"standard": {"macro_f1": 0.4}},
        "versions": {"mammacls": "0.2.0"}, "weights_file": "model.safetensors", "sha256": weights_sha256,
    }


@pytest.fixture
def old_model(tmp_path):
    """A model folder exactly as mammacls 0.2 left it (schema 1)."""
    folder = tmp_path / "old"
    net = build_model("mobilenet_v2").eval()
    save_model(net, ModelCard(name="old", arch="mobilenet_v2", preprocessing=Preprocessing(img_size=32)), folder)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "metadata.json").write_text(json.dumps(_v1_record(digest)))
    return folder, net


def test_a_schema_1_model_opens_and_predicts_as_before(old_model):
    folder, net = old_model
    ref = resolve_model(str(folder))
    card = ref.card
    assert card.schema == SCHEMA and card.img_size == 32 and card.temperature == 1.5
    assert card.refusal.min_confidence == 0.45 and card.calibration.malignant_threshold(calibrated=False) == 0.35
    assert card.training.best_epoch == 2 and card.training.notes == {"recipe_search": {"standard": {"macro_f1": 0.4}}}
    assert ref.sidecar("history")[1]["epoch"] == 2  # kept in memory: the folder is not written on read
    assert ref.sidecar("training_data")["train_val_fingerprints"]["sha256"] == ["a", "b", "c"]
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    assert np.allclose(predict_proba(load_network(ref), images), predict_proba(net, images), atol=1e-6)


def test_migrating_a_folder_moves_bulk_to_sibling_files_and_keeps_every_tensor(old_model):
    folder, _ = old_model
    tensors_before = load_file(str(folder / "model.safetensors"))
    card = migrate_model_folder(folder)
    record = json.loads((folder / "metadata.json").read_text())
    assert record["schema"] == SCHEMA and "prepared_dir" not in json.dumps(record)
    assert "train_val_fingerprints" not in json.dumps(record) and "history" not in record["training"]
    assert json.loads((folder / "history.json").read_text())[0]["epoch"] == 1
    training_data = json.loads((folder / "training_data.json").read_text())
    assert set(training_data) == {"train_val_groups", "train_val_fingerprints"}  # the path is machine-specific
    tensors_after = load_file(str(folder / "model.safetensors"))
    assert tensors_before.keys() == tensors_after.keys()
    assert all(np.array_equal(tensors_before[k], tensors_after[k]) for k in tensors_before)
    assert card.weights.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads(safetensors_header(folder / "model.safetensors")["mammacls"])["schema"] == SCHEMA
    reopened = resolve_model(str(folder))
    assert reopened.card == card and reopened.legacy_sidecars == {}
    load_network(reopened)  # the new sha256 checks out
    assert migrate_model_folder(folder) == card  # a second run changes nothing


def test_the_card_round_trips_through_json():
    record, _ = migrate_v1(_v1_record("cd" * 32))
    card = ModelCard.from_record(record, "x")
    again = ModelCard.from_record(json.loads(json.dumps(card.to_record())), "x")
    assert again == card and isinstance(again.preprocessing.mean, tuple)
    assert card.calibration.class_temperatures is None  # cards written before it: one temperature


def test_class_temperatures_round_trip_and_calibrate_by_answer():
    import dataclasses

    import numpy as np

    record, _ = migrate_v1(_v1_record("cd" * 32))
    card = ModelCard.from_record(record, "x")
    card = card.replace(calibration=dataclasses.replace(card.calibration, temperature=1.0,
                                                        class_temperatures=(0.5, 1.0, 4.0)))
    again = ModelCard.from_record(json.loads(json.dumps(card.to_record())), "x")
    assert again.calibration.class_temperatures == (0.5, 1.0, 4.0)
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    probabilities = again.calibrated(logits)
    assert probabilities[0, 0] == pytest.approx(np.exp(4) / (np.exp(4) + 2))  # benign answer: logits / 0.5
    assert probabilities[1, 2] == pytest.approx(np.exp(0.5) / (np.exp(0.5) + 2))  # normal answer: logits / 4
    assert "0.50 / 1.00 / 4.00 by answer (benign / malignant / normal)" in again.calibration.describe()
    bad = again.to_record()
    bad["calibration"]["class_temperatures"] = [0.5, -1.0, 2.0]
    bad.pop("digest")
    with pytest.raises(MammaclsError, match="bad class temperatures"):
        ModelCard.from_record(bad, "x")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(schema="mammacls-model/9"), "schema 'mammacls-model/9' is not one this mammacls reads"),
    (lambda r: r.clear(), "is not a mammacls model record"),
    (lambda r: r["preprocessing"].update(colour="rgb"), "damaged model record"),
    (lambda r: r.update(arch="alexnet"), "unknown architecture 'alexnet'"),
    (lambda r: r["preprocessing"].update(img_size="big"), "bad input size"),
    (lambda r: r.update(classes=["a", "b"]), "classes"),
    (lambda r: r["calibration"].update(later_field=1.0), r"or one written by a newer mammacls \(unknown Calibration fields \['later_field'\]\); if it is newer"),
])
def test_old_foreign_or_damaged_records_are_one_clear_line(tmp_path, change, message):
    record, _ = migrate_v1(_v1_record("cd" * 32))
    change(record)
    with pytest.raises(MammaclsError, match=message) as caught:
        ModelCard.from_record(record, tmp_path / "metadata.json")
    assert "\n" not in str(caught.value)


def test_migration_refuses_a_foreign_record_instead_of_guessing(tmp_path):
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps({"format": "someone-else/3", "arch": "mobilenet_v2"}))
    with pytest.raises(MammaclsError, match="is not a mammacls model record"):
        migrate_model_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json"]  # nothing written
