"""Starting a run from a trained model (``train --init MODEL``): its design adopted, its weights
loaded (every member of an ensemble), its lineage recorded, and what it was trained on inherited
by the overlap guard.

The new run keeps the model's architecture, input size, normalisation, classes and lesion decoder;
a setting that contradicts them is refused. What the model saw in training stays "seen": the
adapted model's ``training_data`` sidecar carries the fingerprints of its ancestors
(``model_files.seen_fingerprints``), so ``evaluate`` still refuses to score it on them.
"""

from __future__ import annotations

from typing import Any

from mammacls.choices import check_arch
from mammacls.errors import MammaclsError, param
from mammacls.inference.card import ModelCard, Preprocessing
from mammacls.inference.model_files import ModelRef

def resolve_init(spec: str) -> ModelRef:
    """The model ``spec`` names (cache name, folder, ``.safetensors`` file or ``default``), ready to start from.

    Opening it validates its card (three classes, one grey channel: anything else is refused there);
    a model whose training did not finish is refused here.
    """
    from mammacls.inference.model_files import resolve_model

    try:
        ref = resolve_model(spec)
    except MammaclsError as exc:
        raise MammaclsError(f"{param('init')} {spec}: {exc}") from None
    if ref.card.training.status != "complete":
        raise MammaclsError(f"{param('init')} {spec}: its training did not finish (status "
                            f"{ref.card.training.status!r}); finish it with mammacls train --resume --name {ref.name}")
    return ref


def adopt_design(config, card: ModelCard, spec: str) -> None:
    """Give ``config`` the architecture, input size and lesion decoder of ``card``; refuse an explicit
    setting that differs (None means "not given")."""
    for field, theirs in (("arch", card.arch), ("img_size", card.img_size), ("mask_guided", card.mask_guided)):
        ours = getattr(config, field)
        if field == "arch" and ours is not None:
            ours = check_arch(ours)  # any spelling of the same architecture agrees
        if ours is not None and ours != theirs:
            raise MammaclsError(f"{param('init')} {spec} is a {_design(card)} model and a run started from it keeps "
                                f"that; drop {param(field)} {_shown(ours)} (it has {_shown(theirs)})")
        setattr(config, field, theirs)
    wanted = Preprocessing(img_size=card.img_size)  # how training feeds a network
    if (card.preprocessing.mean, card.preprocessing.std) != (wanted.mean, wanted.std):
        raise MammaclsError(f"{param('init')} {spec} normalises its input with mean {list(card.preprocessing.mean)} "
                            f"and std {list(card.preprocessing.std)}; mammacls trains with {list(wanted.mean)} and "
                            f"{list(wanted.std)}")
    config.pretrained = False  # the weights come from the model, not from ImageNet


def _design(card: ModelCard) -> str:
    parts = [card.arch, f"{card.img_size} px"]
    if card.members > 1:
        parts.append(f"{card.members}-member")
    if card.mask_guided:
        parts.append("mask-guided")
    return " ".join(parts)


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def lineage_record(ref: ModelRef) -> dict[str, Any]:
    """What the card says a run started from: the model, its weights' sha256, and its own lineage."""
    card = ref.card
    record = {"model": ref.name, "source": ref.source, "card_name": card.name, "sha256": card.weights.sha256,
              "arch": card.arch, "img_size": card.img_size, "members": card.members,
              "trained_on": sorted((card.provenance.data.get("sources") or {}))}
    if card.provenance.init:
        record["lineage"] = [card.provenance.init]
    return record


def load_init_network(ref: ModelRef):
    """The model's network (an ensemble when it has several members), float32 on the CPU."""
    from mammacls.nets.weights import load_network

    return load_network(ref, "cpu")
