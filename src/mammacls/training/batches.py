"""Training batches: images and masks loaded from a prepared dataset, augmented (on the CPU per
image, or batched on the device), and one epoch over this process's share of them."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from mammacls import CLASSES
from mammacls.data.prepared import ManifestRow, PreparedDataset
from mammacls.training.distributed import World, sum_over_ranks, wrap_for_training
from mammacls.errors import MammaclsError, param
from mammacls.nets.networks import forward_with_lesion, members_of, normalise
from mammacls.training.config import TrainConfig


def load_rows(dataset: PreparedDataset, rows: list[ManifestRow], size: int, fingerprints: dict[str, list]):
    """Resized images and labels of ``rows`` (from the dataset's cache at ``size``); records each
    image's fingerprints (pixel sha256, perceptual hash, thumbnail) and name (``source:file``)."""
    from mammacls.data.resized import resized_images

    from mammacls.data.dedup import thumbnail_to_text

    cached = resized_images(dataset, size, warn=_warn)
    positions = cached.rows(rows)
    fingerprints["sha256"].extend(row["sha256"] for row in rows)
    fingerprints["phash"].extend(cached.phashes[k] for k in positions)
    fingerprints.setdefault("thumb", []).extend(thumbnail_to_text(cached.thumbs[k]) for k in positions)
    fingerprints.setdefault("name", []).extend(f"{row['source']}:{Path(row['path']).name}" for row in rows)
    labels = np.array([CLASSES.index(row["label"]) for row in rows], dtype=np.int64)
    return np.ascontiguousarray(cached.images[positions]), labels


@dataclass(frozen=True)
class FittingImages:
    """A model's own train and validation images at its input size: what its calibration and refusal
    gate are fitted on, with their fingerprints (train then val; ``training_data.json`` keeps them)."""
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    fingerprints: dict[str, list] = field(default_factory=dict)


def load_fitting_images(dataset: PreparedDataset, train_rows: list[ManifestRow], val_rows: list[ManifestRow],
                        size: int) -> FittingImages:
    fingerprints: dict[str, list] = {"sha256": [], "phash": []}
    train_x, train_y = load_rows(dataset, train_rows, size, fingerprints)
    val_x, val_y = load_rows(dataset, val_rows, size, fingerprints)
    return FittingImages(train_x, train_y, val_x, val_y, fingerprints)


def load_masks(dataset: PreparedDataset, rows: list[ManifestRow], size: int):
    """Lesion masks (N x S x S, uint8 0/1) resized like the images, and whether each is known.

    A normal image's mask is empty; a benign or malignant image without a mask file has an
    unknown mask and is left out of the mask loss rather than taught "no lesion".
    """
    from mammacls.data.resized import resized_images

    cached = resized_images(dataset, size, warn=_warn)
    has_file = np.array([bool(row.get("mask_file")) for row in rows])
    known = has_file | np.array([row["label"] == "normal" for row in rows])
    masks = cached.masks(cached.rows(rows))
    masks[~has_file] = 0  # no mask file: empty (a normal scan) or unknown, never another row's mask
    return masks, known.astype(np.float32)


def _warn(text: str) -> None:
    import sys

    print(text, file=sys.stderr)


def augmenter(config: TrainConfig):
    """Geometric and brightness/contrast augmentation; a mask given beside the image gets the
    same geometry (torchvision tv_tensors) and no photometric change."""
    from torchvision.transforms import v2

    aug = config.augmentation
    return v2.Compose([
        v2.RandomResizedCrop(config.img_size, scale=tuple(aug["random_resized_crop_scale"]),
                             ratio=(0.85, 1.18), antialias=True),
        v2.RandomHorizontalFlip(aug["horizontal_flip"]),
        v2.RandomRotation(aug["rotation_degrees"]),
        v2.ColorJitter(brightness=aug["brightness"], contrast=aug["contrast"]),
    ])


def augment_batch(augment, images: np.ndarray, masks: np.ndarray | None, threads=None):
    """Augmented uint8 image batch (N x 1 x S x S) and, when given, the matching masks
    (the images spread over ``threads`` when given)."""
    import torch
    from torchvision import tv_tensors

    each = threads.map if threads is not None else map
    if masks is None:
        return torch.stack(list(each(lambda x: augment(torch.from_numpy(x).unsqueeze(0)), images))), None
    pairs = list(each(lambda pair: augment(tv_tensors.Image(torch.from_numpy(pair[0]).unsqueeze(0)),
                                           tv_tensors.Mask(torch.from_numpy(pair[1])[None])), zip(images, masks)))
    images_out = torch.stack([image.as_subclass(torch.Tensor) for image, _ in pairs])
    return images_out, torch.stack([mask.as_subclass(torch.Tensor) for _, mask in pairs])


def scanner_batch(images: np.ndarray, masks: np.ndarray | None, aug: dict[str, Any], device: str):
    """Network input and masks of the "scanner" preset, transformed as whole batches on ``device``."""
    import torch

    from mammacls.training.augment import geometric, scanner_photometric

    x = torch.from_numpy(images).to(device).float().unsqueeze(1) / 255.0
    m = None if masks is None else torch.from_numpy(masks).to(device).float().unsqueeze(1)
    x, m = geometric(x, m, tuple(aug["random_resized_crop_scale"]), float(aug["rotation_degrees"]))
    return normalise(scanner_photometric(x)), m


def photometric(batch, aug: dict[str, Any]):
    """Random gamma and multiplicative speckle-like noise on a [0, 1] batch, per image."""
    import torch

    gamma, speckle = float(aug.get("gamma", 0.0)), float(aug.get("speckle", 0.0))
    n = batch.shape[0]
    if gamma > 0:
        exponent = torch.exp((torch.rand(n, 1, 1, 1) * 2 - 1) * math.log1p(gamma)).to(batch.device)
        batch = batch.clamp_min(1e-6) ** exponent
    if speckle > 0:
        sigma = (torch.rand(n, 1, 1, 1) * speckle * (torch.rand(n, 1, 1, 1) < 0.5)).to(batch.device)
        batch = batch * (1 + sigma * torch.randn(batch.shape).to(batch.device))
    return batch.clamp(0, 1)


def lesion_loss(mask_logits, masks, known):
    """Per-image BCE + soft Dice (smoothed, so an empty mask is a valid target), averaged over
    the images whose mask is known."""
    import torch
    from torch.nn import functional as F

    logits = mask_logits.float().flatten(1)
    target = masks.float().flatten(1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return ((bce + dice) * known).sum() / known.sum().clamp_min(1)


def lesion_dice(maps: np.ndarray, masks: np.ndarray, known: np.ndarray) -> float:
    """Mean Dice of lesion probability maps thresholded at 0.5, over images with a known,
    non-empty mask."""
    scores = []
    for predicted, truth, k in zip(maps >= 0.5, masks.astype(bool), known):
        if k and truth.any():
            scores.append(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
    return float(np.mean(scores)) if scores else float("nan")


class EpochRunner:
    """One pass over this process's share of the training images (DistributedSampler: with one
    process, all of them in a seeded order that depends on the epoch, so resuming is exact).

    An ensemble trains every member on the same batches, each with its own loss (their mean is
    minimised, so each member learns as it would alone), one member's forward and backward after the
    other: only one member's activations are alive at a time (five at once took 15 GB at 224 px).
    Frozen stages stay in eval mode.
    """

    def __init__(self, config, current: World, compute, net, criterion, optimizer, images, labels,
                 masks, known, image_weights=None, frozen=()) -> None:
        import torch
        from torch.utils.data import DistributedSampler

        self.config, self.compute, self.criterion, self.optimizer = config, compute, criterion, optimizer
        self.device = compute.device
        self.current, self.net, self.frozen = current, net, list(frozen)
        self.images, self.labels, self.masks, self.known = images, labels, masks, known
        self.image_weights = np.asarray(np.ones(len(labels)) if image_weights is None else image_weights,
                                        dtype=np.float32)
        self.sampler = DistributedSampler(range(len(labels)), num_replicas=current.size, rank=current.rank,
                                          shuffle=True, seed=config.seed)
        self.local_batch = config.batch_size // current.size
        full, ragged = divmod(self.sampler.num_samples, self.local_batch)
        # a last batch under half the size is left out (a different few images each epoch): batch norm
        # on a handful of images is noise, and it costs nearly a whole batch's time
        self.batches = full + (1 if ragged and (ragged * 2 >= self.local_batch or not full) else 0)
        self.models = [wrap_for_training(_TrainStep.build(member, config.arch, masks is not None), current, self.device)
                       for member in members_of(net)]  # one DDP wrapper per member: each reduces its own gradients
        self.augment = None if config.augmentation.get("scanner") else augmenter(config)
        # On a GPU the CPU's per-image augmentation would starve it: threads augment the images of the
        # next batch while the GPU runs this one (torch releases the GIL). On the CPU the same cores
        # do both, so the order stays sequential and a resumed run stays exact.
        cuda = self.device.startswith("cuda")
        self.threads = (ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
                        if cuda and self.augment is not None else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and compute.precision == "fp16")
        # called once with the seconds of this runner's second step, its inputs' preparation included
        # (the first step pays one-off costs): what the run's steps really cost, measured for free
        self.on_step_timed: Callable[[float], None] | None = None
        self._steps = 0

    def run(self, epoch: int, reporter) -> tuple[float, float, int]:
        """Mean training loss over every process's images, this epoch's training seconds, and how many
        images every process trained on together."""
        import torch

        started = time.perf_counter()
        self.net.train()
        for module in self.frozen:  # fixed stages keep their batch-norm statistics too
            module.eval()
        self.sampler.set_epoch(epoch)
        order = np.fromiter(self.sampler, dtype=np.int64)
        total_loss, seen = 0.0, 0
        step_started = time.perf_counter()
        for picked, (inputs, masks) in self._batches(order):
            targets = torch.from_numpy(self.labels[picked]).to(self.device)
            weights = torch.from_numpy(self.image_weights[picked]).to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            inputs = inputs.contiguous(memory_format=self.compute.torch_memory_format)
            loss = 0.0
            for model in self.models:  # the gradient of the members' mean loss, one member at a time
                with self.compute.autocast():
                    logits, mask_logits = model(inputs)
                    member_loss = self._loss(logits, mask_logits, targets, weights, masks, picked) / len(self.models)
                if not torch.isfinite(member_loss):
                    raise MammaclsError(f"training diverged at epoch {epoch} (loss {member_loss.item()}); "
                                        f"try a lower {param('lr')}")
                self.scaler.scale(member_loss).backward()
                loss += member_loss.item()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += loss * len(picked)
            seen += len(picked)
            self._steps += 1
            if self._steps == 2 and self.on_step_timed is not None:
                self.on_step_timed(time.perf_counter() - step_started)
            reporter.batch_done(epoch, loss)
            step_started = time.perf_counter()
        loss_sum, count = sum_over_ranks([total_loss, float(seen)], self.current)
        return loss_sum / count, time.perf_counter() - started, int(count)

    def _loss(self, logits, mask_logits, targets, weights, masks, picked):
        import torch

        loss = self.criterion(logits.float(), targets, weights)
        if masks is not None:
            loss = loss + self.config.mask_weight * lesion_loss(
                mask_logits, masks.to(self.device), torch.from_numpy(self.known[picked]).to(self.device))
        return loss

    def close(self) -> None:
        if self.threads is not None:
            self.threads.shutdown()

    def _batches(self, order: np.ndarray):
        """(indices, (inputs, masks)) per batch; on a GPU the next batch is prepared meanwhile."""
        slices = [order[b * self.local_batch:(b + 1) * self.local_batch] for b in range(self.batches)]
        if not self.device.startswith("cuda"):
            yield from ((picked, self._inputs(picked)) for picked in slices)
            return
        with ThreadPoolExecutor(max_workers=1) as ahead:
            upcoming = ahead.submit(self._inputs, slices[0])
            for index, picked in enumerate(slices):
                ready = upcoming.result()
                if index + 1 < len(slices):
                    upcoming = ahead.submit(self._inputs, slices[index + 1])
                yield picked, ready

    def _inputs(self, picked: np.ndarray):
        """Augmented, normalised network input on the device, and the matching masks (or None)."""
        masks = None if self.masks is None else self.masks[picked]
        if self.config.augmentation.get("scanner"):
            return scanner_batch(self.images[picked], masks, self.config.augmentation, self.device)
        images, masks = augment_batch(self.augment, self.images[picked], masks, self.threads)
        images = images.pin_memory() if self.threads is not None else images
        return normalise(photometric(images.to(self.device, non_blocking=True).float() / 255.0,
                                      self.config.augmentation)), masks


class _TrainStep:
    """One network's training forward as one module, so that DDP sees (and synchronises) the whole pass,
    lesion decoder included: (class logits, mask logits or None)."""

    @staticmethod
    def build(net, arch: str, lesion: bool):
        import torch

        class TrainStep(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, x):
                return forward_with_lesion(arch, self.net, x) if lesion else (self.net(x), None)

        return TrainStep()
