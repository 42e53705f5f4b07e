"""Batch augmentation on the training device: what differs between scanners and settings.

A CPU-side, image-by-image pipeline starves a GPU (and is slow on a CPU too), so the
``scanner`` preset transforms whole batches of tensors where they already are: geometry
(random resized crop that also zooms out, rotation, flip; masks follow), then what another
scanner or setting changes in a B-mode frame — lost resolution, blur, speckle, overall and
depth gain (TGC), gamma, contrast, noise, burned-in text and calliper marks. Every image
draws its own parameters.
"""

from __future__ import annotations

import math


def _uniform(n, low, high, device):
    import torch

    return torch.rand(n, device=device) * (high - low) + low


def geometric(x, masks, scale: tuple[float, float], rotation: float):
    """Random resized crop of ``scale`` times the area (above 1 zooms out: black padding, as a
    deeper setting shows), rotation within +-``rotation`` degrees and horizontal flip, each image
    its own; the same warp for the masks. x: B x 1 x S x S float in [0, 1] on any device."""
    import torch
    from torch.nn import functional as F

    n, device = x.shape[0], x.device
    area = _uniform(n, *scale, device)
    ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), device))
    sx, sy = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    tx = (torch.rand(n, device=device) * 2 - 1) * (1 - sx).abs()
    ty = (torch.rand(n, device=device) * 2 - 1) * (1 - sy).abs()
    angle = _uniform(n, -rotation, rotation, device) * math.pi / 180
    flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx * flip, -sin * sy, tx], 1),
                         torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = None if masks is None else (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros",
                                                       align_corners=False) > 0.5).float()
    return out, warped


def _gaussian_blur(x, sigma):
    """Per-image Gaussian blur (sigma: B) with one grouped separable convolution."""
    import torch
    from torch.nn import functional as F

    n, _, h, w = x.shape
    radius = 4
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None].clamp_min(1e-3)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    flat = x.reshape(1, n, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n)
    return flat.reshape(n, 1, h, w)


def _overlay_marks(x):
    """Burned-in text blocks and calliper crosses, as scanners draw them on the frame."""
    import torch

    n, _, h, w = x.shape
    device = x.device
    yy = torch.arange(h, device=device).view(1, 1, h, 1)
    xx = torch.arange(w, device=device).view(1, 1, 1, w)
    k = 4
    # text blocks: thin bright rectangles, mostly near the borders
    top = (torch.rand(n, k, 1, 1, device=device) ** 2 * (h - 10)).long()
    top = torch.where(torch.rand(n, k, 1, 1, device=device) < 0.5, top, h - 10 - top)
    left = (torch.rand(n, k, 1, 1, device=device) * (w - 20)).long()
    height = (torch.rand(n, k, 1, 1, device=device) * 5 + 3).long()
    width = (torch.rand(n, k, 1, 1, device=device) * 50 + 10).long()
    text = ((yy >= top) & (yy < top + height) & (xx >= left) & (xx < left + width)
            & (torch.rand(n, k, 1, 1, device=device) < 0.5)).any(1, keepdim=True)
    # calliper crosses: '+' marks anywhere
    cy = (torch.rand(n, 2, 1, 1, device=device) * h).long()
    cx = (torch.rand(n, 2, 1, 1, device=device) * w).long()
    arm = (torch.rand(n, 2, 1, 1, device=device) * 4 + 3).long()
    cross = ((((yy - cy).abs() <= arm) & ((xx - cx).abs() <= 0)) | (((xx - cx).abs() <= arm) & ((yy - cy).abs() <= 0)))
    cross = (cross & (torch.rand(n, 2, 1, 1, device=device) < 0.5)).any(1, keepdim=True)
    use = torch.rand(n, 1, 1, 1, device=device) < 0.3
    value = _uniform(n, 0.75, 1.0, device).view(n, 1, 1, 1)
    return torch.where(use & (text | cross), value, x)


def scanner_photometric(x):
    """What another scanner or another setting changes in a B-mode frame, per image at random."""
    import torch
    from torch.nn import functional as F

    n, _, h, w = x.shape
    device = x.device

    def chance(p):
        return (torch.rand(n, 1, 1, 1, device=device) < p).float()

    # lost resolution: down- and up-sampled (a coarser probe or a re-scaled export)
    factor = 0.35 + 0.45 * float(torch.rand(1))  # torch's CPU generator: saved in checkpoints, so resumable
    small = F.interpolate(x, size=(max(8, int(h * factor)), max(8, int(w * factor))), mode="area")
    coarse = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    pick = chance(0.25)
    x = pick * coarse + (1 - pick) * x
    pick = chance(0.3)  # blur
    x = pick * _gaussian_blur(x, _uniform(n, 0.4, 1.6, device)) + (1 - pick) * x
    # speckle: multiplicative noise, spatially correlated over ~2 px
    noise = F.interpolate(torch.randn(n, 1, h // 2, w // 2, device=device), size=(h, w), mode="bilinear",
                          align_corners=False)
    x = x * (1 + chance(0.5) * _uniform(n, 0.0, 0.25, device).view(n, 1, 1, 1) * noise)
    # overall gain, depth gain (time-gain compensation), gamma and contrast
    x = x * _uniform(n, 0.65, 1.35, device).view(n, 1, 1, 1)
    depth = torch.linspace(-1, 1, h, device=device).view(1, 1, h, 1)
    x = x * (1 + chance(0.5) * _uniform(n, -0.35, 0.35, device).view(n, 1, 1, 1) * depth)
    x = x.clamp(0, 1)
    x = x.clamp_min(1e-4) ** torch.exp(_uniform(n, -math.log(1.6), math.log(1.6), device)).view(n, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * _uniform(n, 0.7, 1.3, device).view(n, 1, 1, 1) + mean
    x = x + chance(0.3) * _uniform(n, 0.0, 0.03, device).view(n, 1, 1, 1) * torch.randn_like(x)
    return _overlay_marks(x.clamp(0, 1)).clamp(0, 1)


def standard_photometric(x):
    """Brightness and contrast +-20 % (the "standard" preset's photometric part)."""
    n, device = x.shape[0], x.device
    x = x * _uniform(n, 0.8, 1.2, device).view(n, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * _uniform(n, 0.8, 1.2, device).view(n, 1, 1, 1) + mean).clamp(0, 1)
