"""Train: fit a CNN on a prepared dataset, selecting the model on validation only.

Selection and early stopping use validation macro-F1 (ties: lower validation
loss). The test split is never read here. After every epoch a checkpoint
(weights, optimiser, scheduler, RNG state, history) is written atomically, so
an interrupted run resumes where it stopped; the best model so far is always
saved as a complete model folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mammacls import CLASSES
from mammacls.archs import ARCH_SPECS
from mammacls.data import PreparedDataset, load_prepared
from mammacls.distributed import SINGLE, World, barrier, broadcast, sum_over_ranks, world, wrap_for_training
from mammacls.errors import MammaclsError
from mammacls.inference.images import resize_square
from mammacls.model import (
    GRAY_MEAN, GRAY_STD, attach_lesion_decoder, build_model, build_pretrained_model, check_arch, forward_with_lesion,
    normalise,
    predict_lesion_maps, predict_proba, resolve_device,
)
from mammacls.inference.predictor import softmax
from mammacls.metrics import compute_metrics
from mammacls.store import atomic_path, cache_lock, check_model_name, models_dir
from mammacls.inference.model_files import CHECKPOINT_FILE, METADATA_FILE, MODEL_FILE, ensemble_size
from mammacls.weights import library_versions, save_model

# Measured: VGG16 takes about 9 minutes an epoch at 224 px on 2 CPU cores.
SLOW_EPOCH_SECONDS = 60


# Ultrasound-appropriate augmentation presets: geometry, brightness/contrast/gamma and
# multiplicative (speckle-like) noise; never colour. "standard" is what earlier versions used.
AUGMENTATIONS: dict[str, dict[str, Any]] = {
    "light": {"random_resized_crop_scale": [0.85, 1.0], "horizontal_flip": 0.5, "rotation_degrees": 5,
              "brightness": 0.1, "contrast": 0.1, "gamma": 0.0, "speckle": 0.0},
    "standard": {"random_resized_crop_scale": [0.75, 1.0], "horizontal_flip": 0.5, "rotation_degrees": 10,
                 "brightness": 0.2, "contrast": 0.2, "gamma": 0.0, "speckle": 0.0},
    "strong": {"random_resized_crop_scale": [0.6, 1.0], "horizontal_flip": 0.5, "rotation_degrees": 15,
               "brightness": 0.25, "contrast": 0.25, "gamma": 0.3, "speckle": 0.15},
    # the shipped default's: batches transformed on the training device (mammacls.augment)
    "scanner": {"random_resized_crop_scale": [0.45, 1.35], "horizontal_flip": 0.5, "rotation_degrees": 15,
                "scanner": True},
}


@dataclass
class TrainConfig:
    arch: str = "mobilenet_v2"
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
        for name, value, low in (("epochs", self.epochs, 1), ("batch-size", self.batch_size, 1),
                                 ("img-size", self.img_size, 32), ("patience", self.patience, 1)):
            if value < low:
                raise MammaclsError(f"--{name} must be at least {low} (got {value})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MammaclsError(f"--lr must be a positive number (got {self.lr})")
        if not 0 <= self.label_smoothing < 1:
            raise MammaclsError("--label-smoothing must be in [0, 1)")
        if not (0 <= self.mask_weight and math.isfinite(self.mask_weight)):
            raise MammaclsError(f"--mask-weight must be a non-negative number (got {self.mask_weight})")


def augmentation_preset(name: str) -> dict[str, Any]:
    if name not in AUGMENTATIONS:
        raise MammaclsError(f"unknown augmentation {name!r}: choose one of {', '.join(AUGMENTATIONS)}")
    return dict(AUGMENTATIONS[name])


class TrainReporter:
    """Hooks for progress display; the CLI fills them with rich output."""

    def message(self, text: str) -> None:
        print(text, file=sys.stderr)  # warnings must never be silent, even without a UI

    def run_started(self, name: str, first_epoch: int, epochs: int, batches_per_epoch: int) -> None: ...
    def batch_done(self, epoch: int, loss: float) -> None: ...
    def epoch_done(self, record: dict[str, Any], improved: bool) -> None: ...
    def stage(self, text: str) -> None: ...  # a step after the epochs (calibration, export)


def _new_run_name(arch: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, k = f"{arch}-{stamp}", 2
    while (models_dir() / name).exists():
        name, k = f"{arch}-{stamp}-{k}", k + 1
    return name


def _rows_for(dataset: PreparedDataset, split_rows: dict[str, list[str]] | None):
    """Train and val rows: the prepared split, or explicit paths (one cross-validation fold)."""
    if split_rows is None:
        train_rows, val_rows = dataset.split("train"), dataset.split("val")
    else:
        by_path = {row["path"]: row for row in dataset.rows}
        train_rows = [by_path[p] for p in split_rows["train"]]
        val_rows = [by_path[p] for p in split_rows["val"]]
    for name, rows in (("train", train_rows), ("val", val_rows)):
        if not rows:
            raise MammaclsError(f"the prepared dataset has no {name} images; run mammacls prepare again")
    return train_rows, val_rows


def find_resumable(name: str | None) -> Path:
    root = models_dir()
    if name:
        folder = root / name
        if not (folder / CHECKPOINT_FILE).is_file():
            raise MammaclsError(f"nothing to resume for {name!r}: no checkpoint in {folder}")
        return folder
    candidates = sorted(
        (p for p in root.glob(f"*/{CHECKPOINT_FILE}")), key=lambda p: p.stat().st_mtime, reverse=True
    ) if root.is_dir() else []
    if not candidates:
        raise MammaclsError("nothing to resume: no interrupted training run in the cache")
    return candidates[0].parent


def _load_rows(dataset: PreparedDataset, rows: list[dict[str, str]], size: int, fingerprints: dict[str, list]):
    """Resized images and labels of ``rows``; records each image's content fingerprint."""
    from mammacls.data import perceptual_hash, phash_to_hex

    images = []
    for row in rows:
        full = dataset.load_image(row)
        fingerprints["sha256"].append(row["sha256"])
        fingerprints["phash"].append(phash_to_hex(perceptual_hash(full)))
        images.append(resize_square(full, size))
    labels = np.array([CLASSES.index(row["label"]) for row in rows], dtype=np.int64)
    return np.stack(images), labels


def _load_masks(dataset: PreparedDataset, rows: list[dict[str, str]], size: int):
    """Lesion masks (N x S x S, uint8 0/1) resized like the images, and whether each is known.

    A normal image's mask is empty; a benign or malignant image without a mask file has an
    unknown mask and is left out of the mask loss rather than taught "no lesion".
    """
    masks, known = [], []
    for row in rows:
        full = dataset.load_mask(row)
        masks.append((resize_square(full * np.uint8(255), size) >= 128).astype(np.uint8))
        known.append(bool(row.get("mask_file")) or row["label"] == "normal")
    return np.stack(masks), np.array(known, dtype=np.float32)


def _augmenter(config: TrainConfig):
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


def _augment_batch(augment, images: np.ndarray, masks: np.ndarray | None, threads=None):
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


def _scanner_batch(images: np.ndarray, masks: np.ndarray | None, aug: dict[str, Any], device: str):
    """Network input and masks of the "scanner" preset, transformed as whole batches on ``device``."""
    import torch

    from mammacls.augment import geometric, scanner_photometric

    x = torch.from_numpy(images).to(device).float().unsqueeze(1) / 255.0
    m = None if masks is None else torch.from_numpy(masks).to(device).float().unsqueeze(1)
    x, m = geometric(x, m, tuple(aug["random_resized_crop_scale"]), float(aug["rotation_degrees"]))
    return normalise(scanner_photometric(x)), m


def _photometric(batch, aug: dict[str, Any]):
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


def train_model(
    config: TrainConfig,
    data_dir: Path | None = None,
    resume: bool = False,
    name: str | None = None,
    reporter: TrainReporter | None = None,
    export: bool = True,
    split_rows: dict[str, list[str]] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    data_parallel: bool = True,
) -> dict[str, Any]:
    """Train (or resume) one model, then export it to ONNX; returns its saved metadata.

    The run holds the model's name in the cache (a second run of that name is refused, naming this
    one) and a shared hold on its prepared dataset (``prepare`` cannot replace it meanwhile).

    Under torchrun (``data_parallel``) every process trains on its share of each global batch
    (``config.batch_size`` images split over the processes) with DDP; rank 0 alone reports,
    saves, calibrates and exports, and every rank returns the saved metadata.
    """
    current = world(config.device) if data_parallel else SINGLE
    if not current.is_main:
        reporter = None  # rank 0 alone reports
    if resume:
        name = find_resumable(name).name
    else:
        config.validate()
        name = broadcast(check_model_name(name) if name else _new_run_name(config.arch), current)
    with contextlib.ExitStack() as hold:
        if current.is_main:
            hold.enter_context(cache_lock(f"model-{name}", f"mammacls train --name {name}"))
        return _train(config, data_dir, resume, name, reporter, export, split_rows, extra_metadata, hold, current)


def _train(config, data_dir, resume, name, reporter, export, split_rows, extra_metadata, hold,
           current: World) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    reporter = reporter or TrainReporter()
    checkpoint_state = None
    if resume:
        run_dir = find_resumable(name)
        checkpoint_state = _read_checkpoint(run_dir / CHECKPOINT_FILE)
        config = TrainConfig(**checkpoint_state["config"])
        data_dir = Path(checkpoint_state["data_dir"])
        split_rows = checkpoint_state.get("split_rows")
        extra_metadata = checkpoint_state.get("extra_metadata")
        name = run_dir.name
    else:
        if (models_dir() / name).exists():
            raise MammaclsError(f"a model named {name!r} exists already; choose another --name or use --resume")
        run_dir = models_dir() / name
    if config.batch_size % current.size:
        raise MammaclsError(f"--batch-size {config.batch_size} is the global batch: it must divide evenly "
                            f"over the {current.size} processes")
    device = resolve_device(config.device)  # under torchrun "cuda" is this process's own GPU
    dataset = load_prepared(data_dir, hold, f"mammacls train --name {name}")
    if resume and dataset.manifest_sha256 != checkpoint_state["manifest_sha256"]:
        raise MammaclsError(f"the prepared dataset at {dataset.root} changed since this run started; cannot resume")

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    if config.pretrained and not resume:
        net, imagenet_record = build_pretrained_model(config.arch, len(CLASSES), config.imagenet)
    else:  # a resumed run takes its weights from the checkpoint
        net = build_model(config.arch, len(CLASSES))
        imagenet_record = checkpoint_state.get("imagenet") if checkpoint_state else None
    if config.mask_guided:
        attach_lesion_decoder(config.arch, net)
    net = net.to(device)
    train_rows, val_rows = _rows_for(dataset, split_rows)
    fingerprints: dict[str, list] = {"sha256": [], "phash": []}
    train_x, train_y = _load_rows(dataset, train_rows, config.img_size, fingerprints)
    val_x, val_y = _load_rows(dataset, val_rows, config.img_size, fingerprints)
    train_masks = train_known = val_masks = val_known = None
    if config.mask_guided:
        train_masks, train_known = _load_masks(dataset, train_rows, config.img_size)
        val_masks, val_known = _load_masks(dataset, val_rows, config.img_size)
        if train_known[train_y != CLASSES.index("normal")].sum() == 0:
            raise MammaclsError("--mask-guided: no benign or malignant training image has a lesion mask "
                                "(BUSI layout: NAME_mask.png beside NAME.png)")
    counts = np.bincount(train_y, minlength=len(CLASSES)).astype(np.float64)
    if (counts == 0).any():
        missing = [c for c, n in zip(CLASSES, counts) if n == 0]
        raise MammaclsError(f"the train split has no {', '.join(missing)} images; cannot train a 3-class model")
    class_weights = counts.sum() / (len(CLASSES) * counts)
    criterion = torch.nn.CrossEntropyLoss(
        weight=torch.tensor(class_weights, dtype=torch.float32, device=device),
        label_smoothing=config.label_smoothing,
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    step = _EpochRunner(config, current, device, net, criterion, optimizer, train_x, train_y, train_masks,
                        train_known)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "macro_f1": -1.0, "val_loss": math.inf, "metrics": None}
    first_epoch = 1
    if checkpoint_state:
        net.load_state_dict(checkpoint_state["model"])
        optimizer.load_state_dict(checkpoint_state["optimizer"])
        scheduler.load_state_dict(checkpoint_state["scheduler"])
        torch.set_rng_state(checkpoint_state["rng"])
        history, best = checkpoint_state["history"], checkpoint_state["best"]
        first_epoch = len(history) + 1
        reporter.message(f"resuming {name} at epoch {first_epoch}/{config.epochs} with its saved settings")

    if current.distributed:  # each process its own augmentation stream
        torch.manual_seed(config.seed + 1_000_003 * current.rank + len(history))
    # no folder until the first epoch is saved: a run stopped before that leaves nothing that looks like a model
    base_meta = {
        "name": name, "arch": config.arch, "classes": list(CLASSES), "num_classes": len(CLASSES),
        "in_chans": 1, "img_size": config.img_size, "input_size": [1, config.img_size, config.img_size],
        "interpolation": "area (shrink) / bilinear (enlarge), square resize",
        "mean": [GRAY_MEAN], "std": [GRAY_STD], "input_range": "grayscale uint8 / 255",
        "pretrained": imagenet_record,
        "config": asdict(config), "seed": config.seed, "device": device,
        "mask_guided": config.mask_guided,
        "data": {"prepared_dir": str(dataset.root.resolve()), "manifest_sha256": dataset.manifest_sha256,
                 "train_images": int(len(train_y)), "val_images": int(len(val_y)),
                 "sources": _source_counts(train_rows, val_rows),
                 "class_weights": dict(zip(CLASSES, class_weights.round(4).tolist())),
                 "train_val_groups": sorted({row["group_id"] for row in train_rows + val_rows}),
                 "train_val_fingerprints": fingerprints},
        "selection": "best validation macro-F1 (ties: lower validation loss); test split never used",
        "training_processes": {"world_size": current.size, "backend": current.backend},
        "versions": library_versions(),
        **(extra_metadata or {}),
    }
    if device == "cpu" and first_epoch <= config.epochs and not current.distributed:
        _estimate_cpu_time(net, criterion, optimizer, config, train_x, step.batches, len(val_y), reporter)
    reporter.run_started(name, first_epoch, config.epochs, step.batches)

    epochs_since_best = first_epoch - 1 - best["epoch"] if best["epoch"] else 0
    for epoch in range(first_epoch, config.epochs + 1):
        started = time.perf_counter()
        train_loss, train_seconds = step.run(epoch, reporter)
        scheduler.step()
        verdict = None
        if current.is_main:  # rank 0 validates, selects and saves; the others wait for its verdict
            record, metrics, val_loss = _validate(net, config, val_x, val_y, val_masks, val_known, criterion, device)
            record.update(epoch=epoch, train_loss=train_loss, lr=optimizer.param_groups[0]["lr"],
                          train_seconds=round(train_seconds, 2),
                          train_images_per_s=round(len(train_y) / train_seconds, 1),
                          seconds=round(time.perf_counter() - started, 2))
            history.append(record)
            improved = (metrics["macro_f1"] > best["macro_f1"]
                        or (metrics["macro_f1"] == best["macro_f1"] and val_loss < best["val_loss"]))
            if improved:
                best = {"epoch": epoch, "macro_f1": metrics["macro_f1"], "val_loss": val_loss, "metrics": metrics}
                epochs_since_best = 0
                save_model(net, {**base_meta, "status": "training", "best_epoch": epoch,
                                 "val_metrics": metrics, "history": history}, run_dir)
            else:
                epochs_since_best += 1
            _write_checkpoint(run_dir / CHECKPOINT_FILE, net, optimizer, scheduler, {
                "config": asdict(config), "data_dir": str(dataset.root.resolve()),
                "manifest_sha256": dataset.manifest_sha256, "history": history, "best": best,
                "split_rows": split_rows, "extra_metadata": extra_metadata, "imagenet": imagenet_record,
            })
            reporter.epoch_done(record, improved)
            verdict = epochs_since_best >= config.patience
        if broadcast(verdict, current):
            reporter.message(f"early stop: validation macro-F1 has not improved for {config.patience} epochs")
            break

    step.close()
    if not current.is_main:  # rank 0 calibrates and exports; the result is read back from its files
        barrier(current)
        return json.loads((run_dir / METADATA_FILE).read_text(encoding="utf-8"))
    reporter.stage("calibrating on validation, fitting the refusal densities")
    final = json.loads((run_dir / METADATA_FILE).read_text(encoding="utf-8"))
    if config.mask_guided:
        final["val_lesion_dice"] = history[final["best_epoch"] - 1].get("val_lesion_dice")
    final.update(status="complete", history=history, epochs_run=len(history),
                 finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    net.load_state_dict(load_file(str(run_dir / MODEL_FILE), device=device))  # the selected epoch
    final.update(_calibrate(net, config.arch, train_x, train_y, val_x, val_y, device, run_dir))
    final = save_model(net, final, run_dir)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    if export:
        from mammacls.export import export_onnx
        from mammacls.inference.model_files import ModelRef

        ref = ModelRef(name, run_dir / MODEL_FILE, final, "cache")
        reporter.stage("exporting to ONNX")
        try:
            export_onnx(ref)
        except MammaclsError as exc:  # the model itself is saved; only the fast predict path is missing
            reporter.message(f"warning: {exc}; predict will use PyTorch for this model")
    barrier(current)
    return final


class _EpochRunner:
    """One pass over this process's share of the training images (DistributedSampler: with one
    process, all of them in a seeded order that depends on the epoch, so resuming is exact)."""

    def __init__(self, config, current: World, device: str, net, criterion, optimizer, images, labels,
                 masks, known) -> None:
        import torch
        from torch.utils.data import DistributedSampler

        self.config, self.device, self.criterion, self.optimizer = config, device, criterion, optimizer
        self.current, self.net = current, net
        self.images, self.labels, self.masks, self.known = images, labels, masks, known
        self.sampler = DistributedSampler(range(len(labels)), num_replicas=current.size, rank=current.rank,
                                          shuffle=True, seed=config.seed)
        self.local_batch = config.batch_size // current.size
        self.batches = math.ceil(self.sampler.num_samples / self.local_batch)
        self.model = wrap_for_training(_TrainStep.build(net, config.arch, masks is not None), current, device)
        self.augment = None if config.augmentation.get("scanner") else _augmenter(config)
        # On a GPU the CPU's per-image augmentation would starve it: threads augment the images of the
        # next batch while the GPU runs this one (torch releases the GIL). On the CPU the same cores
        # do both, so the order stays sequential and a resumed run stays exact.
        self.threads = (ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
                        if device.startswith("cuda") and self.augment is not None else None)
        self.use_amp = device.startswith("cuda")
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    def run(self, epoch: int, reporter) -> tuple[float, float]:
        """Mean training loss over every process's images, and this epoch's training seconds."""
        import torch

        started = time.perf_counter()
        self.net.train()
        self.sampler.set_epoch(epoch)
        order = np.fromiter(self.sampler, dtype=np.int64)
        total_loss = 0.0
        for picked, (inputs, masks) in self._batches(order):
            targets = torch.from_numpy(self.labels[picked]).to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.use_amp):
                logits, mask_logits = self.model(inputs)
                loss = self.criterion(logits.float(), targets)
                if masks is not None:
                    loss = loss + self.config.mask_weight * lesion_loss(
                        mask_logits, masks.to(self.device), torch.from_numpy(self.known[picked]).to(self.device))
            if not torch.isfinite(loss):
                raise MammaclsError(f"training diverged at epoch {epoch} (loss {loss.item()}); try a lower --lr")
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += loss.item() * len(picked)
            reporter.batch_done(epoch, loss.item())
        loss_sum, count = sum_over_ranks([total_loss, float(len(order))], self.current)
        return loss_sum / count, time.perf_counter() - started

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
            return _scanner_batch(self.images[picked], masks, self.config.augmentation, self.device)
        images, masks = _augment_batch(self.augment, self.images[picked], masks, self.threads)
        images = images.pin_memory() if self.threads is not None else images
        return normalise(_photometric(images.to(self.device, non_blocking=True).float() / 255.0,
                                      self.config.augmentation)), masks


class _TrainStep:
    """The training forward as one module, so that DDP sees (and synchronises) the whole pass,
    lesion decoder included."""

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


def _validate(net, config, val_x, val_y, val_masks, val_known, criterion, device):
    """The epoch's validation record, metrics and loss."""
    import torch

    val_batch = max(64, config.batch_size)
    if config.mask_guided:  # one pass gives the classes and the lesion maps
        val_logits, val_maps, _ = predict_lesion_maps(net, config.arch, val_x, device, val_batch)
        probabilities = softmax(val_logits)
    else:
        probabilities = predict_proba(net, val_x, device, batch_size=val_batch)
    metrics = compute_metrics(val_y, probabilities)
    val_loss = float(criterion(torch.log(torch.from_numpy(probabilities).clamp_min(1e-12)).float().to(device),
                               torch.from_numpy(val_y).to(device)).item())
    record = {"val_loss": val_loss, "val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
              "val_roc_auc_macro": metrics["roc_auc_macro"]}
    if config.mask_guided:
        record["val_lesion_dice"] = lesion_dice(val_maps, val_masks, val_known)
    return record, metrics, val_loss


def _calibrate(net, arch: str, train_x, train_y, val_x: np.ndarray, val_y: np.ndarray, device: str,
               run_dir: Path, members: int = 1) -> dict[str, Any]:
    """Fitted on validation: temperature scaling, the malignant threshold for 90 % specificity and
    the abstention threshold; on train features (threshold on validation): the out-of-distribution density."""
    from mammacls.calibration import fit_temperature
    from mammacls.metrics import MALIGNANT, calibration_metrics, threshold_at_specificity
    from mammacls.model import predict_logits_and_features
    from mammacls.inference.gate import image_statistics
    from mammacls.ood import choose_min_confidence, fit_density, fit_image_density, save_density

    import torch

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # full fp32 features, as predict computes them on a CPU
    try:
        logits, val_features = predict_logits_and_features(net, arch, val_x, device)
        _, train_features = predict_logits_and_features(net, arch, train_x, device)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    temperature = fit_temperature(logits, val_y)
    calibrated = softmax(logits, temperature)
    density = fit_density(train_features, train_y, val_features, len(CLASSES), members=members)
    image_density = fit_image_density(np.stack([image_statistics(x) for x in train_x]),
                                      np.stack([image_statistics(x) for x in val_x]))
    return {
        "ood": save_density(run_dir, density, image_density),
        "min_confidence": choose_min_confidence(calibrated, val_y),
        "temperature": temperature,
        "calibration": {"method": "temperature scaling", "fitted_on": "val", "temperature": temperature,
                        "val_before": calibration_metrics(val_y, softmax(logits)),
                        "val_after": calibration_metrics(val_y, calibrated)},
        "malignant_threshold_spec90": threshold_at_specificity(val_y, calibrated[:, MALIGNANT], 0.9),
        "malignant_threshold_spec90_raw": threshold_at_specificity(val_y, softmax(logits)[:, MALIGNANT], 0.9),
    }


def _source_counts(train_rows: list[dict[str, str]], val_rows: list[dict[str, str]]) -> dict[str, dict]:
    """Images per source and class in train and val (a source may lack a class: BUS-BRA has no normal)."""
    counts: dict[str, dict] = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        for row in rows:
            per_class = counts.setdefault(row["source"], {"train": {}, "val": {}})[split]
            per_class[row["label"]] = per_class.get(row["label"], 0) + 1
    return counts


def _estimate_cpu_time(net, criterion, optimizer, config, train_x, batches, n_val, reporter) -> None:
    """Time one training step and say what an epoch will cost when it is slow."""
    import torch

    size = min(config.batch_size, len(train_x))
    inputs = normalise(torch.from_numpy(train_x[:size]).unsqueeze(1).float() / 255.0)
    targets = torch.zeros(size, dtype=torch.long)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    with torch.random.fork_rng(devices=[]):  # dropout here must not shift the run's random stream
        criterion(net(inputs), targets).backward()  # warm-up: the first step pays one-off costs
        started = time.perf_counter()
        criterion(net(inputs), targets).backward()
        step = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)
    net.load_state_dict(saved)  # the timing step must not change the model (BN statistics)
    per_epoch = step * (len(train_x) / size) * 1.15 + step / 3 * (n_val / size)
    if per_epoch > SLOW_EPOCH_SECONDS or ARCH_SPECS[config.arch].slow_on_cpu:
        reporter.message(
            f"CPU time estimate: about {per_epoch / 60:.1f} min per epoch for {config.arch} at "
            f"{config.img_size} px ({per_epoch * config.epochs / 60:.0f} min for {config.epochs} epochs); "
            "a smaller --img-size or a CUDA GPU is faster"
        )


# ----------------------------------------------------------- checkpoint ---

def _write_checkpoint(path: Path, net, optimizer, scheduler, info: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    from mammacls.weights import state_dict_cpu

    tensors = {f"model/{k}": v for k, v in state_dict_cpu(net).items()}
    opt_state = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    header = {
        "info": json.dumps(info),
        "optim_param_groups": json.dumps(opt_state["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "scheduler": json.dumps(scheduler.state_dict()),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        info = json.loads(header["info"])
        groups = json.loads(header["optim_param_groups"])
        scalars = json.loads(header["optim_scalars"])
        scheduler = json.loads(header["scheduler"])
    except Exception as exc:  # damaged file: safetensors, JSON or missing keys
        raise MammaclsError(f"cannot resume: checkpoint {path} is damaged ({str(exc)[:100]})") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in scalars.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {
        **info,
        "model": {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
        "optimizer": {"state": state, "param_groups": groups},
        "scheduler": scheduler,
        "rng": tensors["rng/torch"],
    }



# --------------------------------------------------------- several runs ---

SUMMARY_KEYS = ("accuracy", "macro_f1", "roc_auc_macro")


def summarise_runs(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run validation figures and their mean and standard deviation."""
    rows = [{"name": m["name"], "best_epoch": m.get("best_epoch"),
             **{k: m["val_metrics"].get(k) for k in SUMMARY_KEYS}} for m in metas]
    stats = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        stats[key] = {"mean": float(np.mean(values)) if values else None,
                      "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return {"runs": rows, "summary": stats}


def _complete_or_resumable(name: str) -> str:
    folder = models_dir() / name
    if (folder / CHECKPOINT_FILE).is_file():
        return "resume"
    if (folder / METADATA_FILE).is_file():
        meta = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        if meta.get("status") == "complete":
            return "done"
        raise MammaclsError(f"model folder {folder} holds an unfinished run without a checkpoint; remove it")
    return "new"


def _run_member(config, data_dir, name, reporter, **kwargs) -> dict[str, Any]:
    state = _complete_or_resumable(name)
    if state == "done":
        reporter.message(f"{name} is already trained; skipping it")
        return json.loads((models_dir() / name / METADATA_FILE).read_text(encoding="utf-8"))
    if state == "resume":
        return train_model(config, resume=True, name=name, reporter=reporter, data_parallel=False)
    return train_model(config, data_dir, name=name, reporter=reporter, data_parallel=False, **kwargs)


def _run_members(members: list[tuple[str, TrainConfig, dict[str, Any]]], data_dir, reporter,
                 current: World) -> list[dict[str, Any]]:
    """Train every member; under torchrun member i on rank i mod N, each on its own device
    (one fold or seed per GPU), and everyone waits for all before the summary."""
    for index, (name, config, kwargs) in enumerate(members):
        if index % current.size == current.rank:
            _run_member(config, data_dir, name, reporter if current.is_main else TrainReporter(), **kwargs)
    barrier(current)
    return [json.loads((models_dir() / name / METADATA_FILE).read_text(encoding="utf-8")) for name, _, _ in members]


def train_cross_validation(
    config: TrainConfig, folds: int, data_dir: Path | None = None, name: str | None = None,
    reporter: TrainReporter | None = None,
) -> dict[str, Any]:
    """K-fold cross-validation over train+val, duplicate groups whole and classes stratified.

    Each fold's model is saved as ``NAME-foldI``; the test split is not touched.
    Running the same command again skips finished folds and resumes an interrupted one.
    """
    reporter = reporter or TrainReporter()
    config.validate()
    if folds < 2:
        raise MammaclsError("--folds must be at least 2")
    current = world(config.device)
    dataset = load_prepared(data_dir)
    run = broadcast(name or _new_run_name(f"cv{folds}-{config.arch}"), current)
    members = []
    for fold, split_rows in enumerate(cv_fold_rows(dataset, folds, config.seed), start=1):
        if current.is_main:
            reporter.message(f"fold {fold}/{folds}: {len(split_rows['train'])} train, "
                             f"{len(split_rows['val'])} validation images")
        members.append((f"{run}-fold{fold}", config, {
            "split_rows": split_rows,
            "extra_metadata": {"group": {"kind": "cv", "run": run, "member": fold, "of": folds}}}))
    metas = _run_members(members, dataset.root, reporter, current)
    return {"run": run, "kind": "cv", **summarise_runs(metas)}


def cv_fold_rows(dataset: PreparedDataset, folds: int, seed: int) -> list[dict[str, list[str]]]:
    """Train/val image paths of each fold of train+val (StratifiedGroupKFold; test untouched)."""
    from sklearn.model_selection import StratifiedGroupKFold

    rows = dataset.split("train") + dataset.split("val")
    several = len({row.get("source") for row in rows}) > 1  # then stratify by source and class
    labels = [f"{row['source']}/{row['label']}" if several else row["label"] for row in rows]
    groups = [row["group_id"] for row in rows]
    if len(set(groups)) < folds:
        raise MammaclsError(f"--folds {folds}: only {len(set(groups))} duplicate groups to share out")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [{"train": [rows[i]["path"] for i in train_idx], "val": [rows[i]["path"] for i in val_idx]}
            for train_idx, val_idx in splitter.split(np.zeros(len(rows)), labels, groups)]


def train_repeats(
    config: TrainConfig, repeats: int, data_dir: Path | None = None, name: str | None = None,
    reporter: TrainReporter | None = None,
) -> dict[str, Any]:
    """The same recipe with seeds seed, seed+1, …, to show run-to-run spread."""
    reporter = reporter or TrainReporter()
    config.validate()
    if repeats < 2:
        raise MammaclsError("--repeat must be at least 2")
    current = world(config.device)
    run = broadcast(name or _new_run_name(f"rep{repeats}-{config.arch}"), current)
    members = []
    for k in range(repeats):
        seeded = TrainConfig(**{**asdict(config), "seed": config.seed + k})
        members.append((f"{run}-seed{seeded.seed}", seeded, {
            "extra_metadata": {"group": {"kind": "repeat", "run": run, "member": k + 1, "of": repeats}}}))
    metas = _run_members(members, data_dir, reporter, current)
    return {"run": run, "kind": "repeat", **summarise_runs(metas)}


def recalibrate(ref, device: str = "auto") -> dict[str, Any]:
    """Refit a saved model's temperature, thresholds and out-of-distribution density on its own
    train/validation images (for models trained by an older mammacls, or on another machine).

    The prepared dataset must hold the model's train+val images (checked by their pixel hashes, so
    a dataset prepared again elsewhere or moved is accepted). A read-only (shipped) model gets its
    refitted files in the cache; its own files are never written.
    """
    from mammacls.weights import load_network

    meta = ref.metadata
    if not ref.read_only and not (ref.weights.parent / METADATA_FILE).is_file():
        raise MammaclsError(f"calibrate needs a model folder with {METADATA_FILE}")
    dataset = _training_dataset(ref)
    train_rows, val_rows = model_rows(dataset, meta)
    size = int(meta["img_size"])
    prints: dict[str, list] = {"sha256": [], "phash": []}
    train_x, train_y = _load_rows(dataset, train_rows, size, prints)
    val_x, val_y = _load_rows(dataset, val_rows, size, prints)
    device = resolve_device(device)
    net = load_network(ref, device)
    changes = _calibrate(net, meta["arch"], train_x, train_y, val_x, val_y, device, ref.files_dir,
                         members=ensemble_size(meta))
    if ref.read_only:
        ref.update_metadata(changes)
        record = ref.metadata
    else:
        updated = {k: v for k, v in meta.items() if k not in ("format", "weights_file", "sha256")}
        updated.update(changes)
        updated.setdefault("data", {})["train_val_fingerprints"] = prints
        record = save_model(net, updated, ref.weights.parent)
        ref.metadata = record
    if meta.get("onnx"):
        from mammacls.export import export_onnx

        export_onnx(ref)
    return record


def model_rows(dataset: PreparedDataset, meta: dict[str, Any]):
    """The train and val rows a model was trained and selected on: its cross-validation fold's, or
    the prepared split."""
    group = meta.get("group") or {}
    split_rows = (cv_fold_rows(dataset, group["of"], meta["config"]["seed"])[group["member"] - 1]
                  if group.get("kind") == "cv" else None)
    return _rows_for(dataset, split_rows)


def _training_dataset(ref) -> PreparedDataset:
    """The prepared dataset ``ref`` was trained on: its own folder if still there, else the latest,
    accepted when its train+val images are the model's (pixel hashes; paths may differ)."""
    data = ref.metadata.get("data") or {}
    prepared = data.get("prepared_dir")
    try:
        dataset = load_prepared(Path(prepared) if prepared and Path(prepared).is_dir() else None)
    except MammaclsError:
        raise MammaclsError(f"the prepared dataset {ref.name} was trained on is not here; "
                            "run mammacls prepare") from None
    known = sorted((data.get("train_val_fingerprints") or {}).get("sha256") or [])
    here = sorted(row["sha256"] for row in dataset.split("train") + dataset.split("val"))
    same = here == known if known else dataset.manifest_sha256 == data.get("manifest_sha256")
    if not same:
        raise MammaclsError(f"the prepared dataset at {dataset.root} does not hold the train/validation images "
                            f"{ref.name} was trained on (prepare the same sources with the same --seed)")
    return dataset
