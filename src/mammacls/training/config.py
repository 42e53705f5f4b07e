"""What a training run is told: its settings, augmentation presets, and how it reports progress."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from mammacls.archs import DEFAULT_ARCH, check_arch
from mammacls.choices import Augmentation, Device, parse_choice
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


@dataclass
class TrainConfig:
    arch: str = DEFAULT_ARCH
    pretrained: bool = True
    imagenet: str = "auto"  # auto, a torchvision variant (IMAGENET1K_V1) or a .pth file
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    img_size: int = 224
    seed: int = 42
    device: str = "auto"
    patience: int = 10
    label_smoothing: float = 0.0
    augmentation: dict[str, Any] = field(default_factory=lambda: dict(AUGMENTATIONS["standard"]))
    mask_guided: bool = False
    mask_weight: float = 0.5

    def validate(self) -> None:
        self.arch = check_arch(self.arch)
        self.device = parse_choice(Device, self.device, "device").value
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1),
                                 ("img_size", self.img_size, 32), ("patience", self.patience, 1)):
            if value < low:
                raise MammaclsError(f"{param(name)} must be at least {low} (got {value})")
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

    def run_started(self, name: str, first_epoch: int, epochs: int, batches_per_epoch: int) -> None: ...
    def batch_done(self, epoch: int, loss: float) -> None: ...
    def epoch_done(self, record: dict[str, Any], improved: bool) -> None: ...
    def stage(self, text: str) -> None: ...  # a step after the epochs (calibration, export)
