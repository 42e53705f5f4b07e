"""prepare: read sources, group, split; print what is there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mammacls import CLASSES
from mammacls.cli.common import app, _console, _emit_json, _errors, _transient_bar


@app.command()
def prepare(
    sources: Annotated[Optional[list[str]], typer.Argument(
        metavar="SOURCE", help="One or more sources, prepared as one dataset: a BUSI-layout folder (benign/ malignant/ normal/), "
             "a BUS-BRA folder (bus_data.csv, Images/, Masks/) or a CSV file (path,label[,patient][,mask]); "
             "NAME=PATH names a source. Default: ./Dataset_BUSI_with_GT")] = None,
    out: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Write the prepared dataset here (default: the cache).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 42,
    val_fraction: Annotated[float, typer.Option(help="Share of images for validation.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of images for test.")] = 0.15,
    groups: Annotated[Optional[Path], typer.Option(
        metavar="CSV", help="CSV (path,group_id) of known duplicate groups to merge into the detected ones.")] = None,
    keep_conflicts: Annotated[bool, typer.Option(
        help="Keep duplicate groups whose images carry different labels (left out by default).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Validate, de-duplicate and split one or more sources (train / val / test), patients and duplicates whole."""
    from mammacls.data.prepare import PrepareOptions, prepare_dataset

    options = PrepareOptions(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                             keep_conflicts=keep_conflicts, groups_csv=groups)
    with _errors(json_out), _transient_bar("decoding images") as bar:
        task = bar.add_task("decode", total=None)
        summary = prepare_dataset(sources or ["Dataset_BUSI_with_GT"], out=out, options=options,
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


