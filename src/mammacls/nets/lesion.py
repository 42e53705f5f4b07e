"""The lesion decoder of mask-guided training: a light FPN-style head on two backbone feature maps,
one at stride 8 (detail) and the last one (context). Its submodule names are part of the weights'
keys (``lesion_decoder.mid.0.weight``, ...), so models saved before it was a class still load."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

DECODER_WIDTH = 64


def _conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class LesionDecoder(nn.Module):
    def __init__(self, mid_channels: int, deep_channels: int, width: int = DECODER_WIDTH) -> None:
        super().__init__()
        self.mid = _conv_bn(mid_channels, width, 1)
        self.deep = _conv_bn(deep_channels, width, 1)
        self.fuse = nn.Sequential(_conv_bn(width, width, 3), _conv_bn(width, width, 3))
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, mid: torch.Tensor, deep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Lesion-mask logits (N x 1 x size) from the two feature maps."""
        fused = self.mid(mid) + F.interpolate(self.deep(deep), size=mid.shape[-2:], mode="bilinear",
                                              align_corners=False)
        return F.interpolate(self.out(self.fuse(fused)), size=size, mode="bilinear", align_corners=False)
