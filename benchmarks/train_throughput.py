"""Training throughput: ``mammacls train``'s fast path against a plain fp32 NCHW loop, each against its
bare forward+backward loop, every measurement in a fresh process (the CPU allocator setting is
process-wide), one after the other.

    python benchmarks/train_throughput.py                        # CPU: MobileNetV2, ResNet18, VGG16 at 224 px
    python benchmarks/train_throughput.py --archs resnet18 --device cuda --images 1500

Four figures per architecture, images per second:
  bare plain   forward + backward + AdamW on one batch already in memory: fp32, NCHW, default allocator
  bare fast    the same loop with the settings ``--precision auto --memory-format auto`` pick here
  train plain  ``mammacls train --precision fp32 --memory-format contiguous`` with the allocator untouched
               (MAMMACLS_CPU_ALLOCATOR=default): what train did before the fast path
  train fast   ``mammacls train`` as it runs by default
``train`` figures are the run's own ``train_images_per_s`` (training images over the seconds of the
training pass: augmentation, loss and optimiser included, validation excluded), the median over
the epochs after the first. Targets (issue 21): train fast / bare plain >= 1.8 (MobileNetV2) and
>= 2.5 (ResNet18, VGG16); train fast / bare fast >= 0.85. VGG16 trains on a subset (``--vgg-images``).
With no ``--data`` a synthetic BUSI-layout set is prepared in a temporary cache (speed does not
depend on content).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = {"plain": {"precision": "fp32", "memory_format": "contiguous"},
            "fast": {"precision": "auto", "memory_format": "auto"}}


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


def bare_rate(arch: str, device: str, setting: str, batch: int, size: int, steps: int) -> dict:
    """Images/s of forward + backward + AdamW on a fixed batch already on ``device`` (best of three rounds)."""
    import torch

    from mammacls.nets.compute import Compute, choose_compute, to_layout
    from mammacls.nets.networks import build_model

    compute = (choose_compute(arch, device, **SETTINGS["fast"]) if setting == "fast"
               else Compute(device, "fp32", "contiguous"))
    net = to_layout(build_model(arch, 3), compute).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=compute.torch_memory_format)
    y = torch.randint(0, 3, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with compute.autocast():
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: allocator, kernel selection
        step()
    rates = []
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - started))
    return {"images_per_s": round(max(rates), 2), "compute": compute.to_record()}


def train_rate(arch: str, device: str, setting: str, batch: int, size: int, epochs: int, augment: str,
               data: Path, train_images: int | None) -> dict:
    from mammacls.data.prepared import load_prepared
    from mammacls.inference.model_files import resolve_model
    from mammacls.training import TrainConfig, augmentation_preset, train_model

    split_rows = None
    if train_images:  # a subset (VGG16): N training images drawn at random (every class), all validation images
        dataset = load_prepared(data)
        train = dataset.split("train")
        picked = np.random.default_rng(0).permutation(len(train))[:train_images]
        split_rows = {"train": [train[k]["path"] for k in sorted(picked)],
                      "val": [r["path"] for r in dataset.split("val")]}
    config = TrainConfig(arch=arch, pretrained=False, epochs=epochs, batch_size=batch, img_size=size, device=device,
                         patience=epochs, augmentation=augmentation_preset(augment), **SETTINGS[setting])
    card = train_model(config, data_dir=data, name=f"throughput-{arch}-{setting}-{int(time.time())}", export=False,
                       split_rows=split_rows)
    history = resolve_model(card.name).sidecar("history")
    rates = [h["train_images_per_s"] for h in history[1:]] or [history[0]["train_images_per_s"]]
    return {"images_per_s": round(statistics.median(rates), 2), "per_epoch": [h["train_images_per_s"] for h in history],
            "train_images": card.provenance.data["train_images"], "compute": card.provenance.compute}


def worker(args) -> None:
    """One measurement in this (fresh) process; prints its JSON."""
    if args.worker == "bare":
        result = bare_rate(args.arch, args.device, args.setting, args.batch_size, args.img_size, args.bare_steps)
    else:
        result = train_rate(args.arch, args.device, args.setting, args.batch_size, args.img_size, args.epochs,
                            args.augment, args.data, args.train_images)
    print("RESULT " + json.dumps(result), flush=True)


def measure(kind: str, arch: str, setting: str, args, data: Path, train_images: int | None) -> dict:
    env = dict(os.environ)
    if setting == "plain":
        env["MAMMACLS_CPU_ALLOCATOR"] = "default"
    command = [sys.executable, __file__, "--worker", kind, "--arch", arch, "--setting", setting,
               "--device", args.device, "--batch-size", str(args.batch_size), "--img-size", str(args.img_size),
               "--epochs", str(args.epochs), "--augment", args.augment, "--bare-steps", str(args.bare_steps),
               "--data", str(data)]
    if train_images:
        command += ["--train-images", str(train_images)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{kind} {arch} {setting} failed:\n" + "\n".join(done.stderr.splitlines()[-12:]))
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["mobilenet_v2", "resnet18", "vgg16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--augment", default="standard")
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=460, help="synthetic images (70 %% go to train)")
    parser.add_argument("--vgg-images", type=int, default=96, help="VGG16's training subset")
    parser.add_argument("--bare-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--worker", choices=["bare", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--train-images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="mammacls-throughput-") as tmp:
        os.environ["MAMMACLS_CACHE_DIR"] = str(Path(tmp) / "cache")
        data = args.data
        if data is None:
            from mammacls.data.prepare import prepare_dataset

            source = synthetic_dataset(Path(tmp) / "synthetic", args.images, max(args.img_size, 64))
            data = Path(prepare_dataset(source)["prepared_dir"])
        print(f"{os.cpu_count()} CPU cores, {args.device}, batch {args.batch_size}, {args.img_size} px, "
              f"--augment {args.augment}", flush=True)
        rows = []
        for arch in args.archs:
            subset = args.vgg_images if arch == "vgg16" else None
            figures = {f"{kind} {setting}": measure(kind, arch, setting, args, data, subset)
                       for kind in ("bare", "train") for setting in SETTINGS}
            rate = {key: value["images_per_s"] for key, value in figures.items()}
            row = {"arch": arch, **rate, "fast_settings": figures["train fast"]["compute"],
                   "train_fast_over_bare_plain": round(rate["train fast"] / rate["bare plain"], 2),
                   "train_fast_over_bare_fast": round(rate["train fast"] / rate["bare fast"], 2),
                   "train_fast_over_train_plain": round(rate["train fast"] / rate["train plain"], 2),
                   "train_images": figures["train fast"]["train_images"]}
            rows.append(row)
            print(f"{arch}: bare plain {rate['bare plain']:.1f}, bare fast {rate['bare fast']:.1f}, "
                  f"train plain {rate['train plain']:.1f}, train fast {rate['train fast']:.1f} images/s; "
                  f"train fast = {row['train_fast_over_bare_plain']:.2f}x bare plain, "
                  f"{row['train_fast_over_bare_fast']:.0%} of bare fast, "
                  f"{row['train_fast_over_train_plain']:.2f}x train plain ({row['fast_settings']})", flush=True)
    document = {"device": args.device, "cpu_cores": os.cpu_count(), "img_size": args.img_size,
                "batch_size": args.batch_size, "augment": args.augment, "rows": rows}
    print(json.dumps(document, indent=2))
    if args.out:
        args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
