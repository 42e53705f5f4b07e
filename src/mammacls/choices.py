"""The fixed choices of the library and the CLI, as Enums: listed once here, shown by ``--help``,
and parsed by :func:`parse_choice`, which accepts any obvious spelling (``VGG16``, ``MobileNet-V2``)
and otherwise raises one clear line naming the parameter and the closest choice."""

from __future__ import annotations

import difflib
from enum import Enum
from typing import TypeVar

from mammacls.archs import ARCH_SPECS
from mammacls.errors import MammaclsError


class Choice(str, Enum):
    """A string choice: equal to, and printed as, its value (``Device.cpu == "cpu"``)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


Arch = Choice("Arch", {name: name for name in ARCH_SPECS})  # adding an architecture adds it here


class Device(Choice):
    auto = "auto"  # CUDA when available
    cpu = "cpu"
    cuda = "cuda"


class Backend(Choice):
    auto = "auto"  # ONNX Runtime on the CPU when the model has an export, else PyTorch
    onnx = "onnx"
    torch = "torch"


class Precision(Choice):
    auto = "auto"  # bf16 where the hardware runs it natively and it is faster (see mammacls.nets.compute)
    fp32 = "fp32"
    bf16 = "bf16"


class MemoryFormat(Choice):
    auto = "auto"  # the faster layout of the architecture on this device (ARCH_SPECS)
    channels_last = "channels-last"
    contiguous = "contiguous"  # NCHW


class ClassWeights(Choice):
    """How the loss weighs the classes: inverse frequency within each source (a source that lacks a
    class cannot inflate that class's weight), over all sources pooled, or not at all."""

    per_source = "per-source"
    pooled = "pooled"
    none = "none"


class Augmentation(Choice):
    """Training augmentation presets (their settings: ``mammacls.training.config.AUGMENTATIONS``)."""

    light = "light"
    standard = "standard"
    strong = "strong"
    scanner = "scanner"


C = TypeVar("C", bound=Choice)

# How a message names a kind of choice, where its class name would not say it
WORDS: dict[type[Choice], str] = {Arch: "architecture", MemoryFormat: "memory format", ClassWeights: "class weighting"}


def choice_word(kind: type[Choice]) -> str:
    return WORDS.get(kind, kind.__name__.lower())


def _squash(text: str) -> str:
    return "".join(ch for ch in str(text).lower() if ch.isalnum())


def parse_choice(kind: type[C], value: str | C, parameter: str) -> C:
    """The member of ``kind`` that ``value`` spells; else a :class:`MammaclsError` about ``parameter``
    ("unknown <choice_word(kind)> 'x': choose one of a, b, c (did you mean b?)")."""
    if isinstance(value, kind):
        return value
    by_squashed = {_squash(member.value): member for member in kind}
    if _squash(value) in by_squashed:
        return by_squashed[_squash(value)]
    close = difflib.get_close_matches(_squash(value), list(by_squashed), n=1, cutoff=0.6)
    hint = f" (did you mean {by_squashed[close[0]].value}?)" if close else ""
    raise MammaclsError(f"unknown {choice_word(kind)} {str(value)!r}: choose one of {', '.join(kind.values())}{hint}",
                        parameter=parameter)


def check_arch(arch: str) -> str:
    """The architecture ``arch`` names, in any obvious spelling (``VGG16``, ``MobileNet-V2``); a close
    match is suggested for a typo."""
    return parse_choice(Arch, arch, "arch").value
