"""benchmarks/efficientnet_lite0.py: the network the wheel's ImageNet file must fit, its grey-scan
form and its lesion taps (the wheel itself is not needed: a file is built from the network)."""

import importlib
import io
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def lite0():
    return importlib.import_module("efficientnet_lite0")


def _as_the_wheel_names_it(state: dict) -> dict:
    """``state`` under lukemelas/EfficientNet-PyTorch's names, as the wheel's file has them."""
    named = {}
    for key, value in state.items():
        if key.startswith(("features.0.", "features.17.")):
            named[key.split(".", 2)[2]] = value
        elif key.startswith("features."):
            _, index, rest = key.split(".", 2)
            named[f"_blocks.{int(index) - 1}.{rest}"] = value
        else:
            named["_fc." + key.split(".", 2)[2]] = value
    return named


def _file(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_a_file_under_the_wheels_names_loads_whole_and_any_other_is_refused(lite0):
    torch.manual_seed(0)
    net = lite0.build()
    original = net.state_dict()
    assert len(original) == 296 and sum(v.numel() for k, v in original.items() if "num_batches" not in k) == 4_694_024
    wheel_style = _as_the_wheel_names_it(original)
    assert "_blocks.15._project_conv.weight" in wheel_style and "_conv_stem.weight" in wheel_style
    loaded = lite0.imagenet_state(_file(wheel_style), lite0.build())
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    missing = dict(wheel_style)
    del missing["_blocks.3._bn1.running_var"]
    with pytest.raises(ValueError, match="missing"):
        lite0.imagenet_state(_file(missing), net)
    reshaped = {**wheel_style, "_fc.weight": torch.zeros(10, 1280)}
    with pytest.raises(ValueError, match="shapes differ"):
        lite0.imagenet_state(_file(reshaped), net)
    with pytest.raises(ValueError, match="unexpected parameter"):
        lite0.imagenet_state(_file({**wheel_style, "_se.weight": torch.zeros(1)}), net)


def test_tf_same_padding_halves_odd_and_even_sizes_and_the_taps_are_at_stride_8_and_32(lite0):
    torch.manual_seed(0)
    for same in (True, False):
        net = lite0.build(same_padding=same).eval()
        for side in (224, 97):
            with torch.no_grad():
                mid = net.features[:6](torch.zeros(1, 3, side, side))
                deep = net.features[6:](mid)
            assert tuple(mid.shape) == (1, 40, -(-side // 8), -(-side // 8))
            assert tuple(deep.shape) == (1, 1280, -(-side // 32), -(-side // 32))


def test_the_grey_stem_answers_as_the_replicated_image_in_minus_one_to_one(lite0):
    from mammacls.nets.networks import GRAY_MEAN, GRAY_STD

    torch.manual_seed(0)
    rgb_stem = lite0.build().features[0]._conv_stem
    torch.manual_seed(0)  # the same weights, then folded
    net = lite0.for_grey_scans(lite0.build(), 3)
    assert net.classifier[1].out_features == 3 and net.features[0]._conv_stem.in_channels == 1
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        wanted = rgb_stem(((grey - 0.5) / 0.5).expand(-1, 3, -1, -1))
        got = net.features[0]._conv_stem((grey - GRAY_MEAN) / GRAY_STD)
    torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-4)  # no padding inside: exact to rounding
    assert wanted.abs().max() > 0.1


def test_the_lesion_decoder_reads_the_taps_and_answers_at_the_inputs_size(lite0):
    from mammacls.nets.lesion import LesionDecoder

    torch.manual_seed(0)
    net = lite0.for_grey_scans(lite0.build(), 3)
    net.lesion_decoder = LesionDecoder(*lite0.SPEC["decoder_channels"])
    x = torch.randn(2, 1, 96, 96)
    logits, mask = lite0.forward_with_lesion(net.eval(), x)
    assert tuple(logits.shape) == (2, 3) and tuple(mask.shape) == (2, 1, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x))  # the same classifier as the plain forward
