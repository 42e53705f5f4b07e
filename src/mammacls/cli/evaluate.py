"""evaluate: metrics with intervals, per source, as tables, JSON and the HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mammacls import CLASSES
from mammacls.errors import MammaclsError
from mammacls.inference.probabilities import describe_temperatures
from mammacls.choices import Device
from mammacls.cli.common import app, _console, _errors, _emit_json, _fmt, choice_option


@app.command()
def evaluate(
    model: Annotated[Optional[list[str]], typer.Option(
        metavar="NAME", help="Model cache name, folder, .safetensors file or 'default'; repeat to compare (default: all cached).")
    ] = None,
    data: Annotated[Optional[Path], typer.Option(
        metavar="DIR_OR_CSV", help="Prepared dataset (its test split), or every image of a labelled set never prepared: a BUSI-layout "
             "folder, a BUS-BRA folder or a CSV (path,label[,patient][,mask]). Default: the latest test split.")
    ] = None,
    report: Annotated[bool, typer.Option("--report", help=(
        "Write an HTML report with figures and metrics.json; --report DIR names its folder."))] = False,
    report_dir: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Folder for the report (implies --report; default ./mammacls-report).")] = None,
    device: Annotated[Device, choice_option(Device, help="Where the network runs (auto: CUDA when there is a GPU).")
                      ] = Device.auto,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    calibration: Annotated[bool, typer.Option(
        help="Use the temperature-calibrated probabilities (--no-calibration: raw softmax).")] = True,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    allow_overlap: Annotated[bool, typer.Option(
        help="Report even when the data overlaps a model's training/validation images (flagged).")] = False,
    drop_overlap: Annotated[bool, typer.Option(
        help="Leave out the images a model was trained or validated on (named), and score the rest.")] = False,
    allow_unfinished: Annotated[bool, typer.Option(
        help="Also score models whose training did not finish (flagged).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Score models on held-out data, with 95% bootstrap intervals, calibration and malignant operating points."""
    from mammacls.evaluation.evaluate import evaluate_models, evaluation_of, load_eval_set, models_to_evaluate

    with _errors(json_out):
        if bootstrap < 100:
            raise MammaclsError("--bootstrap needs at least 100 resamples", exit_code=2)
        refs = models_to_evaluate(model, allow_unfinished, notice=lambda text: _console().print(
            text, style="yellow", soft_wrap=True, markup=False))
        eval_set = load_eval_set(data)
        results = evaluate_models(refs, eval_set, device=device, batch_size=batch_size, calibrated=calibration,
                                  resamples=bootstrap, seed=seed, allow_overlap=allow_overlap,
                                  drop_overlap=drop_overlap)
        evaluation = evaluation_of(results, eval_set, calibration)
        if report or report_dir is not None:
            from dataclasses import replace

            from mammacls.reporting.html import write_report

            html_path = write_report(evaluation, eval_set, report_dir or Path("mammacls-report"))
            evaluation = replace(evaluation, report=str(html_path.resolve()))
    console = _console(stderr=json_out)
    _print_evaluation(evaluation, console)
    if evaluation.report:
        console.print(f"report: {evaluation.report}", soft_wrap=True, markup=False)
    if json_out:
        _emit_json(evaluation.to_record())


def _ci(value: Any, interval: Any) -> str:
    from mammacls.reporting.text import format_ci

    return format_ci(value, interval)


def _print_evaluation(evaluation, console) -> None:
    from rich.table import Table

    data = evaluation.data
    for item in data.skipped:  # every row left out is named, as prepare does
        console.print(f"skipped {item.path}: {item.reason}", style="yellow", soft_wrap=True, markup=False)
    for item in data.dropped_overlap:
        what = "a copy" if item.match.kind == "identical" else "a near-duplicate"
        console.print(f"dropped {item.match.path}: {what} of {item.match.matches}, which {item.model} was "
                      "trained or validated on", style="yellow", soft_wrap=True, markup=False)
    skipped = f", {len(data.skipped)} skipped" if data.skipped else ""
    dropped = {item.match.path for item in data.dropped_overlap}
    skipped += f", {len(dropped)} dropped as seen in training" if dropped else ""
    console.print(f"{data.description}: {data.n} images{skipped} "
                  f"({', '.join(f'{c} {n}' for c, n in data.counts.items())}); "
                  f"{'calibrated' if evaluation.calibrated else 'raw (uncalibrated)'} probabilities; "
                  "95% stratified bootstrap intervals", soft_wrap=True, markup=False)
    table = Table(title="model comparison")
    for column in ("model", "px", "accuracy", "macro F1", "AUC macro", "mal. sensitivity"):
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for entry in evaluation.models:
        m, ci = entry.metrics, entry.metrics.ci95
        name = entry.name + (" [overlap!]" if entry.overlap and entry.overlap.images else "") \
            + ("" if entry.model.finished else " [unfinished]")
        table.add_row(name, str(entry.model.img_size), _ci(m.accuracy, ci.accuracy), _ci(m.macro_f1, ci.macro_f1),
                      _ci(m.roc_auc_macro, ci.roc_auc_macro), _ci(m.malignant.sensitivity, m.malignant.sensitivity_ci95))
    console.print(table)
    _print_sources(evaluation, console)
    for entry in evaluation.models:
        overlap = entry.overlap
        if overlap and overlap.images:
            console.print(f"warning: {entry.name} was trained or validated on {overlap.images} of these "
                          f"images ({overlap.identical} identical, {overlap.near_duplicate} near-duplicates):"
                          " its figures are inflated", style="bold red", soft_wrap=True, markup=False)
        _print_model_detail(entry, console)
    for group in evaluation.groups:
        _print_group_evaluation(group, console)


def _print_sources(evaluation, console) -> None:
    """Per source: only the classes it holds; malignant vs the other classes present, with intervals."""
    from rich.table import Table

    from mammacls.reporting.text import SOURCE_COLUMNS, SOURCE_COLUMNS_NOTE, absent_classes_note, source_rows

    if not evaluation.data.shows_sources:
        return
    if evaluation.data.classes_absent:
        console.print(absent_classes_note(evaluation.data.classes_absent), soft_wrap=True, markup=False)
    for entry in evaluation.models:
        table = Table(title=f"{entry.name}: per source (malignant vs the other classes present)")
        for column in SOURCE_COLUMNS:
            table.add_column(column, justify="left" if column == "source" else "right", overflow="fold")
        for row in source_rows(entry):
            table.add_row(*row)
        console.print(table)
    console.print(SOURCE_COLUMNS_NOTE, soft_wrap=True, markup=False, style="dim")


def _print_model_detail(entry, console) -> None:
    from rich.table import Table

    m = entry.metrics
    detail = Table(title=f"{entry.name}: per class")
    for column in ("class", "precision", "recall", "F1", "AUC", "n"):
        detail.add_column(column, justify="left" if column == "class" else "right", no_wrap=True)
    for c in CLASSES:
        pc = m.per_class[c]
        detail.add_row(c, _ci(pc.precision, pc.precision_ci95), _ci(pc.recall, pc.recall_ci95),
                       _fmt(pc.f1), _fmt(pc.roc_auc), str(pc.support))
    console.print(detail)
    confusion = Table(title="confusion matrix (rows true, columns predicted)")
    confusion.add_column("true \\ predicted")
    for c in CLASSES:
        confusion.add_column(c, justify="right")
    for c, row in zip(CLASSES, m.confusion_matrix):
        confusion.add_row(c, *map(str, row))
    console.print(confusion)
    from mammacls.reporting.text import describe_malignant, describe_sure_errors

    cal = m.calibration
    console.print(describe_malignant(m.malignant), soft_wrap=True, markup=False)
    selective = m.selective
    if selective:
        console.print(f"refusal: predict would reject {selective.rejected} of these images and mark "
                      f"{selective.uncertain} uncertain; accuracy on the {selective.coverage:.1%} it accepts "
                      f"{_fmt(selective.accuracy_accepted)}, on the {selective.coverage_ok:.1%} it marks ok "
                      f"{_fmt(selective.accuracy_ok)}; {describe_sure_errors(selective)}", soft_wrap=True,
                      markup=False)
    console.print(f"calibration ({describe_temperatures(cal.temperature, cal.class_temperatures)}): ECE {cal.before.ece:.3f} -> "
                  f"{cal.after.ece:.3f}, Brier {cal.before.brier:.3f} -> {cal.after.brier:.3f}, "
                  f"NLL {cal.before.nll:.3f} -> {cal.after.nll:.3f}", soft_wrap=True, markup=False)


def _print_group_evaluation(group, console) -> None:
    from rich.table import Table

    from mammacls.evaluation.results import GROUP_COLUMNS

    kind = "cross-validation folds" if group.kind == "cv" else "repeated runs"
    table = Table(title=f"{group.run}: {kind}")
    table.add_column("member", no_wrap=True)
    for column in GROUP_COLUMNS:
        table.add_column(column.replace("_roc_auc_macro", " AUC").replace("_", " "), justify="right")
    label = "fold" if group.kind == "cv" else "run"
    for row in group.members:
        table.add_row(f"{label} {row.member}", *(_fmt(v) for v in row.values))
    table.add_row("mean ± std", *(f"{_fmt(s.mean)} ± {_fmt(s.std)}" for s in group.summary), style="bold")
    console.print(table)
