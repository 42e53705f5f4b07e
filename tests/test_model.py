import copy
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import models

from mammacls.errors import MammaclsError
from mammacls.archs import ARCH_SPECS
from mammacls.archs import ARCHS
from mammacls.nets.imagenet import imagenet_weights
from mammacls.nets.networks import GRAY_MEAN, GRAY_STD, _replace, build_model, fold_to_one_channel, predict_proba


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_network_equals_rgb_network_on_replicated_gray(arch):
    """A gray image through the original 3-channel network (gray replicated)
    gives the same output as the folded 1-channel network."""
    torch.manual_seed(0)
    rgb = getattr(models, arch)(weights=None, num_classes=3).eval()
    gray_net = copy.deepcopy(rgb)  # the same weights (a second build would cost vgg16's 2 s of init again)
    stem = ARCH_SPECS[arch].stem
    folded = fold_to_one_channel(rgb.get_submodule(stem))
    _replace(gray_net, stem, folded)
    gray = (torch.rand(2, 1, 64, 64) - GRAY_MEAN) / GRAY_STD
    with torch.no_grad():
        expected = rgb(gray.repeat(1, 3, 1, 1))
        got = gray_net(gray)
    assert torch.allclose(expected, got, atol=1e-4, rtol=1e-4)
    assert folded.in_channels == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_one_channel_stem_three_outputs_and_every_spec_path_of_the_right_kind(arch):
    """The spec is the one place an architecture is described: its paths must exist and fit."""
    spec, net = ARCH_SPECS[arch], build_model(arch, pretrained=False).eval()
    assert net.get_submodule(spec.stem).in_channels == 1
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 3)
    assert isinstance(net.get_submodule(spec.head), torch.nn.Linear)
    caught = {}
    for key in ("mid", "deep", "gradcam"):
        net.get_submodule(getattr(spec, key)).register_forward_hook(
            lambda _m, _i, output, key=key: caught.__setitem__(key, output))
    with torch.no_grad():
        net(torch.zeros(1, 1, 64, 64))
    assert caught["mid"].shape[1] == spec.decoder_channels[0] and caught["mid"].shape[-1] == 64 // 8
    assert caught["deep"].shape[1] == spec.decoder_channels[1] and caught["deep"].shape[-1] == 64 // 32
    assert caught["gradcam"].ndim == 4


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch hub cache for one test."""
    original = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(original)


def _plant(hub_dir, weights, monkeypatch, net) -> Path:
    """Save ``net``'s weights where ``weights`` lives in the hub cache and accept its digest as that file's."""
    from mammacls.nets import imagenet as imagenet_module
    from mammacls.store import sha256_file

    target = hub_dir / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), target)
    digest = sha256_file(target)
    real = imagenet_module.expected_sha256_prefix
    monkeypatch.setattr(imagenet_module, "expected_sha256_prefix",
                        lambda w: digest[:8] if w == weights else real(w))
    return target


def test_pretrained_weights_come_from_the_hub_cache_and_are_folded(hub_dir, monkeypatch):
    from mammacls.nets.networks import build_pretrained_model

    weights = imagenet_weights("resnet18")
    reference = models.resnet18(weights=None)
    target = _plant(hub_dir, weights, monkeypatch, reference)
    net, record = build_pretrained_model("resnet18")
    assert torch.allclose(net.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert record["weights"] == str(weights) and record["file"] == target.name and len(record["sha256"]) == 64


def test_auto_takes_a_cached_variant_offline_and_a_variant_can_be_named(hub_dir, monkeypatch):
    """Offline, with only IMAGENET1K_V1 in the cache (as for MobileNetV2 here), auto uses it."""
    from mammacls.nets.networks import build_pretrained_model

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    v1 = imagenet_weights("mobilenet_v2", "IMAGENET1K_V1")
    assert v1 is not imagenet_weights("mobilenet_v2")  # torchvision's default is V2
    reference = models.mobilenet_v2(weights=None)
    _plant(hub_dir, v1, monkeypatch, reference)
    for choice in ("auto", "IMAGENET1K_V1", "imagenet1k_v1"):
        net, record = build_pretrained_model("mobilenet_v2", imagenet=choice)
        assert record["weights"] == "MobileNet_V2_Weights.IMAGENET1K_V1"
        assert torch.equal(net.features[1].conv[0][0].weight, reference.features[1].conv[0][0].weight)
    with pytest.raises(MammaclsError, match="cannot get ImageNet weights MobileNet_V2_Weights.IMAGENET1K_V2"):
        build_pretrained_model("mobilenet_v2", imagenet="IMAGENET1K_V2")
    with pytest.raises(MammaclsError, match="no ImageNet weights 'V9' for mobilenet_v2"):
        build_pretrained_model("mobilenet_v2", imagenet="V9")


def test_a_local_weights_file_is_recognised_by_its_sha256(hub_dir, monkeypatch, tmp_path):
    from mammacls.nets.networks import build_pretrained_model

    v1 = imagenet_weights("mobilenet_v2", "IMAGENET1K_V1")
    planted = _plant(hub_dir, v1, monkeypatch, models.mobilenet_v2(weights=None))
    local = tmp_path / "elsewhere" / "my-download.pth"
    local.parent.mkdir()
    local.write_bytes(planted.read_bytes())
    planted.unlink()
    _, record = build_pretrained_model("mobilenet_v2", imagenet=str(local))
    assert record["weights"] == str(v1) and record["file"] == "my-download.pth"
    stranger = tmp_path / "stranger.pth"
    torch.save({"w": torch.zeros(1)}, stranger)
    with pytest.raises(MammaclsError, match="is not a torchvision ImageNet file for mobilenet_v2"):
        build_pretrained_model("mobilenet_v2", imagenet=str(stranger))
    with pytest.raises(MammaclsError, match="not found"):
        build_pretrained_model("mobilenet_v2", imagenet=str(tmp_path / "nothing.pth"))


def test_real_imagenet1k_v1_file_when_present():
    """The real MobileNetV2 IMAGENET1K_V1 file (see ../shared/pretrained/README.md), offline."""
    from mammacls.nets.imagenet import hub_checkpoint_path
    from mammacls.nets.networks import build_pretrained_model

    v1 = imagenet_weights("mobilenet_v2", "IMAGENET1K_V1")
    if not hub_checkpoint_path(v1).is_file():
        pytest.skip(f"the real file is not in the torch hub cache: {hub_checkpoint_path(v1)}")
    net, record = build_pretrained_model("mobilenet_v2", imagenet="IMAGENET1K_V1")
    assert record["sha256"] == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    reference = models.mobilenet_v2(weights=None)
    reference.load_state_dict(torch.load(hub_checkpoint_path(v1), weights_only=True))
    assert torch.allclose(net.features[0][0].weight, reference.features[0][0].weight.sum(dim=1, keepdim=True))


def test_pretrained_without_network_is_one_actionable_error(hub_dir, monkeypatch):

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MammaclsError) as info:
        build_model("mobilenet_v2", pretrained=True)
    message = str(info.value)
    assert "--no-pretrained" in message and "mobilenet_v2" in message and str(hub_dir) in message
    assert "\n" not in message


def test_damaged_pretrained_file_is_a_clear_error(hub_dir):
    target = hub_dir / "checkpoints" / imagenet_weights("resnet18").url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    target.write_bytes(b"garbage")
    with pytest.raises(MammaclsError, match="damaged"):
        build_model("resnet18", pretrained=True)


def test_predict_proba_rows_sum_to_one_and_batching_does_not_matter():
    net = build_model("mobilenet_v2").eval()
    images = np.random.default_rng(0).integers(0, 255, size=(5, 32, 32)).astype(np.uint8)
    a = predict_proba(net, images, batch_size=2)
    b = predict_proba(net, images, batch_size=5)
    assert a.shape == (5, 3)
    assert np.allclose(a.sum(axis=1), 1.0)
    assert np.allclose(a, b, atol=1e-5)
