"""Streaming predict at archive scale: peak memory and throughput from 1,000 to 20,000 images.

Each count runs ``mammacls predict FOLDER --output results.jsonl`` in a fresh process over
hard links to a fixed set of BUSI images (the same bytes under N names: decoding and
inference are paid per name, disk space is not), and reads that process's peak resident
memory from the kernel (``os.wait4``). Throughput is compared with bare ``session.run`` of the
same ONNX model (logits and features, as predict asks) on arrays decoded and resized
beforehand, in the same batch size.

    python benchmarks/predict_stream.py --counts 1000,5000,20000

prints one line per count and a JSON summary. Targets (issue 13): peak memory flat from
1,000 to 20,000 images; throughput >= 80 % of bare session.run with >= 8 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUSI = REPO.parent / "shared" / "data" / "Dataset_BUSI_with_GT"


def source_images(root: Path, every: int) -> list[Path]:
    """Every ``every``-th BUSI scan (masks excluded), in a fixed order."""
    if not root.is_dir():
        sys.exit(f"error: BUSI not found at {root} (give --busi)")
    scans = sorted(p for p in root.glob("*/*.png") if "_mask" not in p.name)
    return scans[::every]


def link_archive(sources: list[Path], folder: Path, count: int) -> None:
    """``count`` names in ``folder`` (100 per subfolder), hard links to copies of ``sources``."""
    originals = folder / ".originals"
    originals.mkdir(parents=True)
    copies = []
    for i, source in enumerate(sources):
        copies.append(originals / f"{i:04d}.png")
        shutil.copyfile(source, copies[-1])
    for i in range(count):
        sub = folder / f"{i // 100:04d}"
        sub.mkdir(exist_ok=True)
        os.link(copies[i % len(copies)], sub / f"scan{i:06d}.png")
    shutil.rmtree(originals)  # the links keep the bytes


def run_predict(folder: Path, output: Path, model: str, batch_size: int, workers: int | None) -> dict:
    command = [sys.executable, "-m", "mammacls", "predict", str(folder), "--output", str(output),
               "--model", model, "--batch-size", str(batch_size)]
    if workers:
        command += ["--workers", str(workers)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        sys.exit(f"predict failed: {stderr[-1000:]}")
    lines = output.read_text().count("\n")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "records": lines}


def bare_rate(sources: list[Path], model: str, batch_size: int, images: int) -> float:
    """Images per second of the backend alone on pre-decoded, pre-resized arrays."""
    import numpy as np

    from mammacls.inference.images import load_grayscale, resize_square
    from mammacls.runtime import open_backend
    from mammacls.inference.model_files import resolve_model

    ref = resolve_model(model)
    backend, _ = open_backend(ref, "cpu", "onnx")
    size = ref.card.img_size
    arrays = np.stack([resize_square(load_grayscale(p), size) for p in sources])
    batches = [arrays[np.arange(start, start + batch_size) % len(arrays)] for start in range(0, images, batch_size)]
    backend.logits_and_features(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        backend.logits_and_features(batch)
    return len(batches) * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busi", type=Path, default=BUSI)
    parser.add_argument("--every", type=int, default=6, help="use every N-th BUSI scan (default 6: 130 scans)")
    parser.add_argument("--counts", default="1000,5000,20000")
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="predict's --workers (default: every core)")
    parser.add_argument("--bare-images", type=int, default=1024)
    args = parser.parse_args()

    sources = source_images(args.busi, args.every)
    rate = bare_rate(sources, args.model, args.batch_size, args.bare_images)
    cores = os.cpu_count()
    print(f"{cores} cores; {len(sources)} distinct BUSI scans; bare session.run: {rate:.1f} images/s "
          f"(batch {args.batch_size}, pre-decoded)", flush=True)
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        with tempfile.TemporaryDirectory(prefix="mammacls-stream-") as tmp:
            folder = Path(tmp) / "archive"
            link_archive(sources, folder, count)
            result = run_predict(folder, Path(tmp) / "results.jsonl", args.model, args.batch_size, args.workers)
        throughput = count / result["seconds"]
        rows.append({"images": count, **result, "images_per_s": round(throughput, 1),
                     "share_of_bare": round(throughput / rate, 3)})
        print(f"{count:>6} images: {result['seconds']:>7.1f} s, {throughput:6.1f} images/s "
              f"({throughput / rate:.0%} of bare), peak RSS {result['peak_rss_mib']:.0f} MiB, "
              f"{result['records']} records", flush=True)
    print(json.dumps({"cores": cores, "bare_images_per_s": round(rate, 1), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
