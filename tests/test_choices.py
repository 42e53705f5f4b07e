"""Choices as Enums, parsed forgivingly; errors that name the library's argument, shown as options by the CLI."""

import pickle

import pytest

from mammacls.archs import ARCH_SPECS
from mammacls.choices import Arch, Augmentation, Backend, Device, parse_choice
from mammacls.cli.common import OPTION_NAMES
from mammacls.errors import MammaclsError, param
from mammacls.training.config import AUGMENTATIONS


def test_every_choice_has_its_settings():
    assert Arch.values() == tuple(ARCH_SPECS) and set(Augmentation.values()) == set(AUGMENTATIONS)
    assert Device.cpu == "cpu" and str(Backend.onnx) == "onnx" and f"{Device.cuda}" == "cuda"


@pytest.mark.parametrize("spelling, member", [("CPU", Device.cpu), (" cuda", Device.cuda), ("ONNX", Backend.onnx),
                                              ("MobileNet-V2", Arch["mobilenet_v2"]), (Device.auto, Device.auto)])
def test_obvious_spellings_parse(spelling, member):
    assert parse_choice(type(member), spelling, "x") is member


def test_a_typo_names_the_parameter_and_the_closest_choice():
    with pytest.raises(MammaclsError, match=r"unknown backend 'onxx': choose one of auto, onnx, torch "
                                            r"\(did you mean onnx\?\)") as caught:
        parse_choice(Backend, "onxx", "backend")
    assert caught.value.parameter == "backend"
    assert caught.value.with_option_names() == caught.value.message  # it names the kind of choice in words


def test_parameters_read_as_python_names_and_as_options():
    error = MammaclsError(f"{param('lesion_dir')} needs PyTorch; drop {param('backend')} onnx", exit_code=3)
    assert str(error) == "lesion_dir needs PyTorch; drop backend onnx" and error.parameter == "lesion_dir"
    assert error.with_option_names(OPTION_NAMES) == "--lesion-map needs PyTorch; drop --backend onnx"
    again = pickle.loads(pickle.dumps(error))  # raised in a worker process, reported by the parent
    assert (str(again), again.parameter, again.exit_code) == (str(error), "lesion_dir", 3)
    plain = MammaclsError("file not found: x.png")
    assert plain.parameter is None and plain.with_option_names() == "file not found: x.png"
