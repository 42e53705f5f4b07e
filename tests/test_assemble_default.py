"""benchmarks/assemble_default.py: from a recipe search's members to a shipped-style model folder."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mammacls.errors import MammaclsError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assemble():
    spec = importlib.util.spec_from_file_location("assemble_default", REPO / "benchmarks" / "assemble_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_search(run: Path, dataset, img_size: int = 32) -> None:
    """What recipe_search.py leaves behind: results.json and five float16 fold members."""
    import torch
    from safetensors.torch import save_file

    from mammacls.nets.networks import attach_lesion_decoder, build_model

    rows = [r for r in dataset.rows if r["split"] in ("train", "val")]
    folds = [(k % 5) if r["split"] == "train" else -1 for k, r in enumerate(rows)]
    recipe = {"scanner": True, "mask": True, "imagenet": True, "sources": "all", "scale": [0.45, 1.35],
              "rotation": 15.0}
    pooled = {"selection_score": 0.9}
    results = {"index": [{"file": str(k), "label": r["label"], "split": r["split"], "source": r["source"],
                          "group": r["group_id"], "sha256": r["sha256"]} for k, r in enumerate(rows)],
               "folds": folds, "recipes": {"scanner-mask": recipe}, "hyper": {"img_size": img_size, "epochs": 1},
               "summary": {"scanner-mask": {"pooled": pooled, "fold_spread": {}}}, "ranking": ["scanner-mask"],
               "selection_rule": "the best score", "device": "cpu", "torch": torch.__version__}
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    torch.manual_seed(0)
    states = [attach_lesion_decoder("mobilenet_v2", build_model("mobilenet_v2")).state_dict() for _ in range(5)]
    for part, members in enumerate((range(0, 3), range(3, 5))):
        save_file({f"member{k}.{key}": value.half() if value.is_floating_point() else value
                   for k in members for key, value in states[k].items()},
                  str(run / f"members-scanner-mask-{part}.safetensors"))


@pytest.mark.slow
def test_members_become_one_calibrated_exported_model(assemble, prepared, cache, tmp_path, monkeypatch):
    from mammacls.data.prepared import load_prepared
    from mammacls.inference.onnx_backend import OnnxBackend
    from mammacls.inference.model_files import resolve_model

    _fake_search(tmp_path / "run", load_prepared(prepared[0]))
    monkeypatch.setattr(assemble, "load_imagenet_state_dict", lambda arch, choice: (None, {"weights": choice}))
    monkeypatch.setattr(assemble, "load_prepared", lambda: load_prepared(prepared[0]))
    monkeypatch.setattr(sys, "argv", ["assemble_default.py", "--run", str(tmp_path / "run"),
                                      "--out", str(tmp_path / "out"), "--name", "toy-default"])
    assemble.main()
    ref = resolve_model(str(tmp_path / "out"))
    card = ref.card
    assert card.members == 5 and card.training.ensemble["recipe"] == "scanner-mask" and card.name == "toy-default"
    assert card.weights.storage_dtype == "float16" and card.mask_guided is True
    assert card.onnx.file == "model.onnx" and len(card.refusal.ood.member_thresholds) == 5
    assert "prepared_dir" not in json.dumps(card.to_record())  # nothing of the build machine
    assert set(ref.sidecar("training_data")) == {"train_val_groups", "train_val_fingerprints"}
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    logits, features = OnnxBackend(ref).logits_and_features(images)
    assert logits.shape == (3, 3) and features.shape == (3, 5 * 1280)

    # --refinish: calibration and gate fitted again by this mammacls, weights and the rest untouched
    from mammacls.store import sha256_file

    before = {p.name: sha256_file(p) for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr("mammacls.training.splits.load_prepared", lambda path=None: load_prepared(prepared[0]))
    refit = assemble.refinish(tmp_path / "out")
    after = {p.name: sha256_file(p) for p in (tmp_path / "out").iterdir()}
    assert set(after) == set(before)
    assert after["model.safetensors"] == before["model.safetensors"] == refit.weights.sha256
    assert after["training_data.json"] == before["training_data.json"]
    assert refit.onnx.sha256 == after["model.onnx"] and refit.refusal.ood.sha256 == after["ood.safetensors"]
    again = resolve_model(str(tmp_path / "out"))  # opens: digest and every file's sha256 hold
    assert again.card == refit and again.card.calibration.val_after is not None
    assert np.allclose(OnnxBackend(again).logits_and_features(images)[0], logits, atol=1e-4)  # same network


def test_another_dataset_is_refused(assemble, prepared, tmp_path, monkeypatch):
    from mammacls.data.prepared import load_prepared

    dataset = load_prepared(prepared[0])
    _fake_search(tmp_path / "run", dataset)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    with pytest.raises(MammaclsError, match="not the one the recipe search ran on"):
        assemble.check_same_data({**results, "index": results["index"][1:]}, dataset)
    with pytest.raises(MammaclsError, match=r"members \[0, 1, 2\]"):
        (tmp_path / "run" / "members-scanner-mask-1.safetensors").unlink()
        assemble.member_states(tmp_path / "run", "scanner-mask", 5)
