"""Training throughput: ``mammacls train`` against a bare forward+backward loop on the same device.

The bare loop is the ceiling: the same network, batch size, input size and mixed precision,
on a batch already on the device, no augmentation, no data loading. ``mammacls train`` is
timed from its own per-epoch record (``train_images_per_s``: training images over the
seconds of the training pass, validation excluded), median over epochs after the first.

    python benchmarks/train_throughput.py --device cuda --augment scanner standard
    python benchmarks/train_throughput.py --device cpu --img-size 96 --epochs 3

With no ``--data`` it prepares a synthetic BUSI-layout set of ``--images`` images (content
does not matter for speed) in a temporary cache. Target (issue 13): >= 80 % of the bare loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_dataset(root: Path, images: int, size: int) -> Path:
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("benign", "malignant", "normal"):
        (root / label).mkdir(parents=True)
        for i in range(images // 3):
            coarse = rng.uniform(0, 255, (6, 6)).astype(np.float32)  # low-frequency layout: no two alike
            gray = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (size, size))
            Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).save(root / label / f"{label}_{i:04d}.png")
    return root


def bare_rate(arch: str, device: str, batch: int, size: int, steps: int) -> float:
    """Images/s of forward + backward + AdamW step on a fixed batch already on ``device``."""
    import torch

    from mammacls.nets.networks import build_model

    net = build_model(arch, 3).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, 3, (batch,), device=device)
    use_amp = device.startswith("cuda")
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=use_amp):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        optimizer.step()

    for _ in range(5):  # warm-up: allocator, kernel selection
        step()
    rates = []
    for _ in range(3):  # the ceiling: the best of three rounds
        if use_amp:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if use_amp:
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - started))
    return max(rates)


def train_rate(arch: str, device: str, batch: int, size: int, epochs: int, augment: str, data: Path) -> dict:
    from mammacls.training import TrainConfig, augmentation_preset, train_model

    config = TrainConfig(arch=arch, pretrained=False, epochs=epochs, batch_size=batch, img_size=size,
                         device=device, patience=epochs, augmentation=augmentation_preset(augment))
    card = train_model(config, data_dir=data, name=f"throughput-{augment}-{int(time.time())}", export=False)
    from mammacls.inference.model_files import resolve_model

    history = resolve_model(card.name).sidecar("history")
    rates = [h["train_images_per_s"] for h in history[1:]] or [history[0]["train_images_per_s"]]
    return {"augment": augment, "images_per_s": round(statistics.median(rates), 1),
            "per_epoch": [h["train_images_per_s"] for h in history],
            "train_images": card.provenance.data["train_images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--augment", nargs="+", default=["standard", "scanner"])
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=760, help="synthetic images (70 %% go to train)")
    parser.add_argument("--bare-steps", type=int, default=30)
    args = parser.parse_args()

    from mammacls.nets.networks import resolve_device

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="mammacls-throughput-") as tmp:
        os.environ["MAMMACLS_CACHE_DIR"] = str(Path(tmp) / "cache")
        data = args.data
        if data is None:
            from mammacls.data.prepare import prepare_dataset

            source = synthetic_dataset(Path(tmp) / "synthetic", args.images, max(args.img_size, 64))
            data = Path(prepare_dataset(source)["prepared_dir"])
        bare = bare_rate(args.arch, device, args.batch_size, args.img_size, args.bare_steps)
        name = device if device == "cpu" else f"{device} ({__import__('torch').cuda.get_device_name()})"
        print(f"{args.arch}, {args.img_size} px, batch {args.batch_size} on {name}, {os.cpu_count()} CPU cores: "
              f"bare forward+backward {bare:.1f} images/s", flush=True)
        runs = []
        for augment in args.augment:
            run = train_rate(args.arch, device, args.batch_size, args.img_size, args.epochs, augment, data)
            run["share_of_bare"] = round(run["images_per_s"] / bare, 3)
            runs.append(run)
            print(f"mammacls train --augment {augment}: {run['images_per_s']:.1f} images/s "
                  f"({run['share_of_bare']:.0%} of bare; per epoch {run['per_epoch']})", flush=True)
    print(json.dumps({"device": device, "arch": args.arch, "img_size": args.img_size, "batch_size": args.batch_size,
                      "bare_images_per_s": round(bare, 1), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
