"""The "scanner" augmentation: batched on the training device, masks follow the geometry."""

import numpy as np
import torch

from mammacls.training.augment import geometric, scanner_photometric


def test_masks_follow_the_geometry_exactly():
    torch.manual_seed(0)
    blobs = torch.zeros(16, 1, 64, 64)
    for k in range(16):
        y, x = 10 + 2 * k, 50 - 2 * k
        blobs[k, 0, y - 6:y + 6, x - 8:x + 8] = 1.0
    warped, masks = geometric(blobs, blobs.clone(), (0.45, 1.35), 15.0)
    assert warped.shape == masks.shape == blobs.shape
    agreement = ((warped > 0.5).float() == masks).float().mean().item()
    assert agreement > 0.995
    assert masks.sum() > 0 and not torch.equal(masks, blobs)  # it moved, and the lesions stayed in view


def test_scanner_photometric_varies_each_image_within_range():
    torch.manual_seed(1)
    np.random.seed(1)
    frame = torch.rand(1, 1, 64, 64) * 0.6 + 0.2
    batch = frame.repeat(32, 1, 1, 1)
    out = scanner_photometric(batch)
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    per_image = (out - batch).abs().flatten(1).mean(1)
    assert (per_image > 1e-3).float().mean() > 0.9  # nearly every image changed
    assert out.flatten(1).std(0).mean() > 0.01  # and each in its own way
