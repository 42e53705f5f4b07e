"""How fast is `mammacls predict`? Prints figures and ratios measured in one run.

    python benchmarks/predict_speed.py [--model NAME] [--images N] [--runs 5] [--batch-size 32]

Needs a prepared dataset (its test split supplies the images) and a trained
model with an ONNX export in the cache (default: the best one). Measures:
  1. cold `mammacls predict one.png` (ONNX path): wall time and peak memory,
     against `python -c "import torch, torchvision"` on the same machine;
  2. throughput over N test images (repeated as needed), decoding included:
     ONNX path vs eager PyTorch path at the same batch size, and vs bare
     `session.run` on pre-decoded arrays;
  3. `mammacls --help`.
Every figure is the median of --runs runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_child(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    return wall, usage.ru_maxrss / 1024


def median_child(args: list[str], runs: int) -> tuple[float, float]:
    results = [run_child(args) for _ in range(runs)]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def throughput(fn, n_images: int, runs: int) -> float:
    fn()  # warm-up: sessions, caches, thread pools
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return n_images / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import numpy as np

    from mammacls.data.prepared import load_prepared
    from mammacls.inference.images import load_grayscale, resize_square
    from mammacls.predict import predict_paths
    from mammacls.inference.onnx_backend import OnnxBackend, to_network_input
    from mammacls.inference.model_files import resolve_model

    ref = resolve_model(args.model)
    if ref.card.onnx is None:
        raise SystemExit(f"model {ref.name} has no ONNX export: run mammacls export --model {ref.name}")
    test_paths = [Path(row["path"]) for row in load_prepared().split("test")]
    # predict skips a file named twice, so repeat the test images as distinct copies
    scratch = tempfile.TemporaryDirectory(prefix="mammacls-bench-")
    files = []
    for i in range(args.images):
        copy = Path(scratch.name) / f"{i:05d} {test_paths[i % len(test_paths)].name}"
        shutil.copyfile(test_paths[i % len(test_paths)], copy)
        files.append(copy)
    cli = [sys.executable, "-m", "mammacls"]
    model_arg = ["--model", str(ref.weights.parent)]
    print(f"model {ref.name} ({ref.card.arch}, {ref.card.img_size} px); {os.cpu_count()} CPUs; "
          f"median of {args.runs} runs")

    cold, cold_mem = median_child([*cli, "predict", str(files[0]), *model_arg], args.runs)
    torch_import, torch_mem = median_child([sys.executable, "-c", "import torch, torchvision"], args.runs)
    help_time, _ = median_child([*cli, "--help"], args.runs)
    print(f"cold predict one image      {cold:6.2f} s  {cold_mem:6.0f} MiB")
    print(f"import torch, torchvision   {torch_import:6.2f} s  {torch_mem:6.0f} MiB")
    print(f"  ratio                     {cold / torch_import:6.2f}x time (target <= 0.35)  "
          f"{cold_mem / torch_mem:.2f}x memory")
    print(f"mammacls --help             {help_time:6.2f} s  (target <= 0.5)")

    size = ref.card.img_size
    def check(result):
        assert len(result["predictions"]) == len(files), "every copy must be predicted"

    onnx_rate = throughput(lambda: check(predict_paths(files, model=str(ref.weights.parent), backend="onnx",
                                                       batch_size=args.batch_size)), len(files), args.runs)
    backend = OnnxBackend(ref)
    decoded = np.stack([resize_square(load_grayscale(p), size) for p in files])
    session, name = backend.session, backend.input_name
    mean, std = backend.mean, backend.std
    batches = [to_network_input(decoded[i:i + args.batch_size], mean, std)
               for i in range(0, len(decoded), args.batch_size)]
    raw_rate = throughput(lambda: [session.run(None, {name: b}) for b in batches], len(files), args.runs)
    torch_rate = throughput(lambda: check(predict_paths(files, model=str(ref.weights.parent), backend="torch",
                                                        device="cpu", batch_size=args.batch_size)),
                            len(files), args.runs)
    print(f"predict {len(files)} images, batch {args.batch_size}, decoding included:")
    print(f"  ONNX Runtime path         {onnx_rate:7.1f} img/s")
    print(f"  eager PyTorch path        {torch_rate:7.1f} img/s")
    print(f"  bare session.run          {raw_rate:7.1f} img/s (pre-decoded, pre-normalised)")
    print(f"  ONNX / PyTorch            {onnx_rate / torch_rate:7.2f}x (target >= 2.5)")
    print(f"  ONNX path / session.run   {onnx_rate / raw_rate:7.1%} (target >= 80%)")
    scratch.cleanup()


if __name__ == "__main__":
    main()
