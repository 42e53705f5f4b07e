"""One training run in stages: set up (data, network, optimiser, or a checkpoint's), epochs
(train, validate, select, checkpoint), finalise (calibrate, fit the refusal gate, export).

Selection and early stopping use validation macro-F1 (ties: lower validation loss); the test split
is never read. After every epoch a checkpoint is written atomically, so an interrupted run resumes
where it stopped (``resume_training``), under any number of processes; the best model so far is
always a complete model folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mammacls import CLASSES
from mammacls.archs import ARCH_SPECS
from mammacls.data.prepared import load_prepared
from mammacls.training.distributed import SINGLE, World, barrier, broadcast, world
from mammacls.errors import MammaclsError, param
from mammacls.inference.card import ModelCard, Preprocessing, Provenance, TrainingSummary, WeightsInfo
from mammacls.inference.model_files import CHECKPOINT_FILE, MODEL_FILE, read_card
from mammacls.inference.predictor import softmax
from mammacls.evaluation.metrics import compute_metrics
from mammacls.nets.networks import (
    attach_lesion_decoder, build_model, build_pretrained_model, normalise, predict_lesion_maps,
    predict_proba, resolve_device,
)
from mammacls.store import cache_lock, check_model_name, models_dir
from mammacls.training.batches import EpochRunner, lesion_dice, load_masks, load_rows
from mammacls.training.checkpoint import find_resumable, read_checkpoint, write_checkpoint
from mammacls.training.config import TrainConfig, TrainReporter
from mammacls.training.finalise import fit_calibration
from mammacls.training.splits import data_summary, rows_for, training_data_record
from mammacls.nets.weights import library_versions, save_model

# Measured: VGG16 takes about 9 minutes an epoch at 224 px on 2 CPU cores.
SLOW_EPOCH_SECONDS = 60


def new_run_name(arch: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, k = f"{arch}-{stamp}", 2
    while (models_dir() / name).exists():
        name, k = f"{arch}-{stamp}-{k}", k + 1
    return name


def train_model(
    config: TrainConfig,
    *,
    data_dir: Path | None = None,
    resume: bool = False,
    name: str | None = None,
    reporter: TrainReporter | None = None,
    export: bool = True,
    split_rows: dict[str, list[str]] | None = None,
    extra_training: dict[str, Any] | None = None,
    data_parallel: bool = True,
) -> ModelCard:
    """Train one model, then export it to ONNX; returns its saved card (``resume=True`` is
    ``resume_training(name)``: the checkpoint's own settings, data and split win).

    The run holds the model's name in the cache (a second run of that name is refused, naming this
    one) and a shared hold on its prepared dataset (``prepare`` cannot replace it meanwhile).
    Under torchrun (``data_parallel``) every process trains on its share of each global batch
    (``config.batch_size`` images split over the processes) with DDP; rank 0 alone reports,
    saves, calibrates and exports, and every rank returns the saved card.
    ``extra_training``: more :class:`TrainingSummary` fields (a fold's ``group``).
    """
    if resume:
        return resume_training(name, reporter=reporter, export=export, data_parallel=data_parallel,
                               device=config.device)
    current = world(config.device) if data_parallel else SINGLE
    config.validate()
    name = broadcast(check_model_name(name) if name else new_run_name(config.arch), current)
    with _holding(name, current) as hold:  # a run of that name in progress is named first
        if (models_dir() / name).exists():
            raise MammaclsError(f"a model named {name!r} exists already; choose another {param('name')} "
                                f"or use {param('resume')}")
        run = _setup(config, data_dir, name, split_rows, extra_training, hold, current, None)
        return _finish(run, reporter if current.is_main else None, export)


def resume_training(name: str | None = None, *, reporter: TrainReporter | None = None, export: bool = True,
                    data_parallel: bool = True, device: str = "auto") -> ModelCard:
    """Continue the interrupted run ``name`` (default: the latest) from its last checkpoint, with the
    settings, data and split it started with, under any number of processes."""
    current = world(device) if data_parallel else SINGLE
    run_dir = find_resumable(name)
    state = read_checkpoint(run_dir / CHECKPOINT_FILE)
    config = TrainConfig(**state["config"])
    with _holding(run_dir.name, current) as hold:
        run = _setup(config, Path(state["data_dir"]), run_dir.name, state.get("split_rows"),
                     state.get("extra_training", state.get("extra_metadata")), hold, current, state)
        return _finish(run, reporter if current.is_main else None, export)


@contextlib.contextmanager
def _holding(name: str, current: World):
    with contextlib.ExitStack() as hold:
        if current.is_main:  # rank 0 holds the name for all
            hold.enter_context(cache_lock(f"model-{name}", f"mammacls train --name {name}"))
        yield hold


@dataclass
class _Run:
    """Everything one run carries from stage to stage."""
    config: TrainConfig
    name: str
    run_dir: Path
    device: str
    current: World
    net: Any
    optimizer: Any
    scheduler: Any
    criterion: Any
    step: EpochRunner
    data: dict[str, Any]  # train_x, train_y, val_x, val_y, val_masks, val_known
    card: ModelCard  # before the first epoch; each saved epoch adds its summary
    training_data: dict[str, Any]  # the training_data sidecar
    checkpoint_info: dict[str, Any]
    history: list[dict[str, Any]]
    best: dict[str, Any]


def _finish(run: _Run, reporter: TrainReporter | None, export: bool) -> ModelCard:
    reporter = reporter or TrainReporter()
    _run_epochs(run, reporter)
    return _finalise(run, reporter, export)


def _setup(config: TrainConfig, data_dir, name: str, split_rows, extra_training, hold, current: World,
           state: dict[str, Any] | None) -> _Run:
    """Data, network, optimiser and schedule of a new run, or of a checkpoint (``state``)."""
    import torch

    if config.batch_size % current.size:
        raise MammaclsError(f"{param('batch_size')} {config.batch_size} is the global batch: it must divide evenly "
                            f"over the {current.size} processes")
    device = resolve_device(config.device)  # under torchrun "cuda" is this process's own GPU
    dataset = load_prepared(data_dir, hold, f"mammacls train --name {name}")
    if state and dataset.manifest_sha256 != state["manifest_sha256"]:
        raise MammaclsError(f"the prepared dataset at {dataset.root} changed since this run started; cannot resume")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    net, imagenet_record = _network(config, state)
    net = net.to(device)
    train_rows, val_rows = rows_for(dataset, split_rows)
    fingerprints: dict[str, list] = {"sha256": [], "phash": []}
    data = _load_data(dataset, config, train_rows, val_rows, fingerprints)
    class_weights = _class_weights(data["train_y"])
    criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor(class_weights, dtype=torch.float32, device=device),
                                          label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    step = EpochRunner(config, current, device, net, criterion, optimizer, data["train_x"], data["train_y"],
                       data.pop("train_masks"), data.pop("train_known"))
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "macro_f1": -1.0, "val_loss": math.inf, "metrics": None}
    if state:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history, best = state["history"], state["best"]
    if current.distributed:  # each process its own augmentation stream
        torch.manual_seed(config.seed + 1_000_003 * current.rank + len(history))
    rows = (train_rows, val_rows)
    card = _base_card(config, name, device, current, dataset, imagenet_record, rows, class_weights, extra_training)
    checkpoint_info = {"config": asdict(config), "data_dir": str(dataset.root.resolve()),
                       "manifest_sha256": dataset.manifest_sha256, "split_rows": split_rows,
                       "extra_training": extra_training, "imagenet": imagenet_record}
    return _Run(config, name, models_dir() / name, device, current, net, optimizer, scheduler, criterion, step, data,
                card, _training_data(dataset, rows, fingerprints), checkpoint_info, history, best)


def _network(config: TrainConfig, state: dict[str, Any] | None):
    """The untrained network (ImageNet start when asked; a resumed run's weights come later) and the
    record of its ImageNet weights."""
    if config.pretrained and not state:
        net, imagenet_record = build_pretrained_model(config.arch, len(CLASSES), config.imagenet)
    else:
        net, imagenet_record = build_model(config.arch, len(CLASSES)), (state or {}).get("imagenet")
    if config.mask_guided:
        attach_lesion_decoder(config.arch, net)
    return net, imagenet_record


def _load_data(dataset, config: TrainConfig, train_rows, val_rows, fingerprints) -> dict[str, Any]:
    train_x, train_y = load_rows(dataset, train_rows, config.img_size, fingerprints)
    val_x, val_y = load_rows(dataset, val_rows, config.img_size, fingerprints)
    data = {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y,
            "train_masks": None, "train_known": None, "val_masks": None, "val_known": None}
    if config.mask_guided:
        data["train_masks"], data["train_known"] = load_masks(dataset, train_rows, config.img_size)
        data["val_masks"], data["val_known"] = load_masks(dataset, val_rows, config.img_size)
        if data["train_known"][train_y != CLASSES.index("normal")].sum() == 0:
            raise MammaclsError(f"{param('mask_guided')}: no benign or malignant training image has a lesion mask "
                                "(BUSI layout: NAME_mask.png beside NAME.png)")
    return data


def _class_weights(train_y: np.ndarray) -> np.ndarray:
    counts = np.bincount(train_y, minlength=len(CLASSES)).astype(np.float64)
    if (counts == 0).any():
        missing = [c for c, n in zip(CLASSES, counts) if n == 0]
        raise MammaclsError(f"the train split has no {', '.join(missing)} images; cannot train a 3-class model")
    return counts.sum() / (len(CLASSES) * counts)


def _base_card(config, name, device, current, dataset, imagenet_record, rows, class_weights,
               extra_training: dict[str, Any] | None) -> ModelCard:
    """The card of a run before its first epoch: what it is, how to feed it, where it came from."""
    train_rows, val_rows = rows
    return ModelCard(
        name=name, arch=config.arch,
        preprocessing=Preprocessing(img_size=config.img_size),
        weights=WeightsInfo(lesion_decoder=config.mask_guided),
        provenance=Provenance(
            pretrained=imagenet_record, device=device, versions=library_versions(),
            processes={"world_size": current.size, "backend": current.backend},
            data={**data_summary(dataset, train_rows, val_rows),
                  "class_weights": dict(zip(CLASSES, class_weights.round(4).tolist()))}),
        training=TrainingSummary(config=asdict(config),
                                 selection="best validation macro-F1 (ties: lower validation loss); "
                                           "test split never used", **(extra_training or {})),
    )


def _training_data(dataset, rows, fingerprints) -> dict[str, Any]:
    """The ``training_data`` sidecar, with where the prepared dataset was on this machine (a hint for
    calibrate; dropped when shipped)."""
    return {"prepared_dir": str(dataset.root.resolve()), **training_data_record(*rows, fingerprints)}


def _run_epochs(run: _Run, reporter: TrainReporter) -> None:
    """Train, validate, select and checkpoint epoch by epoch (no folder until the first epoch is
    saved: a run stopped before that leaves nothing that looks like a model)."""
    config, first_epoch = run.config, len(run.history) + 1
    if run.history:
        reporter.message(f"resuming {run.name} at epoch {first_epoch}/{config.epochs} with its saved settings")
    if run.device == "cpu" and first_epoch <= config.epochs and not run.current.distributed:
        estimate_cpu_time(run.net, run.criterion, run.optimizer, config, run.data["train_x"], run.step.batches,
                          len(run.data["val_y"]), reporter)
    reporter.run_started(run.name, first_epoch, config.epochs, run.step.batches)
    since_best = first_epoch - 1 - run.best["epoch"] if run.best["epoch"] else 0
    for epoch in range(first_epoch, config.epochs + 1):
        started = time.perf_counter()
        train_loss, train_seconds = run.step.run(epoch, reporter)
        run.scheduler.step()
        stop = None
        if run.current.is_main:  # rank 0 validates, selects and saves; the others wait for its verdict
            improved = _validate_and_save(run, epoch, train_loss, train_seconds, started, reporter)
            since_best = 0 if improved else since_best + 1
            stop = since_best >= config.patience
        if broadcast(stop, run.current):
            reporter.message(f"early stop: validation macro-F1 has not improved for {config.patience} epochs")
            break
    run.step.close()


def _validate_and_save(run: _Run, epoch: int, train_loss: float, train_seconds: float, started: float,
                       reporter: TrainReporter) -> bool:
    """Score the epoch on validation, keep the model when it is the best so far, write the checkpoint."""
    record, metrics, val_loss = _validate(run)
    record.update(epoch=epoch, train_loss=train_loss, lr=run.optimizer.param_groups[0]["lr"],
                  train_seconds=round(train_seconds, 2),
                  train_images_per_s=round(len(run.data["train_y"]) / train_seconds, 1),
                  seconds=round(time.perf_counter() - started, 2))
    run.history.append(record)
    best = run.best
    improved = (metrics["macro_f1"] > best["macro_f1"]
                or (metrics["macro_f1"] == best["macro_f1"] and val_loss < best["val_loss"]))
    if improved:
        run.best = {"epoch": epoch, "macro_f1": metrics["macro_f1"], "val_loss": val_loss, "metrics": metrics}
        summary = dataclasses.replace(run.card.training, status="training", best_epoch=epoch, val_metrics=metrics)
        save_model(run.net, run.card.replace(training=summary), run.run_dir,
                   sidecars={"history": run.history, "training_data": run.training_data})
    write_checkpoint(run.run_dir / CHECKPOINT_FILE, run.net, run.optimizer, run.scheduler,
                     {**run.checkpoint_info, "history": run.history, "best": run.best})
    reporter.epoch_done(record, improved)
    return improved


def _validate(run: _Run):
    """The epoch's validation record, metrics and loss."""
    import torch

    config, data, device = run.config, run.data, run.device
    val_batch = max(64, config.batch_size)
    if config.mask_guided:  # one pass gives the classes and the lesion maps
        val_logits, val_maps, _ = predict_lesion_maps(run.net, config.arch, data["val_x"], device, val_batch)
        probabilities = softmax(val_logits)
    else:
        probabilities = predict_proba(run.net, data["val_x"], device, batch_size=val_batch)
    metrics = compute_metrics(data["val_y"], probabilities)
    val_loss = float(run.criterion(torch.log(torch.from_numpy(probabilities).clamp_min(1e-12)).float().to(device),
                                   torch.from_numpy(data["val_y"]).to(device)).item())
    record = {"val_loss": val_loss, "val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
              "val_roc_auc_macro": metrics["roc_auc_macro"]}
    if config.mask_guided:
        record["val_lesion_dice"] = lesion_dice(val_maps, data["val_masks"], data["val_known"])
    return record, metrics, val_loss


def _finalise(run: _Run, reporter: TrainReporter, export: bool) -> ModelCard:
    """The selected epoch's weights, calibrated, with the refusal gate fitted, exported to ONNX."""
    from safetensors.torch import load_file

    if not run.current.is_main:  # rank 0 calibrates and exports; the result is read back from its files
        barrier(run.current)
        return read_card(run.run_dir)
    reporter.stage("calibrating on validation, fitting the refusal densities")
    saved = read_card(run.run_dir)
    val_metrics = dict(saved.training.val_metrics or {})
    if run.config.mask_guided:
        val_metrics["lesion_dice"] = run.history[saved.training.best_epoch - 1].get("val_lesion_dice")
    summary = dataclasses.replace(saved.training, status="complete", epochs_run=len(run.history),
                                  val_metrics=val_metrics)
    finished = dataclasses.replace(saved.provenance,
                                   finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    run.net.load_state_dict(load_file(str(run.run_dir / MODEL_FILE), device=run.device))  # the selected epoch
    data = run.data
    calibration, refusal = fit_calibration(run.net, run.config.arch, data["train_x"], data["train_y"], data["val_x"],
                                           data["val_y"], run.device, run.run_dir)
    final = save_model(run.net, saved.replace(training=summary, provenance=finished, calibration=calibration,
                                              refusal=refusal), run.run_dir,
                       sidecars={"history": run.history, "training_data": run.training_data})
    (run.run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    if export:
        from mammacls.nets.export import export_onnx
        from mammacls.inference.model_files import ModelRef

        reporter.stage("exporting to ONNX")
        try:
            final = export_onnx(ModelRef(run.name, run.run_dir / MODEL_FILE, final, "cache"))
        except MammaclsError as exc:  # the model itself is saved; only the fast predict path is missing
            reporter.message(f"warning: {exc}; predict will use PyTorch for this model")
    barrier(run.current)
    return final


def estimate_cpu_time(net, criterion, optimizer, config, train_x, batches, n_val, reporter) -> None:
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
