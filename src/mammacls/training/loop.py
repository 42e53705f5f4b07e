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

from mammacls.archs import ARCH_SPECS
from mammacls.data.prepared import load_prepared
from mammacls.training.distributed import SINGLE, World, barrier, broadcast, world
from mammacls.errors import MammaclsError, param
from mammacls.inference.card import ModelCard
from mammacls.inference.model_files import CHECKPOINT_FILE, MODEL_FILE, read_card
from mammacls.inference.probabilities import softmax
from mammacls.evaluation.metrics import compute_metrics
from mammacls.nets.compute import Compute, choose_compute, to_layout
from mammacls.nets.networks import (
    frozen_modules, predict_lesion_maps, predict_proba, resolve_device,
)
from mammacls.store import cache_lock, check_model_name, models_dir
from mammacls.training.batches import EpochRunner, lesion_dice
from mammacls.training.checkpoint import find_resumable, read_checkpoint, write_checkpoint
from mammacls.training.config import TrainConfig, TrainReporter
from mammacls.training.finalise import finish_model
from mammacls.training.loss import ClassWeightedLoss
from mammacls.training.run_setup import base_card, load_run_data, run_start, training_data_sidecar
from mammacls.training.splits import rows_for
from mammacls.nets.weights import save_model

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
    config = TrainConfig(**{"class_weights": "pooled", **state["config"]})  # runs before per-source weights
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
    compute: Compute


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run, saying what is kept: ``epochs_saved`` finished epochs (0: nothing)."""

    def __init__(self, name: str, epochs_saved: int) -> None:
        super().__init__(name)
        self.name, self.epochs_saved = name, epochs_saved


def _finish(run: _Run, reporter: TrainReporter | None, export: bool) -> ModelCard:
    """Epochs, then finalise. A run that stops without a checkpoint leaves nothing behind: a folder with
    weights but neither a checkpoint to resume nor a finished card could only mislead (and would block
    a new run of its name). A full disk or a failed write is one line naming the path."""
    reporter = reporter or TrainReporter()
    try:
        _run_epochs(run, reporter)
        return _finalise(run, reporter, export)
    except BaseException as exc:
        kept = run.current.is_main and _keep_or_remove(run.run_dir)
        if isinstance(exc, KeyboardInterrupt):
            raise TrainingInterrupted(run.name, len(run.history) if kept else 0) from None
        if isinstance(exc, OSError):
            where = exc.filename or run.run_dir
            raise MammaclsError(f"cannot write {where}: {exc.strerror or exc}; "
                                + (f"the last finished epoch is kept (mammacls train --resume --name {run.name})"
                                   if kept else f"nothing of {run.name} was kept")) from None
        raise


def _keep_or_remove(run_dir: Path) -> bool:
    """Whether ``run_dir`` can be resumed (or is finished); an unusable leftover is removed."""
    import shutil

    if not run_dir.exists() or (run_dir / CHECKPOINT_FILE).is_file():
        return run_dir.exists()
    try:
        if read_card(run_dir).training.status == "complete":
            return True
    except MammaclsError:
        pass
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


def _setup(config: TrainConfig, data_dir, name: str, split_rows, extra_training, hold, current: World,
           state: dict[str, Any] | None) -> _Run:
    """Data, network, optimiser and schedule of a new run, or of a checkpoint (``state``)."""
    import torch

    if config.batch_size % current.size:
        raise MammaclsError(f"{param('batch_size')} {config.batch_size} is the global batch: it must divide evenly "
                            f"over the {current.size} processes")
    device = resolve_device(config.device)  # under torchrun "cuda" is this process's own GPU
    compute = choose_compute(config.arch, device, config.precision, config.memory_format)
    dataset = load_prepared(data_dir, hold, f"mammacls train --name {name}")
    if state and dataset.manifest_sha256 != state["manifest_sha256"]:
        raise MammaclsError(f"the prepared dataset at {dataset.root} changed since this run started; cannot resume")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    start = run_start(config, state)
    net = to_layout(start.net, compute)
    frozen = frozen_modules(net, config.arch, config.freeze)
    train_rows, val_rows = rows_for(dataset, split_rows)
    data = load_run_data(dataset, config, train_rows, val_rows, allow_missing=start.init is not None)
    train_sources = np.array([row["source"] for row in train_rows])
    criterion = ClassWeightedLoss(config.class_weights, data["train_y"], train_sources, config.label_smoothing)
    data["val_weights"] = criterion.image_weights(data["val_y"], [row["source"] for row in val_rows])
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    step = EpochRunner(config, current, compute, net, criterion, optimizer, data["train_x"], data["train_y"],
                       data.pop("train_masks"), data.pop("train_known"),
                       criterion.image_weights(data["train_y"], train_sources), frozen)
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
    card = base_card(config, name, compute, current, dataset, start, rows, criterion, extra_training)
    checkpoint_info = {"config": asdict(config), "data_dir": str(dataset.root.resolve()),
                       "manifest_sha256": dataset.manifest_sha256, "split_rows": split_rows,
                       "extra_training": extra_training, "imagenet": start.imagenet, "init": start.init,
                       "members": start.members, "inherited_fingerprints": start.inherited}
    return _Run(config, name, models_dir() / name, device, current, net, optimizer, scheduler, criterion, step, data,
                card, training_data_sidecar(dataset, rows, data["fitting"].fingerprints, start.inherited), checkpoint_info, history, best,
                compute)


def _run_epochs(run: _Run, reporter: TrainReporter) -> None:
    """Train, validate, select and checkpoint epoch by epoch (no folder until the first epoch is
    saved: a run stopped before that leaves nothing that looks like a model)."""
    config, first_epoch = run.config, len(run.history) + 1
    if run.history:
        reporter.message(f"resuming {run.name} at epoch {first_epoch}/{config.epochs} with its saved settings")
    reporter.info(f"compute: {run.compute.describe()}")
    if run.card.provenance.init:
        init = run.card.provenance.init
        reporter.info(f"starting from {init['model']} ({init['members']} member{'s' if init['members'] > 1 else ''}, "
                         f"{init['arch']} {init['img_size']} px, weights {init['sha256'][:12]}); lr {config.lr:g}"
                         + (f"; first {config.freeze} stage{'s' if config.freeze > 1 else ''} frozen"
                            if config.freeze else ""))
        if run.data["missing"]:
            reporter.message(f"the training images hold no {', '.join(run.data['missing'])} scans: what the model "
                             f"knows of them comes from {init['model']} alone and may fade; mix in a source that has "
                             "them (mammacls prepare Dataset_BUSI_with_GT hospital=scans.csv)")
    if run.device == "cpu" and first_epoch <= config.epochs and not run.current.distributed:
        run.step.on_step_timed = cpu_time_estimate(config, run.step.batches, len(run.data["val_y"]), reporter)
    reporter.run_started(run.name, first_epoch, config.epochs, run.step.batches)
    since_best = first_epoch - 1 - run.best["epoch"] if run.best["epoch"] else 0
    for epoch in range(first_epoch, config.epochs + 1):
        started = time.perf_counter()
        train_loss, train_seconds, trained = run.step.run(epoch, reporter)
        run.scheduler.step()
        stop = None
        if run.current.is_main:  # rank 0 validates, selects and saves; the others wait for its verdict
            improved = _validate_and_save(run, epoch, train_loss, (train_seconds, trained), started, reporter)
            since_best = 0 if improved else since_best + 1
            stop = since_best >= config.patience
        if broadcast(stop, run.current):
            reporter.message(f"early stop: validation macro-F1 has not improved for {config.patience} epochs")
            break
    run.step.close()


def _validate_and_save(run: _Run, epoch: int, train_loss: float, timing: tuple[float, int], started: float,
                       reporter: TrainReporter) -> bool:
    """Score the epoch on validation, keep the model when it is the best so far, write the checkpoint."""
    record, metrics, val_loss = _validate(run)
    record.update(epoch=epoch, train_loss=train_loss, lr=run.optimizer.param_groups[0]["lr"],
                  train_seconds=round(timing[0], 2), train_images=timing[1],
                  train_images_per_s=round(timing[1] / timing[0], 1),
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
    log_probabilities = torch.log(torch.from_numpy(probabilities).clamp_min(1e-12)).float().to(device)
    val_loss = float(run.criterion(log_probabilities, torch.from_numpy(data["val_y"]).to(device),
                                   torch.from_numpy(data["val_weights"]).float().to(device)).item())
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
    # the selected epoch may come from before a resume: processes and compute are those that finished the run
    provenance = dataclasses.replace(saved.provenance, processes=run.card.provenance.processes,
                                     compute=run.card.provenance.compute)
    run.net.load_state_dict(load_file(str(run.run_dir / MODEL_FILE), device=run.device))  # the selected epoch

    def complete() -> None:  # the model is saved: nothing left to resume, whatever the export does
        (run.run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        if export:
            reporter.stage("exporting to ONNX")

    final = finish_model(run.net, saved.replace(training=summary, provenance=provenance), run.run_dir,
                         run.data["fitting"], run.device,
                         sidecars={"history": run.history, "training_data": run.training_data},
                         export=export, on_saved=complete,
                         on_export_error=lambda exc: reporter.message(
                             f"warning: {exc}; predict will use PyTorch for this model"))
    barrier(run.current)
    return final


def cpu_time_estimate(config, batches: int, n_val: int, reporter):
    """For the run's own second training step (the first pays one-off costs): from its seconds, what
    an epoch will cost, said when that is slow. No extra step is taken to measure it."""
    def timed(seconds: float) -> None:
        per_epoch = seconds * batches + seconds / 3 * (n_val / config.batch_size)  # validation: forward only
        if per_epoch > SLOW_EPOCH_SECONDS or ARCH_SPECS[config.arch].slow_on_cpu:
            reporter.message(
                f"CPU time estimate: about {per_epoch / 60:.1f} min per epoch for {config.arch} at "
                f"{config.img_size} px ({per_epoch * config.epochs / 60:.0f} min for {config.epochs} epochs); "
                "a smaller --img-size or a CUDA GPU is faster"
            )

    return timed
