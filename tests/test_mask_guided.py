"""Mask-guided training: the lesion decoder, its loss, joint augmentation, --lesion-map."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.data.prepared import load_prepared
from mammacls.archs import ARCHS
from mammacls.nets.networks import attach_lesion_decoder, build_model, forward_with_lesion
from mammacls.training import TrainConfig, augmentation_preset, train_model
from mammacls.training.batches import augment_batch, augmenter, lesion_loss, load_masks, photometric
from mammacls.inference.model_files import resolve_model
from mammacls.nets.weights import load_network

runner = CliRunner()


@pytest.mark.parametrize("arch", ARCHS)
def test_staged_forward_gives_the_classifier_logits_and_a_full_size_mask(arch):
    torch.manual_seed(0)
    net = attach_lesion_decoder(arch, build_model(arch)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits, mask = forward_with_lesion(arch, net, x)
        assert torch.allclose(logits, net(x), atol=1e-5)  # the decoder never changes the classifier
    assert mask.shape == (2, 1, 64, 64)


def test_plain_model_has_no_lesion_map():
    with pytest.raises(Exception, match="not trained with mask_guided"):
        forward_with_lesion("resnet18", build_model("resnet18"), torch.zeros(1, 1, 32, 32))


def test_lesion_loss_rewards_the_right_mask_and_skips_unknown_masks():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    right = (target * 2 - 1) * 8  # confident and correct logits
    wrong = -right
    known = torch.ones(2)
    assert lesion_loss(right, target, known) < 0.1 < lesion_loss(wrong, target, known)
    # an unknown mask contributes nothing, however wrong the prediction
    mixed = torch.cat([right[:1], wrong[1:]])
    assert lesion_loss(mixed, target, torch.tensor([1.0, 0.0])) == pytest.approx(
        lesion_loss(right[:1], target[:1], torch.ones(1)).item())
    # an empty mask (normal image) is a valid target: predicting nothing costs little
    empty = torch.zeros(1, 1, 16, 16)
    nothing = lesion_loss(torch.full((1, 1, 16, 16), -8.0), empty, torch.ones(1))
    everything = lesion_loss(torch.full((1, 1, 16, 16), 8.0), empty, torch.ones(1))
    assert torch.isfinite(nothing) and nothing < 0.1 < 1 < everything


@pytest.mark.parametrize("threaded", [False, True])  # threads: how batches are prepared beside a GPU
def test_mask_follows_the_image_through_augmentation(threaded):
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(3)
    config = TrainConfig(img_size=48, augmentation={**augmentation_preset("strong"), "brightness": 0, "contrast": 0})
    masks = np.zeros((8, 48, 48), dtype=np.uint8)
    for k in range(8):
        masks[k, 5 + k:25 + k, 10:30 + k] = 1
    with ThreadPoolExecutor(2) as threads:
        images, moved = augment_batch(augmenter(config), masks * np.uint8(255), masks,
                                       threads if threaded else None)
    per_image = ((images[:, 0] > 127) == (moved[:, 0] > 0)).float().mean(dim=(1, 2))
    # measured over seeds: aligned pairs agree on 96-99 % of pixels (edges interpolate differently),
    # a mask paired with the wrong image on 78-88 %
    assert per_image.mean() > 0.96 and per_image.min() > 0.94
    assert not torch.equal(moved[:, 0], torch.from_numpy(masks))  # something did move


def test_gamma_and_speckle_only_with_the_strong_preset():
    torch.manual_seed(0)
    batch = torch.full((16, 1, 8, 8), 0.5)
    assert torch.equal(photometric(batch, augmentation_preset("standard")), batch)
    changed = photometric(batch, augmentation_preset("strong"))
    assert changed.min() >= 0 and changed.max() <= 1
    per_image = changed.mean(dim=(1, 2, 3))
    assert per_image.std() > 0.01  # gamma differs from image to image
    assert (changed.std(dim=(1, 2, 3)) > 0.01).sum() >= 3  # speckle on some images


def test_lesion_image_without_mask_is_left_out_of_the_mask_loss(prepared):
    dataset = load_prepared(prepared[0])
    rows = [dict(dataset.split("train")[0]), dict(dataset.split("train")[0])]
    rows[1]["mask_file"] = ""
    rows[1]["label"] = "benign"
    masks, known = load_masks(dataset, rows, 32)
    assert known.tolist() == [1.0, 0.0]
    assert masks.shape == (2, 32, 32) and masks[1].sum() == 0


@pytest.fixture(scope="module")
def mask_model(prepared, session_cache):
    import os

    old = os.environ.get("MAMMACLS_CACHE_DIR")
    os.environ["MAMMACLS_CACHE_DIR"] = str(session_cache)
    try:
        return train_model(TrainConfig(arch="mobilenet_v2", pretrained=False, epochs=2, img_size=32, batch_size=16,
                                       mask_guided=True, mask_weight=1.0, augmentation=augmentation_preset("strong")),
                           data_dir=prepared[0], name="tiny-mask", export=False)
    finally:
        if old is None:
            os.environ.pop("MAMMACLS_CACHE_DIR", None)
        else:
            os.environ["MAMMACLS_CACHE_DIR"] = old


def test_mask_guided_training_saves_decoder_and_dice(mask_model, use_session_cache):
    assert mask_model.mask_guided is True and mask_model.training.config["mask_weight"] == 1.0
    assert 0 <= mask_model.training.val_metrics["lesion_dice"] <= 1
    ref = resolve_model("tiny-mask")
    assert all(0 <= r["val_lesion_dice"] <= 1 for r in ref.sidecar("history"))
    with safe_open(str(ref.weights), framework="pt") as handle:
        assert any(k.startswith("lesion_decoder.") for k in handle.keys())
    net = load_network(ref)
    logits, mask = forward_with_lesion("mobilenet_v2", net, torch.zeros(1, 1, 32, 32))
    assert mask.shape == (1, 1, 32, 32)


def test_predict_lesion_map_writes_overlays(mask_model, tiny_model, use_session_cache, busi_dir, tmp_path):
    out = tmp_path / "lesions"
    folder = busi_dir[0] / "malignant"
    result = runner.invoke(app, ["predict", str(folder), "--model", "tiny-mask", "--lesion-map", str(out), "--json"])
    document = json.loads(result.stdout)
    assert document["predictions"]
    for entry in document["predictions"]:
        assert entry["lesion_map"].endswith(".lesion.png") and (out / entry["lesion_map"].rsplit("/", 1)[1]).is_file()
        if entry["label"] == "normal":
            assert entry["lesion_area_fraction"] is None
        else:
            assert 0 <= entry["lesion_area_fraction"] <= 1
        assert "ood_distance" in entry  # the lesion pass also gives the features
    plain = runner.invoke(app, ["predict", str(folder), "--model", "tiny", "--lesion-map", str(out)])
    assert plain.exit_code != 0 and "not trained with --mask-guided" in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    onnx = runner.invoke(app, ["predict", str(folder), "--model", "tiny-mask", "--lesion-map", str(out),
                               "--backend", "onnx"])
    assert onnx.exit_code != 0 and "needs PyTorch" in onnx.stderr


def test_no_lesion_is_drawn_on_an_image_predicted_normal(mask_model, use_session_cache, busi_dir, tmp_path,
                                                         monkeypatch):
    """The rule: a lesion map shows a lesion only where the model names one (benign or malignant)."""
    import numpy as np
    from PIL import Image

    from mammacls.runtime import TorchBackend

    def says_normal_everywhere(self, batch):
        logits = np.tile(np.array([[-5.0, -5.0, 5.0]], dtype=np.float32), (len(batch), 1))
        return logits, np.ones((len(batch), *batch.shape[1:]), dtype=np.float32), None

    monkeypatch.setattr(TorchBackend, "lesion_maps", says_normal_everywhere)
    out = tmp_path / "maps"
    result = runner.invoke(app, ["predict", str(busi_dir[0] / "malignant" / "malignant (1).png"), "--model",
                                 "tiny-mask", "--lesion-map", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["predictions"][0]
    assert entry["label"] == "normal" and entry["lesion_area_fraction"] is None
    panel = np.asarray(Image.open(entry["lesion_map"]).convert("RGB")).astype(int)
    red_tint = (panel[..., 0] - panel[..., 1] > 40) & (panel[..., 0] > 100)
    assert not red_tint.any()  # the map of ones was not drawn
