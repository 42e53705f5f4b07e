"""The architectures mammacls trains, as data: adding one is adding a spec here.

Each spec names (as ``get_submodule`` paths in the torchvision network) the modules
mammacls adapts or taps. Plain data, no torch: model files are validated against these
names on the torch-free prediction path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    stem: str  # the first convolution: its RGB filters are summed into one grey channel
    head: str  # the final Linear: replaced for 3 classes; its input is the penultimate feature vector
    gradcam: str  # the module whose output Grad-CAM explains: the last convolutional block
    mid: str  # the stride-8 feature map the lesion decoder reads (detail)
    deep: str  # the last feature map the lesion decoder reads (context)
    decoder_channels: tuple[int, int]  # channels of mid and deep
    # the backbone's stages, first to last (modules by resolution, stem first): --freeze K keeps the first K fixed
    stages: tuple[tuple[str, ...], ...] = ()
    slow_on_cpu: bool = False  # warn before training on a CPU
    # Measured (benchmarks/train_throughput.py): channels_last is faster on the CPU for all three, and
    # bf16 autocast only where the CPU runs bf16 natively (AMX / AVX512-BF16); emulated, it is 2-3x slower.
    cpu_channels_last: bool = True
    cpu_bf16: bool = True
    imagenet_offline_note: str = ""  # where its ImageNet file can be had without torchvision's download


def _numbered(parent: str, bounds: tuple[int, ...]) -> tuple[tuple[str, ...], ...]:
    """Stages of a numbered Sequential: children bounds[i] .. bounds[i+1]-1 of ``parent``."""
    return tuple(tuple(f"{parent}.{k}" for k in range(start, end)) for start, end in zip(bounds, bounds[1:]))


ARCH_SPECS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(stem="conv1", head="fc", gradcam="layer4", mid="layer2", deep="layer4",
                         decoder_channels=(128, 512),
                         stages=(("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))),
    "vgg16": ArchSpec(stem="features.0", head="classifier.6", gradcam="features.29",  # ReLU before the last pool
                      mid="features.16", deep="features.30", decoder_channels=(256, 512), slow_on_cpu=True,
                      stages=_numbered("features", (0, 5, 10, 17, 24, 31))),  # each block ends with its pool
    "mobilenet_v2": ArchSpec(stem="features.0.0", head="classifier.1", gradcam="features.18", mid="features.6",
                             deep="features.18", decoder_channels=(32, 1280),
                             stages=_numbered("features", (0, 2, 4, 7, 14, 19)),  # strides 2, 4, 8, 16, 32
                             imagenet_offline_note="MobileNetV2's IMAGENET1K_V1 file can be had offline from PyPI "
                                                   "(see the README)"),
}
ARCHS = tuple(ARCH_SPECS)
DEFAULT_ARCH = "mobilenet_v2"
