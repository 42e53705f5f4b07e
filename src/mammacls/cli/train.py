"""train: options to a TrainConfig, rich progress, torchrun shortcut."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from mammacls.archs import DEFAULT_ARCH
from mammacls.training.config import DEFAULT_IMG_SIZE, DEFAULT_LR, INIT_LR
from mammacls.errors import MammaclsError
from mammacls.choices import Arch, Augmentation, ClassWeights, Device, MemoryFormat, Precision
from mammacls.cli.common import app, _console, _errors, _quiet_console, _emit_json, _fmt, choice_option


class _RichReporter:
    """Shows epochs and batches with rich (counts, elapsed and remaining time); one short line per epoch."""

    def __init__(self, console) -> None:
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=console,
                                 disable=not console.is_terminal)  # logs and pipes get the epoch lines only
        self.epoch_task = None
        self.batch_task = None
        self.stage_task = None
        self.epochs = 0

    def message(self, text: str) -> None:
        self.console.print(text, style="yellow", soft_wrap=True, markup=False)

    def info(self, text: str) -> None:
        self.console.print(text, style="dim", soft_wrap=True, markup=False)

    def run_started(self, name, first_epoch, epochs, batches_per_epoch) -> None:
        self.console.print(f"training [bold]{name}[/]", soft_wrap=True)
        self.epochs = epochs
        self.progress.start()
        self.epoch_task = self.progress.add_task("epochs", total=epochs, completed=first_epoch - 1, info="")
        self.batch_task = self.progress.add_task("batches", total=batches_per_epoch, info="")

    def batch_done(self, epoch, loss) -> None:
        self.progress.update(self.batch_task, advance=1, info=f"loss {loss:.3f}")

    def epoch_done(self, record, improved) -> None:
        self.progress.reset(self.batch_task)
        self.progress.update(self.epoch_task, advance=1, info=f"val F1 {record['val_macro_f1']:.3f}")
        dice = f" Dice {_fmt(record['val_lesion_dice'])}" if "val_lesion_dice" in record else ""
        self.progress.console.print(
            f"epoch {record['epoch']:>3}/{self.epochs}  "
            f"train/val loss {record['train_loss']:.3f}/{record['val_loss']:.3f}  "
            f"val acc {record['val_accuracy']:.3f} F1 {record['val_macro_f1']:.3f} "
            f"AUC {_fmt(record['val_roc_auc_macro'])}{dice}  {record['seconds']:.0f}s"
            + ("  [green]best[/]" if improved else ""))

    def stage(self, text: str) -> None:
        """After the last epoch: the batch bar goes, the step being done shows (a log gets it as a line)."""
        if not self.console.is_terminal:
            self.console.print(f"{text} …", soft_wrap=True, markup=False)
        if self.batch_task is not None:
            self.progress.update(self.batch_task, visible=False)
        if self.stage_task is None:
            self.stage_task = self.progress.add_task(text, total=None, info="")
        else:
            self.progress.update(self.stage_task, description=text)

    def stop(self) -> None:
        self.progress.stop()


def _interrupt_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler, kill) ends a run like Ctrl-C: resumable


@app.command()
def train(
    arch: Annotated[Optional[Arch], choice_option(
        Arch, help=f"The network (default {DEFAULT_ARCH}; with --init, the model's).")] = None,
    pretrained: Annotated[bool, typer.Option(help="Start from ImageNet weights (torch hub cache).")] = True,
    imagenet_weights: Annotated[str, typer.Option(metavar="auto|VARIANT|FILE", help=(
        "Which ImageNet weights: auto (torchvision's default, or a variant already in the torch hub cache), a "
        "variant such as IMAGENET1K_V1, or a torchvision .pth file (checked by its sha256)."))] = "auto",
    epochs: Annotated[int, typer.Option(help="Most epochs to run.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    lr: Annotated[Optional[float], typer.Option(
        help=f"AdamW learning rate (cosine schedule); default {DEFAULT_LR:g}, or {INIT_LR:g} with --init.")] = None,
    img_size: Annotated[Optional[int], typer.Option(
        help=f"Square input size in pixels (default {DEFAULT_IMG_SIZE}; with --init, the model's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling and augmentation.")] = 42,
    device: Annotated[Device, choice_option(Device, help="Where it trains (auto: CUDA when available).")] = Device.auto,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better val macro-F1.")] = 10,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the loss.")] = 0.0,
    augment: Annotated[Optional[Augmentation], choice_option(
        Augmentation, help="Augmentation (default standard; with --init, scanner): strong adds gamma and speckle; scanner, "
             "the shipped model's, zooms out and varies gain, TGC, blur, resolution, speckle, burned-in marks "
             "(batched on the device).")] = None,
    mask_guided: Annotated[Optional[bool], typer.Option(
        help="Also learn the lesion masks with a light decoder (loss = CE + λ·(BCE + Dice)); "
             "with --init, as the model was trained.")] = None,
    mask_weight: Annotated[float, typer.Option(help="λ, the weight of the mask loss with --mask-guided.")] = 0.5,
    init: Annotated[Optional[str], typer.Option(
        metavar="MODEL", help="Start from a trained model (a cache name, folder, .safetensors file, or default: the shipped one), "
             "keeping its architecture, input size, classes and lesion decoder; an ensemble fine-tunes every "
             "member. Adapting to a new scanner: prepare its scans together with a source that has normal scans.")
    ] = None,
    freeze: Annotated[int, typer.Option(
        help="Keep the first N backbone stages fixed (5 stages in each architecture; 0: train everything).")] = 0,
    precision: Annotated[Precision, choice_option(Precision, help="auto: bf16 where the CPU runs it natively (AMX, "
                                                  "AVX512-BF16), else fp32; mixed precision on CUDA.")] = Precision.auto,
    memory_format: Annotated[MemoryFormat, choice_option(MemoryFormat, help="Tensor layout (auto: "
                                                         "the faster one, channels-last).")] = MemoryFormat.auto,
    class_weights: Annotated[ClassWeights, choice_option(ClassWeights, help="How the loss "
        "balances the classes: per-source (within each source, so a source without normal scans does not inflate "
        "the weight of BUSI's), pooled over all sources, or none.")] = ClassWeights.per_source,
    data: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Prepared dataset (default: the latest).")] = None,
    name: Annotated[Optional[str], typer.Option(metavar="NAME", help="Name of the model in the cache.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (--name, or the latest).")] = False,
    folds: Annotated[int, typer.Option(
        help="K-fold cross-validation over train+val (groups whole, classes stratified); 0 = off.")] = 0,
    repeat: Annotated[int, typer.Option(help="Train N times with seeds seed, seed+1, … to show spread.")] = 1,
    nproc_per_node: Annotated[int, typer.Option(
        help="Start N training processes on this machine with torchrun (one per GPU; gloo on CPUs): "
             "DDP over the global --batch-size, or one fold/seed per process with --folds/--repeat.")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print the model card as JSON on stdout.")] = False,
) -> None:
    """Train a CNN; the model with the best validation macro-F1 is saved to the cache and calibrated.

    Several GPUs or machines: torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m mammacls train …
    """
    from mammacls.training import TrainConfig, augmentation_preset, distributed

    if nproc_per_node != 1:
        _launch(nproc_per_node, batch_size, folds, repeat)

    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone prints
    console = _console() if main_process else _quiet_console()
    reporter = _RichReporter(console)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        with _errors(json_out):
            config = TrainConfig(arch=arch, pretrained=pretrained, imagenet=imagenet_weights, epochs=epochs,
                                 batch_size=batch_size, lr=lr, img_size=img_size, seed=seed, device=device, patience=patience,
                                 label_smoothing=label_smoothing, augmentation=augmentation_preset(augment or ('scanner' if init else 'standard')),
                                 mask_guided=mask_guided, mask_weight=mask_weight, init=init, freeze=freeze,
                                 precision=precision, memory_format=memory_format, class_weights=class_weights)
            config.validate()  # before anything heavy is imported: a typo answers at once
            group, card = _run(config, data, name, resume, folds, repeat, reporter)
    finally:
        reporter.stop()
        signal.signal(signal.SIGTERM, previous_handler)
        distributed.shutdown()
    if main_process:
        _print_outcome(group, card, console, json_out)


def _launch(nproc_per_node: int, batch_size: int, folds: int, repeat: int) -> None:
    """``--nproc-per-node N``: this very command line, minus that option, under torch's launcher."""
    from mammacls.training import distributed

    with _errors():
        if nproc_per_node > 1 and not (folds or repeat > 1) and batch_size % nproc_per_node:
            raise MammaclsError(f"--batch-size {batch_size} is the global batch: it must divide evenly over "
                                f"--nproc-per-node {nproc_per_node} processes")
        code = distributed.launch(nproc_per_node, distributed.strip_option(
            distributed.command_line(), "--nproc-per-node"))
    raise typer.Exit(code)


def _run(config, data, name, resume: bool, folds: int, repeat: int, reporter):
    """(group summary, None) for --folds/--repeat, else (None, the model's card)."""
    from mammacls.training import train_cross_validation, train_model, train_repeats

    if folds and repeat > 1:
        raise MammaclsError("--folds and --repeat do not combine; choose one", exit_code=2)
    if resume and (folds or repeat > 1):
        raise MammaclsError("to continue a cross-validation or repeat run, run the same command again "
                            "with its --name (finished members are skipped)", exit_code=2)
    try:
        if folds:
            return train_cross_validation(config, folds=folds, data_dir=data, name=name, reporter=reporter), None
        if repeat > 1:
            return train_repeats(config, repeats=repeat, data_dir=data, name=name, reporter=reporter), None
        return None, train_model(config, data_dir=data, resume=resume, name=name, reporter=reporter)
    except KeyboardInterrupt as stop:
        from mammacls.training.loop import TrainingInterrupted

        if folds or repeat > 1:
            raise MammaclsError("interrupted: finished members and the last finished epoch of the current one "
                                "are kept; continue with the same command", exit_code=130) from None
        if isinstance(stop, TrainingInterrupted) and not stop.epochs_saved:
            raise MammaclsError("interrupted before the first epoch finished: nothing was saved",
                                exit_code=130) from None
        where = f" --name {stop.name}" if isinstance(stop, TrainingInterrupted) else ""
        saved = f"epoch {stop.epochs_saved}" if isinstance(stop, TrainingInterrupted) else "the last finished epoch"
        raise MammaclsError(f"interrupted: {saved} is saved; continue with mammacls train --resume{where}",
                            exit_code=130) from None


def _print_outcome(group, card, console, json_out: bool) -> None:
    if group is not None:
        _print_group(group, console)
        if json_out:
            _emit_json(group)
        return
    val, training = card.training.val_metrics, card.training
    before, after = ((card.calibration.val_before or {}), (card.calibration.val_after or {})) \
        if card.calibration else ({}, {})
    console.print(
        f"saved [bold]{card.name}[/] (best epoch {training.best_epoch} of {training.epochs_run}): "
        f"val accuracy {val['accuracy']:.3f}, macro-F1 {val['macro_f1']:.3f}, "
        f"ROC-AUC {_fmt(val['roc_auc_macro'])}; {card.calibration.describe() if card.calibration else 'temperature –'} "
        f"(val ECE {_fmt(before.get('ece'))} -> {_fmt(after.get('ece'))})", soft_wrap=True)
    if json_out:
        _emit_json(card.to_record())


def _print_group(group: dict, console) -> None:
    from rich.table import Table

    kind = "cross-validation" if group["kind"] == "cv" else "repeated runs"
    table = Table(title=f"{group['run']}: {kind}, validation figures")
    for column in ("model", "best epoch", "val acc", "val macro F1", "val AUC"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in group["runs"]:
        table.add_row(row["name"], str(row["best_epoch"]), _fmt(row["accuracy"]), _fmt(row["macro_f1"]),
                      _fmt(row["roc_auc_macro"]))
    stats = group["summary"]
    table.add_row("mean ± std", "", *(f"{_fmt(stats[k]['mean'])} ± {_fmt(stats[k]['std'])}"
                                     for k in ("accuracy", "macro_f1", "roc_auc_macro")), style="bold")
    console.print(table)


