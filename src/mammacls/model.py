"""Model: torchvision CNNs adapted to 1-channel ultrasound and 3 classes."""

from __future__ import annotations

from contextlib import contextmanager

from mammacls import CLASSES
from mammacls.errors import MammaclsError

ARCHS = ("resnet18", "vgg16", "mobilenet_v2")
DEFAULT_ARCH = "mobilenet_v2"

# One grey channel normalised with the mean of ImageNet's per-channel statistics.
# Because every channel of a replicated grey image then carries the same value,
# summing the pretrained RGB filters gives exactly the 3-channel response.
GRAY_MEAN = 0.449
GRAY_STD = 0.226


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise MammaclsError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    return arch


def build_model(arch: str, num_classes: int = len(CLASSES), pretrained: bool = False):
    """A torchvision ``arch`` with a 1-channel stem and a ``num_classes`` head.

    With ``pretrained`` the ImageNet weights come through torchvision's weights
    API (torch hub cache, download if missing); the stem is initialised from
    the pretrained RGB filters summed over the channel axis.
    """
    from torchvision import models

    check_arch(arch)
    net = getattr(models, arch)(weights=None)
    if pretrained:
        net.load_state_dict(load_imagenet_state_dict(arch))
    _set_first_conv(arch, net, fold_to_one_channel(_first_conv(arch, net)))
    _replace_head(arch, net, num_classes)
    return net


def imagenet_weights(arch: str):
    from torchvision import models

    return models.get_model_weights(arch).DEFAULT


def load_imagenet_state_dict(arch: str):
    """ImageNet weights from the torch hub cache, downloading them if absent."""
    import urllib.error

    import torch

    weights = imagenet_weights(arch)
    filename = weights.url.rsplit("/", 1)[-1]
    cache = f"{torch.hub.get_dir()}/checkpoints/{filename}"
    try:
        # weights_only=True: torch.load never unpickles arbitrary objects.
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise MammaclsError(
            f"cannot get ImageNet weights for {arch} ({reason}): use --no-pretrained, "
            f"or download {weights.url} to {cache}"
        ) from None
    except Exception as exc:  # a damaged or foreign file in the cache: zip, pickle or key errors
        raise MammaclsError(
            f"ImageNet weights file for {arch} is damaged ({str(exc).splitlines()[0][:120]}): "
            f"delete {cache} and retry, or use --no-pretrained"
        ) from None


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


def _first_conv(arch, net):
    if arch == "resnet18":
        return net.conv1
    if arch == "vgg16":
        return net.features[0]
    return net.features[0][0]


def _set_first_conv(arch, net, conv) -> None:
    if arch == "resnet18":
        net.conv1 = conv
    elif arch == "vgg16":
        net.features[0] = conv
    else:
        net.features[0][0] = conv


def _replace_head(arch, net, num_classes: int) -> None:
    from torch import nn

    if arch == "resnet18":
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    elif arch == "vgg16":
        net.classifier[6] = nn.Linear(net.classifier[6].in_features, num_classes)
    else:
        net.classifier[1] = nn.Linear(net.classifier[1].in_features, num_classes)


def normalise(batch_uint8_or_unit):
    """Map a float tensor in [0, 1] to the network's input scale."""
    return (batch_uint8_or_unit - GRAY_MEAN) / GRAY_STD


def resolve_device(device: str) -> str:
    """'auto' means CUDA when available; asking for CUDA without it is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MammaclsError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise MammaclsError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


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
    from mammacls.metrics import softmax

    return softmax(predict_logits(net, images, device, batch_size), temperature)


def head_layer(arch: str, net):
    """The final Linear layer; its input is the penultimate feature vector."""
    if arch == "resnet18":
        return net.fc
    if arch == "vgg16":
        return net.classifier[6]
    return net.classifier[1]


@contextmanager
def capture_features(arch: str, net):
    """While active, ``box["features"]`` holds the penultimate features of ``net``'s last forward."""
    box: dict = {}
    handle = head_layer(arch, net).register_forward_hook(
        lambda _m, inputs, _o: box.__setitem__("features", inputs[0]))
    try:
        yield box
    finally:
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
# Mask-guided training adds a light FPN-style decoder on two backbone feature
# maps: one at stride 8 (detail) and the last one at stride 32 (context).
# (channels at stride 8, channels at stride 32) per architecture.
DECODER_CHANNELS = {"resnet18": (128, 512), "vgg16": (256, 512), "mobilenet_v2": (32, 1280)}
DECODER_WIDTH = 64
LESION_DECODER = "lesion_decoder"


def attach_lesion_decoder(arch: str, net):
    """Give ``net`` a lesion-segmentation decoder as submodule ``lesion_decoder``.

    The torchvision forward ignores it, so the classifier alone runs (and is
    exported) unless :func:`forward_with_lesion` is called.
    """
    from torch import nn

    check_arch(arch)
    mid, deep = DECODER_CHANNELS[arch]

    def conv_bn(cin, cout, k):
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    decoder = nn.ModuleDict({
        "mid": conv_bn(mid, DECODER_WIDTH, 1),
        "deep": conv_bn(deep, DECODER_WIDTH, 1),
        "fuse": nn.Sequential(conv_bn(DECODER_WIDTH, DECODER_WIDTH, 3), conv_bn(DECODER_WIDTH, DECODER_WIDTH, 3)),
        "out": nn.Conv2d(DECODER_WIDTH, 1, 1),
    })
    setattr(net, LESION_DECODER, decoder)
    return net


def has_lesion_decoder(net) -> bool:
    return hasattr(net, LESION_DECODER)


def _staged_forward(arch: str, net, x):
    """The torchvision forward, split to expose the stride-8 and final feature maps."""
    import torch

    if arch == "resnet18":
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        mid = net.layer2(net.layer1(x))
        deep = net.layer4(net.layer3(mid))
        return net.fc(torch.flatten(net.avgpool(deep), 1)), mid, deep
    if arch == "vgg16":
        mid = net.features[:17](x)
        deep = net.features[17:](mid)
        return net.classifier(torch.flatten(net.avgpool(deep), 1)), mid, deep
    mid = net.features[:7](x)
    deep = net.features[7:](mid)
    pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(deep, (1, 1)), 1)
    return net.classifier(pooled), mid, deep


def forward_with_lesion(arch: str, net, x):
    """Class logits and lesion-mask logits (N x 1 x H x W, the input's size) in one pass."""
    from torch.nn import functional as F

    if not has_lesion_decoder(net):
        raise MammaclsError("this model was not trained with --mask-guided: it has no lesion decoder")
    logits, mid, deep = _staged_forward(arch, net, x)
    decoder = getattr(net, LESION_DECODER)
    fused = decoder["mid"](mid) + F.interpolate(decoder["deep"](deep), size=mid.shape[-2:], mode="bilinear",
                                               align_corners=False)
    mask = decoder["out"](decoder["fuse"](fused))
    return logits, F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)


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
