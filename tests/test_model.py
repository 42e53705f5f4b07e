import urllib.error

import numpy as np
import pytest
import torch
from torchvision import models

from mammacls.errors import MammaclsError
from mammacls.model import (
    ARCHS, GRAY_MEAN, GRAY_STD, _first_conv, build_model, fold_to_one_channel, imagenet_weights, predict_proba,
)


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_network_equals_rgb_network_on_replicated_gray(arch):
    """A gray image through the original 3-channel network (gray replicated)
    gives the same output as the folded 1-channel network."""
    torch.manual_seed(0)
    rgb = getattr(models, arch)(weights=None, num_classes=3).eval()
    gray_net = getattr(models, arch)(weights=None, num_classes=3).eval()
    gray_net.load_state_dict(rgb.state_dict())
    folded = fold_to_one_channel(_first_conv(arch, rgb))
    from mammacls.model import _set_first_conv

    _set_first_conv(arch, gray_net, folded)
    gray = (torch.rand(2, 1, 64, 64) - GRAY_MEAN) / GRAY_STD
    with torch.no_grad():
        expected = rgb(gray.repeat(1, 3, 1, 1))
        got = gray_net(gray)
    assert torch.allclose(expected, got, atol=1e-4, rtol=1e-4)
    assert folded.in_channels == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_has_one_channel_stem_and_three_outputs(arch):
    net = build_model(arch, pretrained=False).eval()
    assert _first_conv(arch, net).in_channels == 1
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 3)


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch hub cache for one test."""
    original = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(original)


def test_pretrained_weights_come_from_the_hub_cache_and_are_folded(hub_dir):
    weights = imagenet_weights("resnet18")
    reference = models.resnet18(weights=None)
    target = hub_dir / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    net = build_model("resnet18", pretrained=True)
    assert torch.allclose(net.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


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
