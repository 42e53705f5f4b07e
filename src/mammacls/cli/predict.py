"""predict: files and DICOM to predictions, tables or a streamed results file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mammacls import CLASSES
from mammacls.choices import Backend, Device
from mammacls.cli.common import app, _console, _emit_json, _errors, _transient_bar, choice_option


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="Image files and/or folders (searched recursively).")],
    model: Annotated[Optional[str], typer.Option(
        metavar="NAME", help="Model cache name, folder, .safetensors file or 'default' (default: the model chosen with "
             "mammacls use, else the shipped one).")
    ] = None,
    device: Annotated[Device, choice_option(Device, help="Where the network runs (cuda runs PyTorch).")] = Device.auto,
    backend: Annotated[Backend, choice_option(
        Backend, help="auto: ONNX Runtime on the CPU when the model has an export.")] = Backend.auto,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    calibration: Annotated[bool, typer.Option(
        help="Temperature-calibrated probabilities (--no-calibration: raw softmax).")] = True,
    explain: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Write a Grad-CAM heatmap beside each image into this folder (uses PyTorch).")] = None,
    lesion_map: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Write the predicted lesion mask over each image into this folder (--mask-guided models).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    output: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="Append each result to this .jsonl or .csv file as soon as its batch is done (constant memory; "
             "nothing printed per image).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue --output: skip the inputs it already answers (after a crash or a kill).")] = False,
    shard: Annotated[Optional[str], typer.Option(
        metavar="K/N", help="K/N: predict only a deterministic 1/N of the inputs (K = 1..N), e.g. $SLURM_ARRAY_TASK_ID/16.")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Threads decoding images (default: every core).")] = None,
    allow_unfinished: Annotated[bool, typer.Option(
        help="Use a model whose training did not finish (no calibration, no refusal gate; flagged).")] = False,
) -> None:
    """Classify images and DICOM files (a cine loop: every frame, plus a summary). Files that cannot be
    read are reported one line each (exit code 1); the rest are predicted."""
    from mammacls.inference.inputs import parse_shard
    from mammacls.predict import predict_paths

    with _errors(json_out), _transient_bar("predicting") as bar:
        task = bar.add_task("predict", total=None)
        streamed = output is not None

        def report(error: dict) -> None:  # streaming: each unreadable file as soon as it is met
            bar.console.print(f"cannot predict {error['path']}: {error['error']}", style="red", soft_wrap=True,
                              markup=False, highlight=False)

        result = predict_paths(paths, model=model, device=device, batch_size=batch_size, backend=backend,
                               calibrated=calibration, explain_dir=explain, lesion_dir=lesion_map,
                               progress=lambda done, total: bar.update(task, completed=done, total=total),
                               notice=lambda text: bar.console.print(text, style="yellow", soft_wrap=True,
                                                                     markup=False),
                               workers=workers, shard=None if shard is None else parse_shard(shard),
                               output=output, resume=resume, on_error=report if streamed else None,
                               allow_unfinished=allow_unfinished)
        if not result["model"]["finished"]:
            bar.console.print(f"warning: {result['model']['name']} did not finish training: uncalibrated, no "
                              "refusal gate", style="bold red", soft_wrap=True, markup=False)
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
    arch = f"{model['members']} x {model['arch']}" if model["members"] > 1 else model["arch"]
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


