"""Ensembles: several trained networks of one architecture saved, calibrated and run as one model.

The members' weights live in one safetensors file under ``members.K.``; the network averages
their logits (``model.build_ensemble``), so predict, evaluate, Grad-CAM, lesion maps and the
ONNX export need nothing special. What is fitted after training — temperature, malignant
threshold, abstention level and the refusal gate (one density per member) — is fitted on the
ensemble as a whole, on the prepared validation split, which no member may have trained on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mammacls.errors import MammaclsError, param
from mammacls.inference.card import ModelCard, Preprocessing, Provenance, TrainingSummary, WeightsInfo


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
                      trained_on: list[set[str]], training: TrainingSummary | None = None,
                      provenance: Provenance | None = None, reporter=None) -> ModelCard:
    """Write the ensemble of ``states`` to ``target`` with calibration, refusal gate and ONNX export.

    ``trained_on`` holds, per member, the pixel sha256 of every image it trained on; they are
    checked against ``dataset``'s validation split, on which everything is fitted. ``training`` and
    ``provenance`` describe the members (recipe, selection, ImageNet start); the rest is filled here.
    """
    from mammacls.nets.networks import LESION_DECODER
    from mammacls.training.finalise import finish_model
    from mammacls.training.batches import load_fitting_images
    from mammacls.training.splits import data_summary, training_data_record
    from mammacls.nets.weights import build_network, library_versions

    say = reporter or (lambda text: None)
    train_rows, val_rows = dataset.split("train"), dataset.split("val")
    val_hashes = {row["sha256"] for row in val_rows}
    for k, seen in enumerate(trained_on, start=1):
        if seen & val_hashes:
            raise MammaclsError(f"member {k} trained on {len(seen & val_hashes)} validation images: "
                                "the ensemble cannot be calibrated on them")
    single = len(states) == 1  # one member on its own: a plain network (to judge members one by one)
    state = {key: _float32(value) for key, value in states[0].items()} if single else stack_member_states(states)
    net = build_network(arch, len(states), state)
    net.load_state_dict(state, strict=True)
    net.eval()
    say("loading the train and validation images")
    images = load_fitting_images(dataset, train_rows, val_rows, img_size)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    training = training or TrainingSummary()
    provenance = provenance or Provenance()
    card = ModelCard(
        name=name, arch=arch,
        preprocessing=Preprocessing(img_size=img_size),
        weights=WeightsInfo(members=len(states), lesion_decoder=any(f".{LESION_DECODER}." in f".{key}"
                                                                    for key in state)),
        provenance=dataclasses.replace(provenance, versions=library_versions(),
                                       data={**provenance.data, **data_summary(dataset, train_rows, val_rows)}),
        training=dataclasses.replace(
            training, status="complete",
            ensemble=None if single else {**(training.ensemble or {}), "members": len(states),
                                          "combine": "mean of member logits"}),
    )
    say("calibrating on validation, fitting the refusal densities (one per member)")
    return finish_model(net, card, target, images, "cpu",
                        sidecars={"training_data": training_data_record(train_rows, val_rows, images.fingerprints)},
                        on_saved=lambda: say("exporting to ONNX" + ("" if single else " (all members in one graph)")))


def ensemble_from_models(specs: list[str], *, name: str, reporter=None) -> ModelCard:
    """Combine trained models (e.g. the runs of ``train --repeat N``) into one ensemble model in
    the cache, calibrated and gated on the validation split of the dataset they were trained on.

    Members must share architecture, input size and dataset, and must not have trained on the
    validation images (``train --folds`` members did: each fold trains on part of train+val).
    """
    import contextlib

    from mammacls.store import cache_lock, check_model_name, models_dir
    from mammacls.training import model_rows
    from mammacls.training.splits import training_dataset
    from mammacls.inference.model_files import resolve_model
    from mammacls.nets.weights import load_network

    check_model_name(name)
    refs = [resolve_model(spec) for spec in specs]
    if len(refs) < 2:
        raise MammaclsError(f"an ensemble needs at least 2 models: give {param('model')} several times")
    first = refs[0].card
    for ref in refs[1:]:
        for key in ("arch", "img_size", "mask_guided"):
            if getattr(ref.card, key) != getattr(first, key):
                raise MammaclsError(f"{ref.name} differs from {refs[0].name} in {key} "
                                    f"({getattr(ref.card, key)} vs {getattr(first, key)}): cannot combine them")
    for ref in refs:
        if ref.card.members > 1:
            raise MammaclsError(f"{ref.name} is an ensemble already: give its members")
    target = models_dir() / name
    with contextlib.ExitStack() as hold:
        hold.enter_context(cache_lock(f"model-{name}", f"mammacls ensemble --name {name}"))
        if target.exists():
            raise MammaclsError(f"a model named {name!r} exists already; choose another {param('name')}")
        dataset = training_dataset(refs[0])
        trained_on = []
        for ref in refs:
            if ref.card.provenance.data.get("manifest_sha256") not in (None, dataset.manifest_sha256):
                raise MammaclsError(f"{ref.name} was trained on another prepared dataset than {refs[0].name}")
            trained_on.append({row["sha256"] for row in model_rows(dataset, ref.card)[0]})
        states = [load_network(ref, "cpu").state_dict() for ref in refs]
        training = TrainingSummary(config=first.training.config, selection=first.training.selection,
                                   ensemble={"members_are": [ref.name for ref in refs]})
        try:
            return assemble_ensemble(states, arch=first.arch, img_size=first.img_size, dataset=dataset,
                                     name=name, target=target, trained_on=trained_on, training=training,
                                     provenance=Provenance(pretrained=first.provenance.pretrained),
                                     reporter=reporter)
        except BaseException:
            import shutil

            shutil.rmtree(target, ignore_errors=True)  # nothing half-written that looks like a model
            raise
