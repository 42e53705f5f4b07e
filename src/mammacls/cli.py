"""Command line: parse options, call the core, print. No torch at import time."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mammacls import CLASSES, __version__
from mammacls.errors import MammaclsError

app = typer.Typer(
    name="mammacls",
    help="Classify breast ultrasound images (benign / malignant / normal): prepare, train, evaluate, predict.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@contextlib.contextmanager
def _errors():
    """Expected failures: one line on stderr and a non-zero exit, no traceback."""
    try:
        yield
    except MammaclsError as exc:
        from rich.markup import escape

        _console().print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _console().print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def _quiet_console():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"), highlight=False)


def _emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mammacls {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """mammacls: honest breast-ultrasound classification."""


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------ prepare ---

@app.command()
def prepare(
    sources: Annotated[Optional[list[str]], typer.Argument(
        help="One or more sources, prepared as one dataset: a BUSI-layout folder (benign/ malignant/ normal/), "
             "a BUS-BRA folder (bus_data.csv, Images/, Masks/) or a CSV file (path,label[,patient][,mask]); "
             "NAME=PATH names a source. Default: ./Dataset_BUSI_with_GT")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the prepared dataset here (default: the cache).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 42,
    val_fraction: Annotated[float, typer.Option(help="Share of images for validation.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of images for test.")] = 0.15,
    groups: Annotated[Optional[Path], typer.Option(
        help="CSV (path,group_id) of known duplicate groups to merge into the detected ones.")] = None,
    keep_conflicts: Annotated[bool, typer.Option(
        help="Keep duplicate groups whose images carry different labels (left out by default).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Validate, de-duplicate and split one or more sources (train / val / test), patients and duplicates whole."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mammacls.data import PrepareOptions, prepare_dataset

    options = PrepareOptions(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                             keep_conflicts=keep_conflicts, groups_csv=groups)
    with _errors(), Progress(TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=_console(), transient=True) as bar:
        task = bar.add_task("decode", total=None)
        summary = prepare_dataset(sources or ["Dataset_BUSI_with_GT"], out, options,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    _print_prepare_summary(summary, _console(stderr=json_out))
    if json_out:
        _emit_json(summary)


def _print_prepare_summary(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['images_used']} images ready ({summary['images_found']} found)")
    table.add_column("class")
    for split in ("train", "val", "test", "total"):
        table.add_column(split, justify="right")
    for label in (*CLASSES, "total"):
        row = summary["counts"][label]
        table.add_row(label, *(str(row[s]) for s in ("train", "val", "test", "total")),
                      style="bold" if label == "total" else None)
    console.print(table)
    if len(summary.get("sources", [])) > 1:
        _print_source_counts(summary, console)
    conflict_note = "kept" if summary["keep_conflicts"] else f"left out, {summary['excluded_images']} images"
    console.print(
        f"duplicate groups: {summary['duplicate_groups']} ({summary['images_in_duplicate_groups']} images), "
        f"each kept inside one split"
        + (f"; {summary['patients']} patients, each kept inside one split" if summary.get("patients") else "")
        + (f"; {summary['cross_source']['groups']} duplicate groups span sources"
           if summary.get("cross_source", {}).get("groups") else "") + "\n"
        f"label conflicts: {summary['conflicts']} groups ({conflict_note})\n"
        f"masks attached: {summary['masks_attached']} on {summary['images_with_masks']} images; "
        f"skipped files: {len(summary['skipped'])}; non-image files ignored: {summary['non_image_files']}",
        soft_wrap=True, markup=False)
    for conflict in summary["conflict_groups"]:
        members = ", ".join(f"{m['path']} ({m['label']})" for m in conflict["members"])
        console.print(f"  conflict {conflict['group_id']}: {members}", soft_wrap=True, markup=False)
    for item in summary["skipped"]:
        console.print(f"  skipped {item['path']}: {item['reason']}", soft_wrap=True, markup=False)
    if summary["missing_classes"]:
        console.print(f"warning: no {', '.join(summary['missing_classes'])} images: a 3-class model cannot be "
                      "trained on this dataset alone", style="yellow")
    console.print(f"manifest: {summary['manifest']}\noverview: {summary['overview']}", soft_wrap=True,
                  markup=False)


def _print_source_counts(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title="per source")
    for column in ("source", "kind", "patients", *CLASSES, "train", "val", "test"):
        table.add_column(column, justify="left" if column in ("source", "kind") else "right")
    for source in summary["sources"]:
        counts = source["counts"]
        table.add_row(source["name"], source["kind"], str(source["patients"] or "–"),
                      *("–" if c in source["missing_classes"] else str(counts[c]["total"]) for c in CLASSES),
                      *(str(counts["total"][s]) for s in ("train", "val", "test")))
    console.print(table)


# -------------------------------------------------------------------- train ---

class _RichReporter:
    """Shows epochs and batches with rich (counts, elapsed and remaining time); one short line per epoch."""

    def __init__(self, console) -> None:
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=console)
        self.epoch_task = None
        self.batch_task = None
        self.stage_task = None
        self.epochs = 0

    def message(self, text: str) -> None:
        self.console.print(text, style="yellow", soft_wrap=True, markup=False)

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
        """After the last epoch: the batch bar goes, the step being done shows."""
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
    arch: Annotated[str, typer.Option(help="resnet18 | vgg16 | mobilenet_v2")] = "mobilenet_v2",
    pretrained: Annotated[bool, typer.Option(help="Start from ImageNet weights (torch hub cache).")] = True,
    imagenet_weights: Annotated[str, typer.Option(
        help="Which ImageNet weights: auto (torchvision's default, or a variant already in the torch hub "
             "cache), a variant such as IMAGENET1K_V1, or a torchvision .pth file (checked by its sha256).")
    ] = "auto",
    epochs: Annotated[int, typer.Option(help="Most epochs to run.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (cosine schedule).")] = 1e-3,
    img_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = 224,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling and augmentation.")] = 42,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (auto: CUDA when available).")] = "auto",
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better val macro-F1.")] = 10,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the loss.")] = 0.0,
    augment: Annotated[str, typer.Option(
        help="Augmentation: light | standard | strong (adds gamma and speckle) | scanner (the shipped model's: "
             "zoom out, gain, TGC, blur, lost resolution, speckle, burned-in marks; batched on the device).")] = "standard",
    mask_guided: Annotated[bool, typer.Option(
        help="Also learn the lesion masks with a light decoder (loss = CE + λ·(BCE + Dice)).")] = False,
    mask_weight: Annotated[float, typer.Option(help="λ, the weight of the mask loss with --mask-guided.")] = 0.5,
    data: Annotated[Optional[Path], typer.Option(help="Prepared dataset (default: the latest).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of the model in the cache.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (--name, or the latest).")] = False,
    folds: Annotated[int, typer.Option(
        help="K-fold cross-validation over train+val (groups whole, classes stratified); 0 = off.")] = 0,
    repeat: Annotated[int, typer.Option(help="Train N times with seeds seed, seed+1, … to show spread.")] = 1,
    nproc_per_node: Annotated[int, typer.Option(
        help="Start N training processes on this machine with torchrun (one per GPU; gloo on CPUs): "
             "DDP over the global --batch-size, or one fold/seed per process with --folds/--repeat.")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print the model's metadata as JSON on stdout.")] = False,
) -> None:
    """Train a CNN; the model with the best validation macro-F1 is saved to the cache and calibrated.

    Several GPUs or machines: torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m mammacls train …
    """
    from mammacls import distributed

    if nproc_per_node != 1:
        with _errors():
            if nproc_per_node > 1 and not (folds or repeat > 1) and batch_size % nproc_per_node:
                raise MammaclsError(f"--batch-size {batch_size} is the global batch: it must divide evenly over "
                                    f"--nproc-per-node {nproc_per_node} processes")
            code = distributed.launch(nproc_per_node, distributed.strip_option(
                distributed.command_line(), "--nproc-per-node"))
        raise typer.Exit(code)

    import signal

    from mammacls.train import TrainConfig, augmentation_preset, train_cross_validation, train_model, train_repeats

    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone prints
    console = _console() if main_process else _quiet_console()
    reporter = _RichReporter(console)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        with _errors():
            config = TrainConfig(arch=arch, pretrained=pretrained, imagenet=imagenet_weights, epochs=epochs,
                                 batch_size=batch_size, lr=lr,
                                 img_size=img_size, seed=seed, device=device, patience=patience,
                                 label_smoothing=label_smoothing, augmentation=augmentation_preset(augment),
                                 mask_guided=mask_guided, mask_weight=mask_weight)
            config.validate()  # before anything heavy is imported: a typo answers at once
            if folds and repeat > 1:
                raise MammaclsError("--folds and --repeat do not combine; choose one", exit_code=2)
            if resume and (folds or repeat > 1):
                raise MammaclsError("to continue a cross-validation or repeat run, run the same command again "
                                    "with its --name (finished members are skipped)", exit_code=2)
            try:
                if folds:
                    group = train_cross_validation(config, folds, data, name, reporter)
                elif repeat > 1:
                    group = train_repeats(config, repeat, data, name, reporter)
                else:
                    group = None
                    meta = train_model(config, data, resume=resume, name=name, reporter=reporter)
            except KeyboardInterrupt:
                again = ("run the same command again" if folds or repeat > 1 else "mammacls train --resume")
                raise MammaclsError(f"interrupted: the last finished epoch is saved; continue with {again}",
                                    exit_code=130) from None
    finally:
        reporter.stop()
        signal.signal(signal.SIGTERM, previous_handler)
        distributed.shutdown()
    if not main_process:
        return
    if group is not None:
        _print_group(group, console)
        if json_out:
            _emit_json(group)
        return
    val = meta["val_metrics"]
    calibration = meta.get("calibration") or {}
    console.print(
        f"saved [bold]{meta['name']}[/] (best epoch {meta['best_epoch']} of {meta['epochs_run']}): "
        f"val accuracy {val['accuracy']:.3f}, macro-F1 {val['macro_f1']:.3f}, "
        f"ROC-AUC {_fmt(val['roc_auc_macro'])}; temperature {_fmt(meta.get('temperature'), 2)} "
        f"(val ECE {_fmt(calibration.get('val_before', {}).get('ece'))} -> "
        f"{_fmt(calibration.get('val_after', {}).get('ece'))})", soft_wrap=True)
    if json_out:
        _emit_json(meta)


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


# ----------------------------------------------------------------- evaluate ---

@app.command()
def evaluate(
    model: Annotated[Optional[list[str]], typer.Option(
        help="Model cache name, folder, .safetensors file or 'default'; repeat to compare (default: all cached).")
    ] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Prepared dataset (its test split), or every image of a labelled set never prepared: a BUSI-layout "
             "folder, a BUS-BRA folder or a CSV (path,label[,patient][,mask]). Default: the latest test split.")
    ] = None,
    report: Annotated[bool, typer.Option("--report", help=(
        "Write an HTML report with figures and metrics.json; --report DIR names its folder."))] = False,
    report_dir: Annotated[Optional[Path], typer.Option(
        help="Folder for the report (implies --report; default ./mammacls-report).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    calibration: Annotated[bool, typer.Option(
        help="Use the temperature-calibrated probabilities (--no-calibration: raw softmax).")] = True,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    allow_overlap: Annotated[bool, typer.Option(
        help="Report even when the data overlaps a model's training/validation images (flagged).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Score models on held-out data, with 95% bootstrap intervals, calibration and malignant operating points."""
    from mammacls.evaluate import evaluate_models, load_eval_set, models_to_evaluate, results_json

    with _errors():
        if bootstrap < 100:
            raise MammaclsError("--bootstrap needs at least 100 resamples", exit_code=2)
        refs = models_to_evaluate(model)
        eval_set = load_eval_set(data)
        results = evaluate_models(refs, eval_set, device, batch_size, calibration, bootstrap, seed, allow_overlap)
        document = results_json(results, eval_set, calibration)
        html_path = None
        if report or report_dir is not None:
            from mammacls.report import write_report

            html_path = write_report(results, eval_set, report_dir or Path("mammacls-report"), document)
            document["report"] = str(html_path.resolve())
    console = _console(stderr=json_out)
    _print_evaluation(document, console)
    if html_path:
        console.print(f"report: {html_path.resolve()}", soft_wrap=True, markup=False)
    if json_out:
        _emit_json(document)


def _ci(value: Any, interval: Any) -> str:
    from mammacls.evaluate import format_ci

    return format_ci(value, interval)


def _print_evaluation(document: dict, console) -> None:
    from rich.table import Table

    data = document["data"]
    console.print(f"{data['description']}: {data['n']} images "
                  f"({', '.join(f'{c} {n}' for c, n in data['counts'].items())}); "
                  f"{'calibrated' if document['calibrated'] else 'raw (uncalibrated)'} probabilities; "
                  "95% stratified bootstrap intervals", soft_wrap=True, markup=False)
    table = Table(title="model comparison")
    for column in ("model", "px", "accuracy", "macro F1", "AUC macro", "mal. sensitivity"):
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for entry in document["models"]:
        m, ci = entry["metrics"], entry["metrics"]["ci95"]
        name = entry["name"] + (" [overlap!]" if (entry.get("overlap") or {}).get("images") else "")
        table.add_row(name, str(entry["model"]["img_size"]), _ci(m["accuracy"], ci.get("accuracy")),
                      _ci(m["macro_f1"], ci.get("macro_f1")), _ci(m["roc_auc_macro"], ci.get("roc_auc_macro")),
                      _ci(m["malignant"]["sensitivity"], m["malignant"].get("sensitivity_ci95")))
    console.print(table)
    _print_sources(document, console)
    for entry in document["models"]:
        overlap = entry.get("overlap") or {}
        if overlap.get("images"):
            console.print(f"warning: {entry['name']} was trained or validated on {overlap['images']} of these "
                          f"images ({overlap['identical']} identical, {overlap['near_duplicate']} near-duplicates):"
                          " its figures are inflated", style="bold red", soft_wrap=True, markup=False)
        _print_model_detail(entry, console)
    for group in document.get("groups", []):
        _print_group_evaluation(group, console)


def _print_sources(document: dict, console) -> None:
    """Per source: only the classes it holds; malignant vs the other classes present, with intervals."""
    from rich.table import Table

    from mammacls.evaluate import SOURCE_COLUMNS, SOURCE_COLUMNS_NOTE, absent_classes_note, show_sources, source_rows

    if not show_sources(document):
        return
    absent = document["data"].get("classes_absent")
    if absent:
        console.print(absent_classes_note(absent), soft_wrap=True, markup=False)
    for entry in document["models"]:
        table = Table(title=f"{entry['name']}: per source (malignant vs the other classes present)")
        for column in SOURCE_COLUMNS:
            table.add_column(column, justify="left" if column == "source" else "right", overflow="fold")
        for row in source_rows(entry):
            table.add_row(*row)
        console.print(table)
    console.print(SOURCE_COLUMNS_NOTE, soft_wrap=True, markup=False, style="dim")


def _print_model_detail(entry: dict, console) -> None:
    from rich.table import Table

    m = entry["metrics"]
    detail = Table(title=f"{entry['name']}: per class")
    for column in ("class", "precision", "recall", "F1", "AUC", "n"):
        detail.add_column(column, justify="left" if column == "class" else "right", no_wrap=True)
    for c in CLASSES:
        pc = m["per_class"][c]
        detail.add_row(c, _ci(pc["precision"], pc.get("precision_ci95")), _ci(pc["recall"], pc.get("recall_ci95")),
                       _fmt(pc["f1"]), _fmt(pc["roc_auc"]), str(pc["support"]))
    console.print(detail)
    confusion = Table(title="confusion matrix (rows true, columns predicted)")
    confusion.add_column("true \\ predicted")
    for c in CLASSES:
        confusion.add_column(c, justify="right")
    for c, row in zip(CLASSES, m["confusion_matrix"]):
        confusion.add_row(c, *map(str, row))
    console.print(confusion)
    from mammacls.evaluate import describe_malignant

    cal = m["calibration"]
    console.print(describe_malignant(m["malignant"]), soft_wrap=True, markup=False)
    selective = m.get("selective")
    if selective:
        console.print(f"refusal: predict would reject {selective['rejected']} of these images and mark "
                      f"{selective['uncertain']} uncertain; accuracy on the {selective['coverage']:.1%} it accepts "
                      f"{_fmt(selective['accuracy_accepted'])}, on the {selective['coverage_ok']:.1%} it marks ok "
                      f"{_fmt(selective['accuracy_ok'])}", soft_wrap=True, markup=False)
    console.print(f"calibration (T = {cal['temperature']:.2f}): ECE {cal['before']['ece']:.3f} -> "
                  f"{cal['after']['ece']:.3f}, Brier {cal['before']['brier']:.3f} -> {cal['after']['brier']:.3f}, "
                  f"NLL {cal['before']['nll']:.3f} -> {cal['after']['nll']:.3f}", soft_wrap=True, markup=False)


def _print_group_evaluation(group: dict, console) -> None:
    from rich.table import Table

    kind = "cross-validation folds" if group["kind"] == "cv" else "repeated runs"
    table = Table(title=f"{group['run']}: {kind}")
    columns = ("val_accuracy", "val_macro_f1", "val_roc_auc_macro", "test_accuracy", "test_macro_f1",
               "test_roc_auc_macro")
    table.add_column("member", no_wrap=True)
    for column in columns:
        table.add_column(column.replace("_roc_auc_macro", " AUC").replace("_", " "), justify="right")
    label = "fold" if group["kind"] == "cv" else "run"
    for row in group["members"]:
        table.add_row(f"{label} {row['member']}", *(_fmt(row[c]) for c in columns))
    table.add_row("mean ± std", *(f"{_fmt(group['summary'][c]['mean'])} ± {_fmt(group['summary'][c]['std'])}"
                                  for c in columns), style="bold")
    console.print(table)


# ------------------------------------------------------------------ predict ---

@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    model: Annotated[Optional[str], typer.Option(
        help="Model cache name, folder, .safetensors file or 'default' (default: the model chosen with "
             "mammacls use, else the shipped one).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (cuda runs PyTorch).")] = "auto",
    backend: Annotated[str, typer.Option(
        help="auto | onnx | torch. auto: ONNX Runtime on the CPU when the model has an export.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    calibration: Annotated[bool, typer.Option(
        help="Temperature-calibrated probabilities (--no-calibration: raw softmax).")] = True,
    explain: Annotated[Optional[Path], typer.Option(
        help="Write a Grad-CAM heatmap beside each image into this folder (uses PyTorch).")] = None,
    lesion_map: Annotated[Optional[Path], typer.Option(
        help="Write the predicted lesion mask over each image into this folder (--mask-guided models).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    output: Annotated[Optional[Path], typer.Option(
        help="Append each result to this .jsonl or .csv file as soon as its batch is done (constant memory; "
             "nothing printed per image).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue --output: skip the inputs it already answers (after a crash or a kill).")] = False,
    shard: Annotated[Optional[str], typer.Option(
        help="K/N: predict only a deterministic 1/N of the inputs (K = 1..N), e.g. $SLURM_ARRAY_TASK_ID/16.")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Threads decoding images (default: every core).")] = None,
) -> None:
    """Classify images and DICOM files (a cine loop: every frame, plus a summary). Files that cannot be
    read are reported one line each (exit code 1); the rest are predicted."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mammacls.inference.inputs import parse_shard
    from mammacls.predict import predict_paths

    with _errors(), Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             console=_console(), transient=True) as bar:
        task = bar.add_task("predict", total=None)
        streamed = output is not None

        def report(error: dict) -> None:  # streaming: each unreadable file as soon as it is met
            bar.console.print(f"cannot predict {error['path']}: {error['error']}", style="red", soft_wrap=True,
                              markup=False, highlight=False)

        result = predict_paths(paths, model, device, batch_size, backend, calibration, explain, lesion_map,
                               progress=lambda done, total: bar.update(task, completed=done, total=total),
                               notice=lambda text: bar.console.print(text, style="yellow", soft_wrap=True,
                                                                     markup=False),
                               workers=workers, shard=None if shard is None else parse_shard(shard),
                               output=output, resume=resume, on_error=report if streamed else None)
    console = _console(stderr=json_out)
    if streamed:
        _print_stream_summary(result, console)
    else:
        _print_predictions(result, console)
    if json_out:
        _emit_json(result)
    if result["errors"]:
        raise typer.Exit(1)


def _print_stream_summary(result: dict, console) -> None:
    counts, inputs, output = result["status_counts"], result["inputs"], result["output"]
    shard = f" (shard {inputs['shard']}: {inputs['in_shard']} of {inputs['found']})" if inputs["shard"] else ""
    resumed = f"; {inputs['already_answered']} already answered" if inputs["already_answered"] else ""
    console.print(f"{output['records_written']} records appended to {output['path']}{shard}{resumed}: "
                  f"{counts['ok']} ok, {counts['uncertain']} uncertain, {counts['rejected']} rejected, "
                  f"{len(result['errors'])} unreadable", markup=False, soft_wrap=True)


def _print_predictions(result: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    model = result["model"]
    members = model.get("members")
    arch = f"{members} x {model['arch']}" if isinstance(members, int) and members > 1 else model["arch"]
    _console().print(f"model: {model['name']} ({arch}, {model['img_size']} px, {model['source']}, "
                     f"{model['backend']}): {model['chosen_by']}", soft_wrap=True, markup=False)
    rows = result["predictions"] + result.get("cine", [])
    if rows:
        table = Table()
        table.add_column("file", overflow="fold")
        table.add_column("prediction")
        for c in CLASSES:
            table.add_column(f"p({c[:3]})", justify="right")
        table.add_column("status")
        styles = {"ok": "green", "uncertain": "yellow", "rejected": "red"}
        for p in rows:
            rejected = p["status"] == "rejected"  # its label and probabilities are not to be used
            name = f"{p['path']} (cine: {p['frames']} frames)" if "frames" in p else p["path"]
            table.add_row(name, Text("—" if rejected else p["label"]),
                          *(Text("—" if p["probabilities"] is None else f"{p['probabilities'][c]:.3f}",
                                 style="dim" if rejected else "") for c in CLASSES),
                          Text(p["status"], style=styles[p["status"]]))
        console.print(table)
        for p in rows:
            if p.get("reason"):
                console.print(Text(f"{p['status']} ", style=styles[p["status"]]) + Text(f"{p['path']}: {p['reason']}"),
                              soft_wrap=True)
        counts = result["status_counts"]
        console.print(f"{counts['ok']} ok, {counts['uncertain']} uncertain, {counts['rejected']} rejected",
                      markup=False)
    from rich.markup import escape

    for error in result["errors"]:
        _console().print(f"[red]cannot predict[/] {escape(error['path'])}: {escape(error['error'])}", soft_wrap=True)


# ------------------------------------------------------------------- export ---

@app.command()
def export(
    model: Annotated[Optional[list[str]], typer.Option(
        help="Model cache name or folder; repeat for several (default: every cached model without an export).")
    ] = None,
) -> None:
    """Write an ONNX copy of a model beside its weights, for the fast torch-free predict path."""
    from mammacls.export import export_onnx
    from mammacls.inference.model_files import list_cached_models, resolve_model

    console = _console()
    with _errors():
        if model:
            refs = [resolve_model(spec) for spec in model]
        else:
            refs = [ref for ref in list_cached_models() if not ref.metadata.get("onnx")]
            if not refs:
                console.print("every cached model already has an ONNX export")
                return
        for ref in refs:
            record = export_onnx(ref)
            console.print(f"exported {ref.name} -> {ref.files_dir / record['file']}", soft_wrap=True,
                          markup=False)


def _report_option_value(argv: list[str]) -> list[str]:
    """Let ``evaluate --report DIR`` (and ``--report=DIR``) name the report folder.

    Typer options cannot take an optional value, so ``--report`` is a flag and
    the folder is ``--report-dir``; evaluate has no positional arguments, so a
    bare word after ``--report`` can only be that folder.
    """
    if not argv or argv[0] != "evaluate":
        return argv
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--report="):
            out += ["--report", "--report-dir", token.split("=", 1)[1]]
        elif token == "--report" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out += ["--report", "--report-dir", argv[i + 1]]
            i += 1
        else:
            out.append(token)
        i += 1
    return out


@app.command()
def calibrate(
    model: Annotated[list[str], typer.Option(help="Model cache name or folder; repeat for several.")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Refit a model's calibration, thresholds and out-of-distribution density on its own validation data."""
    from mammacls.train import recalibrate
    from mammacls.inference.model_files import resolve_model

    console = _console()
    with _errors():
        for spec in model:
            record = recalibrate(resolve_model(spec), device)
            console.print(f"{record['name'] if 'name' in record else spec}: temperature {record['temperature']:.2f}, "
                          f"min confidence {record['min_confidence']:.2f}, "
                          f"OOD threshold {record['ood']['threshold']:.1f}", soft_wrap=True, markup=False)


@app.command()
def ensemble(
    model: Annotated[list[str], typer.Option(help="A member: model cache name or folder; repeat for each.")],
    name: Annotated[str, typer.Option(help="Name of the ensemble in the cache.")],
) -> None:
    """Combine trained models (e.g. train --repeat N) into one model that averages them, calibrated,
    gated and exported like the shipped default."""
    from mammacls.ensemble import ensemble_from_models

    console = _console()
    with _errors():
        record = ensemble_from_models(model, name, reporter=lambda text: console.print(text, markup=False))
    console.print(f"{name}: {record['ensemble']['members']} x {record['arch']}, temperature "
                  f"{record['temperature']:.2f}; use it with --model {name}", soft_wrap=True, markup=False)


# -------------------------------------------------------------------- use ---

@app.command()
def use(
    model: Annotated[Optional[str], typer.Argument(
        help="Cache name, model folder or 'default' (the shipped model). Omit to show the choice.")
    ] = None,
) -> None:
    """Choose the model predict uses when --model is not given (kept in the cache)."""
    from mammacls.store import chosen_model, record_chosen_model
    from mammacls.inference.model_files import resolve_model

    console = _console(stderr=False)
    with _errors():
        if model is None:
            current = chosen_model()
            console.print(f"predict uses {current + ' (chosen with mammacls use)' if current else 'default (shipped)'}",
                          soft_wrap=True, markup=False)
            return
        ref = resolve_model(model)  # refuse a name that is no model, now rather than at predict time
        spec = str(Path(model).resolve()) if ref.source == "file" else ref.name
        record_chosen_model(None if ref.source == "shipped" else spec)
    console.print(f"predict now uses {ref.name} ({ref.metadata['arch']}, {ref.metadata['img_size']} px)",
                  soft_wrap=True, markup=False)


_METAVARS = {"data": "DIR_OR_CSV", "out": "DIR", "report_dir": "DIR", "explain": "DIR", "lesion_map": "DIR",
             "groups": "CSV", "model": "NAME", "name": "NAME", "imagenet_weights": "auto|VARIANT|FILE",
             "arch": "resnet18|vgg16|mobilenet_v2", "device": "auto|cpu|cuda", "backend": "auto|onnx|torch",
             "augment": "light|standard|strong|scanner"}
# by Typer's bare type name, or click's type name (other Typer versions)
_TYPE_METAVARS = {"int": "N", "integer": "N", "float": "NUM", "str": "TEXT", "text": "TEXT", "Path": "PATH",
                  "path": "PATH", "list[str]": "NAME"}


def _with_metavars(command):
    """Real metavars in --help (FILE, DIR, the choices) instead of Typer's <bool>, <str>, {paths}."""
    for sub in getattr(command, "commands", {}).values():
        sub.get_help_option = _flag_without_metavar(sub.get_help_option)  # --help is made per context
        for param in sub.params:
            if param.metavar is not None:
                continue
            if param.param_type_name == "argument":
                word = param.name.upper().rstrip("S") if param.nargs != 1 else param.name.upper()
                param.metavar = word
                shown = f"{word}..." if param.nargs != 1 else word
                if not param.required:
                    shown = f"[{shown}]"
                # Typer's own hooks (guarded: internal) would print {PATH}... and <list[Path]>
                if hasattr(param, "_usage_display_name"):
                    param._usage_display_name = lambda shown=shown: shown
                if hasattr(param, "display_type_rich"):
                    param.display_type_rich = lambda ctx: None
            elif getattr(param, "is_flag", False) or getattr(param, "bare_type", lambda: "")() == "bool":
                param.metavar = ""
            else:
                kind = (param.bare_type() if hasattr(param, "bare_type")
                        else getattr(getattr(param, "type", None), "name", ""))
                param.metavar = _METAVARS.get(param.name) or _TYPE_METAVARS.get(kind)
    return command


def _flag_without_metavar(make_option):
    def wrapped(ctx):
        option = make_option(ctx)
        if option is not None:
            option.metavar = ""
        return option
    return wrapped


def main() -> None:
    _with_metavars(typer.main.get_command(app))(args=_report_option_value(sys.argv[1:]), prog_name="mammacls")


if __name__ == "__main__":
    main()
