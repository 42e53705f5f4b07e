"""Model weights with torch: saving a network, loading one after checking its sha256, publishing.

Finding a model and reading its metadata without torch is ``mammacls.inference.model_files``.
Model files are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mammacls import CLASSES
from mammacls.errors import MammaclsError
from mammacls.inference.card import SIDECAR_FILES, ModelCard, without_machine_specific
from mammacls.inference.model_files import HEADER_KEY, METADATA_FILE, ModelRef, check_weights_digest, header_record
from mammacls.store import atomic_path, atomic_write_json, sha256_file, writing


def library_versions() -> dict[str, str]:
    import platform

    import numpy
    import torch
    import torchvision

    from mammacls import __version__

    return {"mammacls": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def state_dict_cpu(net) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}


def save_model(net, card: ModelCard, model_dir: Path, tensors: dict | None = None,
               sidecars: dict[str, Any] | None = None) -> ModelCard:
    """Write the sibling files, the weights (``net``'s, or ``tensors``), then the card, each atomically;
    returns the card with the weights' sha256. ``sidecars`` maps a kind (``history``,
    ``training_data``) to its JSON content, written as that kind's file (``SIDECAR_FILES``)."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    names = {kind: SIDECAR_FILES[kind] for kind in sidecars or {}}
    card = card.replace(sidecars={**card.sidecars, **names})
    for kind, value in (sidecars or {}).items():
        atomic_write_json(model_dir / names[kind], value)
    weights_path = model_dir / card.weights.file
    header = {HEADER_KEY: json.dumps(header_record(card))}
    with atomic_path(weights_path) as tmp, writing(weights_path):
        save_file(tensors if tensors is not None else state_dict_cpu(net), str(tmp), metadata=header)
    card = card.with_weights(sha256=sha256_file(weights_path))
    atomic_write_json(model_dir / METADATA_FILE, card.to_record())
    return card


def load_network(ref: ModelRef, device: str = "cpu"):
    """Build the network of ``ref`` and load its weights after checking integrity."""
    from safetensors.torch import load

    if not ref.weights.is_file():
        raise MammaclsError(f"model weights missing: {ref.weights}")
    data = ref.weights.read_bytes()  # hash and load the very same bytes: the file may be replaced meanwhile
    check_weights_digest(ref, hashlib.sha256(data).hexdigest())
    try:
        state = load(data)
    except Exception as exc:  # safetensors' own error type
        raise MammaclsError(f"{ref.weights} is not a valid safetensors file ({str(exc)[:100]})") from None
    import torch

    with torch.device("meta"):  # no random initialisation of weights about to be replaced (VGG16: seconds)
        net = build_network(ref.card.arch, ref.card.members, state)
    expected = net.state_dict()
    # float16-stored kernels come back as the network's float32 (assign keeps the file's dtype otherwise)
    state = {key: value.to(expected[key].dtype) if key in expected else value for key, value in state.items()}
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:160]
        raise MammaclsError(f"{ref.weights} does not fit a {ref.card.arch} model: {first}") from None
    return net.to(device).eval()


def build_network(arch: str, count: int, state: dict):
    """The untrained network that ``state`` (a model's weights) fits: one architecture, or an
    ensemble of its members (keys ``members.K.``), each with a lesion decoder when ``state`` has one."""
    from mammacls.nets.networks import LESION_DECODER, attach_lesion_decoder, build_ensemble, build_model

    members = [build_model(arch, len(CLASSES), pretrained=False) for _ in range(count)]
    prefix = "members.0." if count > 1 else ""
    if any(key.startswith(prefix + LESION_DECODER + ".") for key in state):
        for member in members:
            attach_lesion_decoder(arch, member)  # mask-guided: keep its lesion decoder
    return build_ensemble(members) if count > 1 else members[0]


# Shipping stores the large convolution kernels as float16 and every small tensor (stem,
# batch-norm, classifier) as float32: measured on the BUSI model, all-float16 moved test
# probabilities by up to 1.6e-3, this mix by 1.1e-4, at 23 instead of 45 MB.
HALF_PRECISION_MIN_ELEMENTS = 100_000


def publish_model(ref: ModelRef, target: Path, *, half: bool = True, name: str | None = None,
                  half_min_elements: int = HALF_PRECISION_MIN_ELEMENTS) -> ModelCard:
    """Copy a trained model to ``target`` (e.g. ``weights/default``) for shipping.

    With ``half`` the large kernels are stored as float16; :func:`load_network` casts them back
    to float32, so inference still runs in float32. The out-of-distribution densities and the
    train/validation fingerprints travel along; nothing of the build machine does.
    """
    import shutil

    net = load_network(ref, "cpu")
    tensors = state_dict_cpu(net)
    if half:
        tensors = {k: (v.half() if v.is_floating_point() and v.numel() >= half_min_elements else v)
                   for k, v in tensors.items()}
    dtype = ("float32" if not half else "float16" if half_min_elements == 0 else
             f"float16 for tensors of >= {half_min_elements} elements, float32 otherwise")
    card = ref.card.with_weights(storage_dtype=dtype).replace(onnx=None, sidecars={}, name=name or ref.card.name)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    ood = card.refusal.ood
    if ood is not None:
        shutil.copyfile(ref.file(ood.file), target / ood.file)
    training_data = ref.sidecar("training_data")
    sidecars = {"training_data": without_machine_specific(training_data)} if training_data else None
    return save_model(net, card, target, tensors, sidecars)
