"""What a training run is told: its settings, augmentation presets, and how it reports progress."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from mammacls.archs import ARCH_SPECS, DEFAULT_ARCH
from mammacls.choices import Augmentation, ClassWeights, Device, MemoryFormat, Precision, check_arch, parse_choice
from mammacls.errors import MammaclsError, param


# Ultrasound-appropriate augmentation presets: geometry, brightness/contrast/gamma and
# multiplicative (speckle-like) noise; never colour. "standard" is what earlier versions used.
AUGMENTATIONS: dict[str, dict[str, Any]] = {
    "light": {"random_resized_crop_scale": [0.85, 1.0], "horizontal_flip": 0.5, "rotation_degrees": 5,
              "brightness": 0.1, "contrast": 0.1, "gamma": 0.0, "speckle": 0.0},
    "standard": {"random_resized_crop_scale": [0.75, 1.0], "horizontal_flip": 0.5, "rotation_degrees": 10,
                 "brightness": 0.2, "contrast": 0.2, "gamma": 0.0, "speckle": 0.0},
    "strong": {"random_resized_crop_scale": [0.6, 1.0], "horizontal_flip": 0.5, "rotation_degrees": 15,
               "brightness": 0.25, "contrast": 0.25, "gamma": 0.3, "speckle": 0.15},
    # the shipped default's: batches transformed on the training device (mammacls.training.augment)
    "scanner": {"random_resized_crop_scale": [0.45, 1.35], "horizontal_flip": 0.5, "rotation_degrees": 15,
                "scanner": True},
}


DEFAULT_LR = 1e-3
# Fine-tuning a model that already knows the task. Measured (benchmarks/adapt.py --lrs, a BUSI-only
# MobileNetV2 adapted to all of BUS-BRA's train patients in 3 epochs): BUS-BRA test malignant AUC 0.905,
# 0.919, 0.916 at 1e-4, 3e-4, 1e-3 -- within each other's intervals; the middle one.
INIT_LR = 3e-4


DEFAULT_IMG_SIZE = 224


@dataclass
class TrainConfig:
    """A run's settings. ``arch``, ``img_size`` and ``mask_guided`` left None take their defaults, or with
    ``init`` the model's own (given, they must agree with it); ``validate`` fills them in."""

    arch: str | None = None
    pretrained: bool = True
    imagenet: str = "auto"  # auto, a torchvision variant (IMAGENET1K_V1) or a .pth file
    epochs: int = 30
    batch_size: int = 32
    lr: float | None = None  # None: DEFAULT_LR, or INIT_LR when starting from a model (init)
    weight_decay: float = 1e-4
    img_size: int | None = None
    seed: int = 42
    device: str = "auto"
    patience: int = 10
    label_smoothing: float = 0.0
    augmentation: dict[str, Any] = field(default_factory=lambda: dict(AUGMENTATIONS["standard"]))
    mask_guided: bool | None = None
    mask_weight: float = 0.5
    precision: str = "auto"  # auto, fp32, bf16 (mammacls.nets.compute)
    memory_format: str = "auto"  # auto, channels-last, contiguous
    class_weights: str = "per-source"  # per-source, pooled, none
    init: str | None = None  # start from this model (cache name, folder, file or "default"), keeping its design
    freeze: int = 0  # backbone stages kept fixed, from the stem (ARCH_SPECS[arch].stages)

    def validate(self) -> None:
        if self.init:
            from mammacls.training.warm_start import adopt_design, resolve_init

            self.init = str(self.init)
            adopt_design(self, resolve_init(self.init).card, self.init)
        self.arch = check_arch(self.arch or DEFAULT_ARCH)
        self.img_size = DEFAULT_IMG_SIZE if self.img_size is None else self.img_size
        self.mask_guided = bool(self.mask_guided)
        self.device = parse_choice(Device, self.device, "device").value
        self.precision = parse_choice(Precision, self.precision, "precision").value
        self.memory_format = parse_choice(MemoryFormat, self.memory_format, "memory_format").value
        self.class_weights = parse_choice(ClassWeights, self.class_weights, "class_weights").value
        if self.lr is None:
            self.lr = INIT_LR if self.init else DEFAULT_LR
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1),
                                 ("img_size", self.img_size, 32), ("patience", self.patience, 1),
                                 ("freeze", self.freeze, 0)):
            if value < low:
                raise MammaclsError(f"{param(name)} must be at least {low} (got {value})")
        stages = len(ARCH_SPECS[self.arch].stages)
        if self.freeze > stages:
            raise MammaclsError(f"{param('freeze')} {self.freeze}: {self.arch}'s backbone has {stages} stages "
                                f"(0 trains everything, {stages} only the head)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MammaclsError(f"{param('lr')} must be a positive number (got {self.lr})")
        if not 0 <= self.label_smoothing < 1:
            raise MammaclsError(f"{param('label_smoothing')} must be in [0, 1)")
        if not (0 <= self.mask_weight and math.isfinite(self.mask_weight)):
            raise MammaclsError(f"{param('mask_weight')} must be a non-negative number (got {self.mask_weight})")


def augmentation_preset(name: str | Augmentation) -> dict[str, Any]:
    return dict(AUGMENTATIONS[parse_choice(Augmentation, name, "augmentation").value])


class TrainReporter:
    """Hooks for progress display; the CLI fills them with rich output."""

    def message(self, text: str) -> None:
        print(text, file=sys.stderr)  # warnings must never be silent, even without a UI

    def info(self, text: str) -> None:  # what the run is doing (compute settings, its start)
        print(text, file=sys.stderr)

    def run_started(self, name: str, first_epoch: int, epochs: int, batches_per_epoch: int) -> None: ...
    def batch_done(self, epoch: int, loss: float) -> None: ...
    def epoch_done(self, record: dict[str, Any], improved: bool) -> None: ...
    def stage(self, text: str) -> None: ...  # a step after the epochs (calibration, export)
