"""Ensembles: several trained networks of one architecture saved, calibrated and run as one model.

The members' weights live in one safetensors file under ``members.K.``; the network averages
their logits (``model.build_ensemble``), so predict, evaluate, Grad-CAM, lesion maps and the
ONNX export need nothing special. What is fitted after training — temperature, malignant
threshold, abstention level and the refusal gate (one density per member) — is fitted on the
ensemble as a whole, on the prepared validation split, which no member may have trained on.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from mammacls import CLASSES
from mammacls.errors import MammaclsError


def stack_member_states(states: list[dict]) -> dict:
    """One state dict for an ensemble from its members' (float32, keys ``members.K.``)."""
    if len(states) < 2:
        raise MammaclsError(f"an ensemble needs at least 2 members (got {len(states)})")
    keys = set(states[0])
    for k, state in enumerate(states[1:], start=2):
        if set(state) != keys:
            raise MammaclsError(f"member {k} has other layers than member 1: not the same architecture")
    return {f"members.{k}.{key}": _float32(value) for k, state in enumerate(states) for key, value in state.items()}


def _float32(tensor):
    """Weights as float32 (members may come as float16); counters stay integers."""
    return tensor.float() if tensor.is_floating_point() else tensor


def assemble_ensemble(states: list[dict], *, arch: str, img_size: int, dataset, name: str, target: Path,
                      metadata: dict[str, Any], trained_on: list[set[str]], reporter=None) -> dict[str, Any]:
    """Write the ensemble of ``states`` to ``target`` with calibration, refusal gate and ONNX export.

    ``trained_on`` holds, per member, the pixel sha256 of every image it trained on; they are
    checked against ``dataset``'s validation split, on which everything is fitted.
    """
    from mammacls.export import export_onnx
    from mammacls.model import GRAY_MEAN, GRAY_STD
    from mammacls.training.finalise import fit_calibration
    from mammacls.training.batches import load_rows
    from mammacls.training.splits import source_counts
    from mammacls.inference.model_files import MODEL_FILE, ModelRef
    from mammacls.weights import build_network, library_versions, save_model

    say = reporter or (lambda text: None)
    train_rows, val_rows = dataset.split("train"), dataset.split("val")
    val_hashes = {row["sha256"] for row in val_rows}
    for k, seen in enumerate(trained_on, start=1):
        if seen & val_hashes:
            raise MammaclsError(f"member {k} trained on {len(seen & val_hashes)} validation images: "
                                "the ensemble cannot be calibrated on them")
    single = len(states) == 1  # one member on its own: a plain network (to judge members one by one)
    state = {key: _float32(value) for key, value in states[0].items()} if single else stack_member_states(states)
    record = {"arch": arch, "ensemble": {"members": len(states)}}
    net = build_network(record, state)
    net.load_state_dict(state, strict=True)
    net.eval()
    fingerprints: dict[str, list] = {"sha256": [], "phash": []}
    say("loading the train and validation images")
    train_x, train_y = load_rows(dataset, train_rows, img_size, fingerprints)
    val_x, val_y = load_rows(dataset, val_rows, img_size, fingerprints)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    say("calibrating on validation, fitting the refusal densities (one per member)")
    fitted = fit_calibration(net, arch, train_x, train_y, val_x, val_y, "cpu", target, members=len(states))
    meta = {
        "name": name, "arch": arch, "classes": list(CLASSES), "num_classes": len(CLASSES), "in_chans": 1,
        "img_size": img_size, "input_size": [1, img_size, img_size],
        "interpolation": "area (shrink) / bilinear (enlarge), square resize",
        "mean": [GRAY_MEAN], "std": [GRAY_STD], "input_range": "grayscale uint8 / 255",
        **{k: v for k, v in metadata.items() if k != "ensemble"},
        **({} if single else {"ensemble": {**metadata.get("ensemble", {}), "members": len(states),
                                           "combine": "mean of member logits"}}),
        "data": {**metadata.get("data", {}), "manifest_sha256": dataset.manifest_sha256,
                 "train_images": int(len(train_y)), "val_images": int(len(val_y)),
                 "sources": source_counts(train_rows, val_rows),
                 "train_val_groups": sorted({row["group_id"] for row in train_rows + val_rows}),
                 "train_val_fingerprints": fingerprints},
        "status": "complete", "versions": library_versions(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **fitted,
    }
    final = save_model(net, meta, target)
    say("exporting to ONNX" + ("" if single else " (all members in one graph)"))
    export_onnx(ModelRef(name, target / MODEL_FILE, final, "cache"))
    return final


def ensemble_from_models(specs: list[str], name: str, reporter=None) -> dict[str, Any]:
    """Combine trained models (e.g. the runs of ``train --repeat N``) into one ensemble model in
    the cache, calibrated and gated on the validation split of the dataset they were trained on.

    Members must share architecture, input size and dataset, and must not have trained on the
    validation images (``train --folds`` members did: each fold trains on part of train+val).
    """
    import contextlib

    from mammacls.store import cache_lock, check_model_name, models_dir
    from mammacls.training import model_rows
    from mammacls.training.splits import training_dataset
    from mammacls.inference.model_files import ensemble_size, resolve_model
    from mammacls.weights import load_network

    check_model_name(name)
    refs = [resolve_model(spec) for spec in specs]
    if len(refs) < 2:
        raise MammaclsError("an ensemble needs at least 2 models: give --model several times")
    first = refs[0].metadata
    for ref in refs[1:]:
        for key in ("arch", "img_size", "mask_guided"):
            if ref.metadata.get(key) != first.get(key):
                raise MammaclsError(f"{ref.name} differs from {refs[0].name} in {key} "
                                    f"({ref.metadata.get(key)} vs {first.get(key)}): cannot combine them")
        if ensemble_size(ref.metadata) > 1:
            raise MammaclsError(f"{ref.name} is an ensemble already: give its members")
    target = models_dir() / name
    with contextlib.ExitStack() as hold:
        hold.enter_context(cache_lock(f"model-{name}", f"mammacls ensemble --name {name}"))
        if target.exists():
            raise MammaclsError(f"a model named {name!r} exists already; choose another --name")
        dataset = training_dataset(refs[0])
        trained_on = []
        for ref in refs:
            if (ref.metadata.get("data") or {}).get("manifest_sha256") not in (None, dataset.manifest_sha256):
                raise MammaclsError(f"{ref.name} was trained on another prepared dataset than {refs[0].name}")
            trained_on.append({row["sha256"] for row in model_rows(dataset, ref.metadata)[0]})
        states = [load_network(ref, "cpu").state_dict() for ref in refs]
        metadata = {key: first[key] for key in ("pretrained", "mask_guided", "config", "selection") if key in first}
        metadata["ensemble"] = {"members_are": [ref.name for ref in refs]}
        try:
            return assemble_ensemble(states, arch=first["arch"], img_size=int(first["img_size"]), dataset=dataset,
                                     name=name, target=target, metadata=metadata, trained_on=trained_on,
                                     reporter=reporter)
        except BaseException:
            import shutil

            shutil.rmtree(target, ignore_errors=True)  # nothing half-written that looks like a model
            raise
