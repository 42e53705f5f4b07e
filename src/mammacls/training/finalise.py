"""After the epochs: calibration (temperature, thresholds) and the refusal gate, fitted on a model's
own train and validation images; also for a model trained elsewhere (``mammacls calibrate``).

``finish_model`` is the one way a model is finished, whether a training run (``loop``), an
ensemble of trained members (``ensemble``) or a refit (``recalibrate``) made it: fitted, stamped,
saved with its sidecars, exported to ONNX.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mammacls import CLASSES
from mammacls.errors import MammaclsError
from mammacls.inference.card import Calibration, ModelCard, OodDensity, Refusal
from mammacls.inference.model_files import METADATA_FILE
from mammacls.inference.probabilities import softmax
from mammacls.nets.networks import resolve_device
from mammacls.training.batches import FittingImages, load_fitting_images
from mammacls.training.splits import model_rows, training_dataset
from mammacls.nets.weights import save_model


def fit_calibration(net, arch: str, images: FittingImages, device: str, run_dir: Path,
                    members: int = 1) -> tuple[Calibration, Refusal]:
    """Fitted on validation: temperature scaling (with a temperature of their own for images answered
    normal, where validation has enough of them: ``fit_class_temperatures``), the malignant threshold
    for 90 % specificity and
    the abstention threshold; on train features (threshold on validation): the out-of-distribution density."""
    from mammacls.inference.probabilities import calibrated_softmax
    from mammacls.training.calibration import fit_class_temperatures, fit_temperature
    from mammacls.evaluation.metrics import MALIGNANT, calibration_metrics, threshold_at_specificity
    from mammacls.nets.networks import predict_logits_and_features
    from mammacls.inference.gate import image_statistics
    from mammacls.training.refusal import choose_min_confidence, fit_density, fit_image_density, save_density

    import torch

    train_x, train_y, val_x, val_y = images.train_x, images.train_y, images.val_x, images.val_y
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # full fp32 features, as predict computes them on a CPU
    try:
        logits, val_features = predict_logits_and_features(net, arch, val_x, device)
        _, train_features = predict_logits_and_features(net, arch, train_x, device)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    temperature = fit_temperature(logits, val_y)
    class_temperatures = fit_class_temperatures(logits, val_y, temperature)
    calibrated = calibrated_softmax(logits, temperature, class_temperatures)
    density = fit_density(train_features, train_y, val_features, len(CLASSES), members=members)
    image_density = fit_image_density(np.stack([image_statistics(x) for x in train_x]),
                                      np.stack([image_statistics(x) for x in val_x]))
    calibration = Calibration(
        temperature=temperature, class_temperatures=class_temperatures,
        method=calibration_method(temperature, class_temperatures),
        fitted_on="val",
        malignant_threshold_spec90=threshold_at_specificity(val_y, calibrated[:, MALIGNANT], 0.9),
        malignant_threshold_spec90_raw=threshold_at_specificity(val_y, softmax(logits)[:, MALIGNANT], 0.9),
        val_before=calibration_metrics(val_y, softmax(logits)), val_after=calibration_metrics(val_y, calibrated))
    ood = save_density(run_dir, density, image_density)
    ood["member_thresholds"] = tuple(ood["member_thresholds"])
    return calibration, Refusal(min_confidence=choose_min_confidence(calibrated, val_y), ood=OodDensity(**ood))


def calibration_method(temperature: float, class_temperatures: tuple[float, ...] | None) -> str:
    """``temperature scaling``, naming the answers that have a temperature of their own."""
    if class_temperatures is None:
        return "temperature scaling"
    own = [name for name, value in zip(CLASSES, class_temperatures) if value != temperature]
    return f"temperature scaling; {', '.join(own)} answers with a temperature of their own"


def finish_model(net, card: ModelCard, folder: Path, images: FittingImages, device: str, *,
                 sidecars: dict, stamp: bool = True, export: bool = True,
                 on_export_error: Callable[[MammaclsError], None] | None = None,
                 on_saved: Callable[[], None] | None = None) -> ModelCard:
    """Calibrate and gate ``net`` on ``images``, stamp when it finished (``stamp``), save weights, card and
    sidecars into ``folder`` (atomically), export to ONNX. Returns the final card. An export that fails
    is reported to ``on_export_error`` (the model itself is saved: predict falls back to PyTorch), or
    raised when there is none; ``on_saved`` runs once the model is complete on disk, before the export."""
    from mammacls.inference.model_files import MODEL_FILE, ModelRef
    from mammacls.nets.export import export_onnx

    calibration, refusal = fit_calibration(net, card.arch, images, device, folder, members=card.members)
    provenance = card.provenance
    if stamp:
        provenance = dataclasses.replace(provenance, finished=finished_now())
    final = save_model(net, card.replace(calibration=calibration, refusal=refusal, provenance=provenance), folder,
                       sidecars=sidecars)
    if on_saved is not None:  # the model is complete on disk, before the (slower) export
        on_saved()
    if not export:
        return final
    try:
        return export_onnx(ModelRef(card.name, Path(folder) / MODEL_FILE, final, "cache"))
    except MammaclsError as exc:
        if on_export_error is None:
            raise
        on_export_error(exc)
        return final


def finished_now() -> str:
    """The ``finished`` stamp of a model card: UTC, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def recalibrate(ref, *, device: str = "auto", sections_only: bool = False) -> ModelCard:
    """Refit a saved model's temperature, thresholds and out-of-distribution density on its own
    train/validation images (for models trained by an older mammacls, or on another machine).

    The prepared dataset must hold the model's train+val images (checked by their pixel hashes, so
    a dataset prepared again elsewhere or moved is accepted). A read-only (shipped) model gets its
    refitted files in the cache; its own files are never written. A writable one is saved again in
    the current schema, unless ``sections_only``: then, as for a read-only model, only the card's
    calibration and refusal sections, the density file and the ONNX export are rewritten, in its own
    folder, and the weights and sidecars stay byte for byte. Returns the updated card.
    """
    from mammacls.nets.weights import load_network

    card = ref.card
    if not ref.read_only and not (ref.weights.parent / METADATA_FILE).is_file():
        raise MammaclsError(f"calibrate needs a model folder with {METADATA_FILE}")
    dataset = training_dataset(ref)
    images = load_fitting_images(dataset, *model_rows(dataset, card), card.img_size)
    device = resolve_device(device)
    net = load_network(ref, device)
    if ref.read_only or sections_only:  # read-only: the refit lives in the cache, beside what is derived
        calibration, refusal = fit_calibration(net, card.arch, images, device, ref.files_dir, members=card.members)
        ref.update_card(calibration=calibration, refusal=refusal)
        if card.onnx is not None:
            from mammacls.nets.export import export_onnx

            export_onnx(ref)
        return ref.card
    # written again as the current schema, whatever schema it was read as; when training finished stays
    sidecars = {"training_data": {**(ref.sidecar("training_data") or {}), "train_val_fingerprints": images.fingerprints}}
    history = ref.sidecar("history")
    if history is not None:
        sidecars["history"] = history
    ref.card = finish_model(net, card, ref.weights.parent, images, device, sidecars=sidecars, stamp=False,
                            export=card.onnx is not None)
    ref.legacy_sidecars = {}
    return ref.card
