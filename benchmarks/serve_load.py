"""How `mammacls serve` holds up under load, against `mammacls predict` of the same files. Prints figures.

    python benchmarks/serve_load.py [--model default] [--images 48] [--clients 1 4 8 16]
                                    [--requests 96] [--long 400] [--out results.json]

Bounded: 127.0.0.1 only, at most --requests requests per concurrency level (and --seconds each), then a
long run of --long requests at 8 clients to see whether the server's memory stays flat. Measures:
  1. the CLI's batch predict of the images in one process (predict_paths, batch 32): images/s;
  2. the bare network time of one image (Predictor.classify on a decoded frame), median of 20;
  3. the server (its own process, ONNX Runtime on the CPU): for each client count, one image per
     request, p50/p95/p99 latency, requests/s, errors, the server's resident and peak memory;
  4. the ratio of (3) at 8 clients to (1), the issue's target being >= 0.8.
Images: BUSI scans from ../shared/data when present, else examples/ repeated. The clients run in this
process (threads), so on a 2-core machine they take CPU from the server: the figures are conservative.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSI = ROOT.parent / "shared" / "data" / "Dataset_BUSI_with_GT"


def scans(count: int) -> list[Path]:
    found = sorted(p for p in BUSI.glob("*/*).png") if "_mask" not in p.name) if BUSI.is_dir() else []
    found = found[::max(1, len(found) // count)][:count] if found else sorted((ROOT / "examples").glob("*.png"))
    return [found[k % len(found)] for k in range(count)]


def memory_mib(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of ``pid`` (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def cli_throughput(files: list[Path], model: str) -> float:
    from mammacls.predict import predict_paths

    predict_paths(files[:4], model=model, device="cpu")  # warm: model files in the page cache
    started = time.perf_counter()
    result = predict_paths(files, model=model, device="cpu", batch_size=32)
    assert len(result["predictions"]) == len(files)
    return len(files) / (time.perf_counter() - started)


def bare_latency_ms(files: list[Path], model: str) -> float:
    import mammacls

    predictor = mammacls.load_model(model, device="cpu")
    frame = predictor.frames_of(files[0])
    predictor.classify(frame)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        predictor.classify(frame)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "mammacls", "serve", "--model", model, "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in server.stdout:
        if line.startswith("mammacls serve: http://"):
            threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()  # keep draining
            return server, line.split()[2]
    raise SystemExit("the server did not start")


def load(url: str, files: list[Path], clients: int, requests: int, seconds: float) -> dict:
    import httpx

    payloads = [(f.name, f.read_bytes()) for f in files]
    latencies: list[float] = []
    errors: list[str] = []
    lock, counter = threading.Lock(), iter(range(requests))
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                name, data = payloads[k % len(payloads)]
                started = time.perf_counter()
                try:
                    answer = http.post(f"{url}/v1/predict", files=[("files", (name, data, "image/png"))])
                    ok = answer.status_code == 200 and len(answer.json()["predictions"]) == 1
                except httpx.HTTPError as exc:
                    ok, answer = False, exc
                with lock:
                    latencies.append(time.perf_counter() - started)
                    if not ok:
                        errors.append(str(getattr(answer, "status_code", answer)))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "throughput_rps": round(len(latencies) / wall, 2), "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "p99_ms": pct(0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=96, help="per concurrency level")
    parser.add_argument("--seconds", type=float, default=60.0, help="per concurrency level, at most")
    parser.add_argument("--long", type=int, default=400, help="requests of the memory run at 8 clients")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    files = scans(args.images)
    figures: dict = {"images": len(files), "from": "BUSI" if BUSI.is_dir() else "examples", "cpus": os.cpu_count()}
    figures["cli_images_per_s"] = round(cli_throughput(files, args.model), 2)
    figures["bare_network_ms_one_image"] = round(bare_latency_ms(files, args.model), 1)
    print(f"CLI batch predict: {figures['cli_images_per_s']} images/s; bare network, one image: "
          f"{figures['bare_network_ms_one_image']} ms", flush=True)
    server, url = start_server(args.model)
    try:
        load(url, files, 2, 8, 30)  # warm
        figures["levels"] = []
        for clients in args.clients:
            level = load(url, files, clients, args.requests, args.seconds)
            level["server_rss_mib"], level["server_peak_mib"] = (round(v) for v in memory_mib(server.pid))
            level["vs_cli"] = round(level["throughput_rps"] / figures["cli_images_per_s"], 2)
            figures["levels"].append(level)
            print(json.dumps(level), flush=True)
        rss = []
        for _ in range(4):
            load(url, files, 8, args.long // 4, args.seconds)
            rss.append(round(memory_mib(server.pid)[0]))
        figures["long_run"] = {"requests": args.long, "clients": 8, "rss_mib_each_quarter": rss,
                               "peak_mib": round(memory_mib(server.pid)[1])}
        print(json.dumps(figures["long_run"]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    eight = next((lv for lv in figures["levels"] if lv["clients"] == 8), None)
    if eight:
        print(f"8 clients: {eight['throughput_rps']} requests/s = {eight['vs_cli']}x the CLI's batch predict "
              f"(target >= 0.8); {eight['errors']} errors; p50 {eight['p50_ms']} ms")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
