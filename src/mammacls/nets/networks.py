"""Model: torchvision CNNs adapted to 1-channel ultrasound and 3 classes."""

from __future__ import annotations

from contextlib import contextmanager

from mammacls import CLASSES
from mammacls.choices import Device, check_arch, parse_choice
from mammacls.errors import MammaclsError, param
from mammacls.archs import ARCH_SPECS
from mammacls.inference.card import GRAY_MEAN, GRAY_STD
from mammacls.nets.imagenet import load_imagenet_state_dict




def build_model(arch: str, num_classes: int = len(CLASSES), pretrained: bool = False, imagenet: str = "auto"):
    """A torchvision ``arch`` with a 1-channel stem and a ``num_classes`` head.

    With ``pretrained`` the network starts from ImageNet weights (see
    ``build_pretrained_model``); the stem is initialised from the pretrained
    RGB filters summed over the channel axis.
    """
    if pretrained:
        return build_pretrained_model(arch, num_classes, imagenet)[0]
    return _adapted(arch, None, num_classes)


def build_pretrained_model(arch: str, num_classes: int = len(CLASSES), imagenet: str = "auto"):
    """The network started from ImageNet weights, and the record of which weights (for the metadata)."""
    state, record = load_imagenet_state_dict(arch, imagenet)
    return _adapted(arch, state, num_classes), record


def _adapted(arch: str, imagenet_state, num_classes: int):
    from torchvision import models

    check_arch(arch)
    net = getattr(models, arch)(weights=None)
    if imagenet_state is not None:
        net.load_state_dict(imagenet_state)
    from torch import nn

    spec = ARCH_SPECS[arch]
    _replace(net, spec.stem, fold_to_one_channel(net.get_submodule(spec.stem)))
    _replace(net, spec.head, nn.Linear(net.get_submodule(spec.head).in_features, num_classes))
    return net


def _replace(net, path: str, module) -> None:
    """Put ``module`` at ``path`` (a ``get_submodule`` path such as ``features.0.0``)."""
    parent, _, name = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, name, module)


def fold_to_one_channel(conv):
    """A Conv2d taking 1 channel whose filters are ``conv``'s summed over RGB."""
    import torch
    from torch import nn

    folded = nn.Conv2d(
        1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
    )
    with torch.no_grad():
        folded.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            folded.bias.copy_(conv.bias)
    return folded


def normalise(batch_uint8_or_unit):
    """Map a float tensor in [0, 1] to the network's input scale."""
    return (batch_uint8_or_unit - GRAY_MEAN) / GRAY_STD


def resolve_device(device: str | Device) -> str:
    """'auto' means CUDA when available; asking for CUDA without it is an error."""
    device = parse_choice(Device, device, "device")
    import torch

    if device == Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == Device.cuda and not torch.cuda.is_available():
        raise MammaclsError(f"{param('device')} cuda: no CUDA device is available here (use cpu or auto)")
    return device.value


def _input_batches(images, device: str, batch_size: int):
    """Normalised N x 1 x S x S tensors on ``device`` from uint8 images N x S x S, batch by batch."""
    import numpy as np
    import torch

    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        yield normalise(chunk.to(device).unsqueeze(1).float() / 255.0)


def _batched_outputs(run, images, device: str, batch_size: int, empty: tuple):
    """Apply ``run`` (a batch -> tuple of tensors) to uint8 images N x S x S batch by batch in
    inference mode; each output concatenated as numpy, or ``empty`` when there are no images."""
    import numpy as np
    import torch

    collected = []
    with torch.inference_mode():
        for batch in _input_batches(images, device, batch_size):
            collected.append([output.float().cpu().numpy() for output in run(batch)])
    if not collected:
        return empty
    return tuple(np.concatenate(column) for column in zip(*collected))


def predict_logits(net, images, device: str = "cpu", batch_size: int = 64):
    """Raw class scores (N x classes, numpy float64) for uint8 images of shape N x S x S."""
    import numpy as np

    net.eval()
    (logits,) = _batched_outputs(lambda batch: (net(batch),), images, device, batch_size,
                                 (np.zeros((0, len(CLASSES))),))
    return logits.astype(np.float64)


def predict_proba(net, images, device: str = "cpu", batch_size: int = 64, temperature: float = 1.0):
    """Softmax probabilities (N x classes, numpy) for uint8 images of shape N x S x S."""
    from mammacls.inference.probabilities import softmax

    return softmax(predict_logits(net, images, device, batch_size), temperature)


def frozen_modules(net, arch: str, stages: int) -> list:
    """Fix the first ``stages`` backbone stages of ``net`` (every member of an ensemble): their weights
    stop learning; the modules are returned so that training keeps them in eval mode (batch norm too)."""
    paths = [path for stage in ARCH_SPECS[arch].stages[:stages] for path in stage]
    modules = [member.get_submodule(path) for member in members_of(net) for path in paths]
    for module in modules:
        module.requires_grad_(False)
    return modules


def head_layer(arch: str, net):
    """The final Linear layer; its input is the penultimate feature vector."""
    return net.get_submodule(ARCH_SPECS[arch].head)


# ------------------------------------------------------------- ensembles ---
# An ensemble is one nn.Module holding K members of one architecture (submodule ``members``):
# its forward averages the members' logits, its penultimate features are the members' side by
# side (K x D), so every helper below, the ONNX export and the refusal gate treat it as one network.


def members_of(net) -> list:
    """The member networks of an ensemble, or ``[net]`` for a single network."""
    return list(net.members) if is_ensemble(net) else [net]


def is_ensemble(net) -> bool:
    return getattr(net, "is_ensemble", False)


def build_ensemble(members):
    """One module whose forward is the mean of ``members``' logits."""
    import torch
    from torch import nn

    class Ensemble(nn.Module):
        is_ensemble = True

        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(members)

        def forward(self, x):
            return torch.stack([member(x) for member in self.members]).mean(dim=0)

    return Ensemble()


@contextmanager
def capture_features(arch: str, net):
    """While active, ``box["features"]`` holds the penultimate features of ``net``'s last forward
    (for an ensemble, its members' features concatenated in member order)."""
    import torch

    box: dict = {}
    members = members_of(net)
    parts: list = [None] * len(members)

    def keep(k):
        def hook(_module, inputs, _output):
            parts[k] = inputs[0]
            if all(part is not None for part in parts):
                box["features"] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return hook

    handles = [head_layer(arch, member).register_forward_hook(keep(k)) for k, member in enumerate(members)]
    try:
        yield box
    finally:
        for handle in handles:
            handle.remove()


def with_features(arch: str, net):
    """Wrap ``net`` so that it returns (logits, penultimate features); traceable for ONNX export."""
    from torch import nn

    class WithFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            with capture_features(arch, self.net) as box:
                logits = self.net(x)
            return logits, box["features"]

    return WithFeatures().eval()


def predict_logits_and_features(net, arch: str, images, device: str = "cpu", batch_size: int = 64):
    """Logits and penultimate features (numpy float64) for uint8 images N x S x S."""
    import numpy as np

    logits, features = _batched_outputs(with_features(arch, net), images, device, batch_size,
                                        (np.zeros((0, len(CLASSES))), np.zeros((0, 0))))
    return logits.astype(np.float64), features.astype(np.float64)


# ------------------------------------------------------ lesion decoder ---
LESION_DECODER = "lesion_decoder"


def attach_lesion_decoder(arch: str, net):
    """Give ``net`` a lesion-segmentation decoder (``nets.lesion.LesionDecoder``) as submodule
    ``lesion_decoder``. The torchvision forward ignores it, so the classifier alone runs (and is
    exported) unless :func:`forward_with_lesion` is called.
    """
    from mammacls.nets.lesion import LesionDecoder

    setattr(net, LESION_DECODER, LesionDecoder(*ARCH_SPECS[check_arch(arch)].decoder_channels))
    return net


def has_lesion_decoder(net) -> bool:
    return all(hasattr(member, LESION_DECODER) for member in members_of(net))


def _staged_forward(arch: str, net, x):
    """The torchvision forward, with the decoder's two feature maps caught on the way (hooks)."""
    spec = ARCH_SPECS[arch]
    caught: dict = {}

    def catch(key):
        def hook(_module, _inputs, output):
            caught[key] = output
        return hook

    handles = [net.get_submodule(path).register_forward_hook(catch(key))
               for key, path in (("mid", spec.mid), ("deep", spec.deep))]
    try:
        logits = net(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, caught["mid"], caught["deep"]


def forward_with_lesion(arch: str, net, x):
    """Class logits and lesion-mask logits (N x 1 x H x W, the input's size) in one pass."""

    if not has_lesion_decoder(net):
        raise MammaclsError(f"this model was not trained with {param('mask_guided')}: it has no lesion decoder")
    if is_ensemble(net):  # the mean of the members' class and mask logits
        import torch

        outputs = [forward_with_lesion(arch, member, x) for member in net.members]
        return tuple(torch.stack(column).mean(dim=0) for column in zip(*outputs))
    logits, mid, deep = _staged_forward(arch, net, x)
    return logits, getattr(net, LESION_DECODER)(mid, deep, x.shape[-2:])


def predict_lesion_maps(net, arch: str, images, device: str = "cpu", batch_size: int = 32):
    """Logits (N x classes), lesion probability maps (N x S x S, float32) and penultimate
    features for uint8 images, from one forward pass."""
    import numpy as np
    import torch

    def run(batch):
        with capture_features(arch, net) as box:
            logits, mask = forward_with_lesion(arch, net, batch)
        return logits, torch.sigmoid(mask[:, 0]), box["features"]

    net.eval()
    empty = (np.zeros((0, len(CLASSES))), np.zeros((0, *np.shape(images)[1:]), dtype=np.float32), np.zeros((0, 0)))
    logits, maps, features = _batched_outputs(run, images, device, batch_size, empty)
    return logits.astype(np.float64), maps, features.astype(np.float64)
