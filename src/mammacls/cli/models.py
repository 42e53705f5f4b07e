"""Model housekeeping: export to ONNX, calibrate, ensemble, use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mammacls.choices import Device
from mammacls.cli.common import app, _console, _errors, choice_option


@app.command()
def export(
    model: Annotated[Optional[list[str]], typer.Option(
        metavar="NAME", help="Model cache name or folder; repeat for several (default: every cached model without an export).")
    ] = None,
) -> None:
    """Write an ONNX copy of a model beside its weights, for the fast torch-free predict path."""
    from mammacls.nets.export import export_onnx
    from mammacls.inference.model_files import list_cached_models, resolve_model

    console = _console()
    with _errors():
        if model:
            refs = [resolve_model(spec) for spec in model]
        else:
            refs = [ref for ref in list_cached_models() if ref.card.onnx is None]
            if not refs:
                console.print("every cached model already has an ONNX export")
                return
        for ref in refs:
            card = export_onnx(ref)
            console.print(f"exported {ref.name} -> {ref.files_dir / card.onnx.file}", soft_wrap=True,
                          markup=False)


@app.command()
def calibrate(
    model: Annotated[list[str], typer.Option(metavar="NAME", help="Model cache name or folder; repeat for several.")],
    device: Annotated[Device, choice_option(Device, help="Where the network runs (auto: CUDA when there is a GPU).")
                      ] = Device.auto,
) -> None:
    """Refit a model's calibration, thresholds and out-of-distribution density on its own validation data."""
    from mammacls.training import recalibrate
    from mammacls.inference.model_files import resolve_model

    console = _console()
    with _errors():
        for spec in model:
            card = recalibrate(resolve_model(spec), device=device)
            console.print(f"{card.name}: {card.calibration.describe()}, "
                          f"min confidence {card.refusal.min_confidence:.2f}, "
                          f"OOD threshold {card.refusal.ood.threshold:.1f}", soft_wrap=True, markup=False)


@app.command()
def ensemble(
    model: Annotated[list[str], typer.Option(metavar="NAME", help="A member: model cache name or folder; repeat for each.")],
    name: Annotated[str, typer.Option(metavar="NAME", help="Name of the ensemble in the cache.")],
) -> None:
    """Combine trained models (e.g. train --repeat N) into one model that averages them, calibrated,
    gated and exported like the shipped default."""
    from mammacls.training.ensemble import ensemble_from_models

    console = _console()
    with _errors():
        card = ensemble_from_models(model, name=name, reporter=lambda text: console.print(text, markup=False))
    console.print(f"{name}: {card.members} x {card.arch}, {card.calibration.describe()}; use it with --model {name}",
                  soft_wrap=True, markup=False)


# -------------------------------------------------------------------- use ---

@app.command()
def use(
    model: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", help="Cache name, model folder or 'default' (the shipped model). Omit to show the choice.")
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
    console.print(f"predict now uses {ref.name} ({ref.card.arch}, {ref.card.img_size} px)",
                  soft_wrap=True, markup=False)


