"""What a training run starts from: its network (ImageNet, nothing, a trained model, or a
checkpoint's structure), its images, and its card before the first epoch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


from mammacls import CLASSES
from mammacls.errors import MammaclsError, param
from mammacls.inference.card import ModelCard, Preprocessing, Provenance, RunGroup, TrainingSummary, WeightsInfo
from mammacls.nets.networks import attach_lesion_decoder, build_model, build_pretrained_model
from mammacls.nets.weights import build_network, library_versions
from mammacls.training.batches import load_fitting_images, load_masks
from mammacls.training.config import TrainConfig
from mammacls.training.splits import data_summary, training_data_record
from mammacls.inference.model_files import INHERITED, seen_fingerprints


@dataclass
class RunStart:
    """Where a run's network comes from: ImageNet (or nothing), or a trained model (``init``)."""
    net: Any
    members: int = 1
    imagenet: dict[str, Any] | None = None  # the ImageNet weights' record (inherited from an init model)
    init: dict[str, Any] | None = None  # the init model's lineage record
    inherited: dict[str, list] | None = None  # the fingerprints the init model and its ancestors saw


def run_start(config: TrainConfig, state: dict[str, Any] | None) -> RunStart:
    """The untrained network (ImageNet start when asked), or the init model's, with its records; a
    resumed run rebuilds the structure its checkpoint records (its weights are loaded later)."""

    if state:
        members = state.get("members", 1)
        return RunStart(build_network(config.arch, members, state["model"]), members, state.get("imagenet"),
                      state.get("init"), state.get("inherited_fingerprints"))
    if config.init:
        from mammacls.training.warm_start import lineage_record, load_init_network, resolve_init

        ref = resolve_init(config.init)
        return RunStart(load_init_network(ref), ref.card.members, ref.card.provenance.pretrained, lineage_record(ref),
                      seen_fingerprints(ref))
    if config.pretrained:
        net, imagenet_record = build_pretrained_model(config.arch, len(CLASSES), config.imagenet)
    else:
        net, imagenet_record = build_model(config.arch, len(CLASSES)), None
    if config.mask_guided:
        attach_lesion_decoder(config.arch, net)
    return RunStart(net, 1, imagenet_record)


def load_run_data(dataset, config: TrainConfig, train_rows, val_rows, allow_missing: bool) -> dict[str, Any]:
    """The run's images, labels and masks; ``fitting`` holds the images (and fingerprints) that its
    calibration and refusal gate are fitted on at the end."""
    fitting = load_fitting_images(dataset, train_rows, val_rows, config.img_size)
    train_x, train_y, val_x, val_y = fitting.train_x, fitting.train_y, fitting.val_x, fitting.val_y
    missing = [c for k, c in enumerate(CLASSES) if not (train_y == k).any()]
    if missing and not allow_missing:
        raise MammaclsError(f"the train split has no {', '.join(missing)} images; cannot train a 3-class model "
                            f"(starting from a model that knows them, {param('init')}, can)")
    data = {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y, "missing": missing,
            "fitting": fitting,
            "train_masks": None, "train_known": None, "val_masks": None, "val_known": None}
    if config.mask_guided:
        data["train_masks"], data["train_known"] = load_masks(dataset, train_rows, config.img_size)
        data["val_masks"], data["val_known"] = load_masks(dataset, val_rows, config.img_size)
        if data["train_known"][train_y != CLASSES.index("normal")].sum() == 0:
            raise MammaclsError(f"{param('mask_guided')}: no benign or malignant training image has a lesion mask "
                                "(BUSI layout: NAME_mask.png beside NAME.png)")
    return data


def base_card(config, name, compute, current, dataset, start: RunStart, rows, criterion,
               extra_training: dict[str, Any] | None) -> ModelCard:
    """The card of a run before its first epoch: what it is, how to feed it, where it came from."""
    train_rows, val_rows = rows
    selection = "best validation macro-F1 (ties: lower validation loss); test split never used"
    if start.members > 1:
        selection = "best validation macro-F1 of the ensemble (ties: lower validation loss); test split never used"
    return ModelCard(
        name=name, arch=config.arch,
        preprocessing=Preprocessing(img_size=config.img_size),
        weights=WeightsInfo(lesion_decoder=config.mask_guided, members=start.members),
        provenance=Provenance(
            pretrained=start.imagenet, device=compute.device, versions=library_versions(),
            processes={"world_size": current.size, "backend": current.backend}, compute=compute.to_record(),
            init=start.init,
            data={**data_summary(dataset, train_rows, val_rows), "class_weights": criterion.record(),
                  "class_weighting": criterion.mode}),
        training=TrainingSummary(config=asdict(config), selection=selection,
                                 ensemble=({"members": start.members, "combine": "mean of member logits",
                                            "members_are": f"the {start.members} members of {start.init['model']}, "
                                                           "each fine-tuned on this run's training images"}
                                           if start.members > 1 else None),
                                 **_typed(extra_training or {})),
    )


def _typed(extra_training: dict[str, Any]) -> dict[str, Any]:
    """``extra_training`` as kept in a checkpoint (JSON), with its run group as the card's record."""
    group = extra_training.get("group")
    return {**extra_training, "group": RunGroup(**group)} if isinstance(group, dict) else extra_training


def training_data_sidecar(dataset, rows, fingerprints, inherited) -> dict[str, Any]:
    """The ``training_data`` sidecar, with where the prepared dataset was on this machine (a hint for
    calibrate; dropped when shipped), and what an init model and its ancestors saw."""
    record = {"prepared_dir": str(dataset.root.resolve()), **training_data_record(*rows, fingerprints)}
    if inherited:
        record[INHERITED] = inherited
    return record
