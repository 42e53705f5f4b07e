"""Export: write an ONNX copy of a trained model beside its safetensors weights.

``predict`` runs the ONNX file with ONNX Runtime on the CPU, which starts in a
fraction of the time it takes to import torch. The export holds the network
only; preprocessing (grayscale, square resize, normalisation) and the
calibration temperature come from the same model card as the weights.
"""

from __future__ import annotations

import json
import warnings
from mammacls.errors import MammaclsError
from mammacls.inference.card import ModelCard, OnnxExport
from mammacls.store import atomic_path, sha256_file
from mammacls.inference.model_files import METADATA_FILE, ModelRef
from mammacls.nets.weights import load_network

ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"  # penultimate features, for the out-of-distribution check


def export_onnx(ref: ModelRef) -> ModelCard:
    """Export ``ref`` to ``model.onnx`` in its folder and record it in its card; for the read-only
    shipped model, in its folder of derived files in the cache. Returns the updated card."""
    import torch

    folder = ref.files_dir
    if not ref.read_only and not (folder / METADATA_FILE).is_file():
        raise MammaclsError(f"export needs a model folder with {METADATA_FILE}; {ref.weights} has none beside it")
    from mammacls.nets.networks import with_features

    net = with_features(ref.card.arch, load_network(ref, "cpu"))
    size = ref.card.img_size
    example = torch.zeros(1, 1, size, size)
    target = folder / ONNX_FILE
    with atomic_path(target) as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated from torch 2.9 on, but unlike the
        # torch.export one it needs no onnxscript and exports these CNNs exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(
                net, example, str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, FEATURES_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}},
                opset_version=ONNX_OPSET, dynamo=False,
            )
        except Exception as exc:  # the exporter raises many types; any of them means no usable file
            raise MammaclsError(f"ONNX export of {ref.name} failed: {str(exc).splitlines()[0][:160]}") from None
        _embed_card(tmp, ref.card)
    ref.update_card(onnx=OnnxExport(file=ONNX_FILE, sha256=sha256_file(target), opset=ONNX_OPSET, input=INPUT_NAME,
                                    output=OUTPUT_NAME, features=FEATURES_NAME,
                                    exported_with={"torch": torch.__version__}))
    return ref.card


def _embed_card(path, card: ModelCard) -> None:
    """Copy what preprocessing needs into the ONNX file's own metadata, so it describes itself."""
    import onnx

    model = onnx.load(str(path))
    described = {"schema": card.schema, "arch": card.arch, "classes": list(card.classes),
                 "img_size": card.img_size, "mean": list(card.preprocessing.mean), "std": list(card.preprocessing.std),
                 "temperature": card.temperature, "sha256": card.weights.sha256}
    if card.calibration is not None and card.calibration.class_temperatures is not None:
        described["class_temperatures"] = list(card.calibration.class_temperatures)
    for key, value in described.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"mammacls.{key}", json.dumps(value)
    onnx.save(model, str(path))
