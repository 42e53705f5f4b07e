"""How often does `predict` accept BUSI and refuse what is not breast ultrasound?

    python benchmarks/ood_rates.py [--model NAME] [--keep DIR]

Builds, without network, an out-of-distribution set from images that installed
packages ship (photos from scikit-learn and matplotlib, in colour and in gray),
rendered documents and charts, noise, gradients, solid frames, a CT slice,
colour-tinted and fake-Doppler test images (of the first source); then runs the
real predict path on it and on the test split of the latest prepared dataset, each
source on its own. Targets: >= 98 % of each source's test images accepted, >= 95 %
of the OOD set rejected.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


def _save(folder: Path, name: str, array: np.ndarray) -> None:
    Image.fromarray(array).save(folder / f"{name}.png")


def _photo_variants(rng, photo: np.ndarray, count: int):
    height, width = photo.shape[:2]
    for _ in range(count):
        h, w = int(height * rng.uniform(0.4, 0.9)), int(width * rng.uniform(0.4, 0.9))
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        yield photo[y:y + h, x:x + w]


def _rendered(kind: str, rng) -> np.ndarray:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), dpi=100)
    if kind == "document":
        words = "the patient was seen in clinic today report findings impression recommend follow up".split()
        for line in range(14):
            figure.text(0.05, 0.93 - line * 0.065, " ".join(rng.choice(words, size=10)), fontsize=11)
    else:
        ax = figure.add_subplot()
        ax.bar(range(8), rng.uniform(1, 10, size=8))
        ax.set_title("Quarterly figures")
    from mammacls.reporting.plots import figure_png_bytes

    import io

    return np.asarray(Image.open(io.BytesIO(figure_png_bytes(figure, dpi=100))).convert("RGB"))


def build_ood_set(folder: Path, busi_test: list[Path], rng) -> dict[str, str]:
    """Write the OOD images; returns file name -> category."""
    import matplotlib
    import sklearn.datasets

    categories: dict[str, str] = {}

    def add(category: str, name: str, array: np.ndarray) -> None:
        _save(folder, name, array)
        categories[f"{name}.png"] = category

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in
              (sample / "grace_hopper.jpg", sample / "Minduka_Present_Blue_Pack.png")]
    photos += list(sklearn.datasets.load_sample_images().images)
    for i, photo in enumerate(photos):
        for j, crop in enumerate(_photo_variants(rng, photo, 6)):
            add("photo (colour)", f"photo-{i}-{j}", crop)
            add("photo (gray)", f"photo-gray-{i}-{j}", np.asarray(Image.fromarray(crop).convert("L")))
    for i in range(8):
        add("document", f"document-{i}", _rendered("document", rng))
        add("chart / screenshot", f"chart-{i}", _rendered("chart", rng))
    with gzip.open(sample / "s1045.ima.gz") as handle:  # a CT slice, 256 x 256 16-bit
        ct = np.frombuffer(handle.read(), np.uint16).reshape(256, 256).astype(np.float64)
    add("CT slice", "ct", np.uint8(255 * ct / ct.max()))
    for i in range(10):
        add("noise", f"noise-uniform-{i}", rng.integers(0, 256, size=(400, 500)).astype(np.uint8))
        add("noise", f"noise-gauss-{i}", np.uint8(np.clip(rng.normal(128, 40, size=(400, 500)), 0, 255)))
    yy, xx = np.mgrid[0:400, 0:500]
    for i, field in enumerate((xx / 500, yy / 400, np.hypot(yy - 200, xx - 250) / 320, (xx + yy) / 900)):
        add("gradient", f"gradient-{i}", np.uint8(255 * np.clip(field, 0, 1)))
        add("gradient", f"gradient-inverted-{i}", np.uint8(255 * (1 - np.clip(field, 0, 1))))
    for value in (0, 40, 128, 255):
        add("solid frame", f"solid-{value}", np.full((400, 500), value, np.uint8))
    for i, path in enumerate(busi_test[:20]):
        gray = np.asarray(Image.open(path).convert("L")).astype(np.float64)
        tint = np.array([(1.0, 0.55, 0.3), (0.3, 0.8, 1.0), (1.0, 0.3, 0.9), (0.4, 1.0, 0.4)][i % 4])
        add("colour-tinted ultrasound", f"tinted-{i}", np.uint8(gray[..., None] * tint))
        doppler = np.stack([gray] * 3, axis=-1)
        h, w = gray.shape
        box = (slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))
        region = doppler[box]
        flow = rng.random(region.shape[:2]) > 0.5
        region[flow] = (230, 30, 30)
        region[~flow] = (30, 60, 230)
        add("colour Doppler (synthetic)", f"doppler-{i}", np.uint8(doppler))
    return categories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--keep", type=Path, default=None, help="write the OOD set here and keep it")
    args = parser.parse_args()

    from mammacls.data.prepared import load_prepared
    from mammacls.predict import predict_paths

    rows = load_prepared().split("test")
    test = [Path(row["path"]) for row in rows]
    source_of = {str(Path(row["path"])): row["source"] for row in rows}
    rng = np.random.default_rng(0)
    busi_like = [p for p, row in zip(test, rows) if row["source"] == rows[0]["source"]]
    with tempfile.TemporaryDirectory(prefix="mammacls-ood-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        categories = build_ood_set(folder, busi_like, rng)
        scans = predict_paths(test, model=args.model)
        ood = predict_paths([folder / name for name in categories], model=args.model)
    model = scans["model"]
    print(f"model {model['name']} ({model['arch']}, {model['img_size']} px), OOD threshold "
          f"{model['ood_threshold']}, min confidence {model['min_confidence']}")
    for source in dict.fromkeys(source_of.values()):
        mine = [p for p in scans["predictions"] if source_of[p["path"]] == source]
        status = Counter(p["status"] for p in mine)
        accepted = 1 - status["rejected"] / len(mine)
        print(f"{source} test split: {len(mine)} images, {accepted:.1%} accepted (target >= 98%); {dict(status)}")
        for p in mine:
            if p["status"] == "rejected":
                print(f"  rejected {Path(p['path']).name}: {p['reason']}")
    per_category: dict[str, Counter] = {}
    for p in ood["predictions"]:
        per_category.setdefault(categories[Path(p["path"]).name], Counter())[p["status"]] += 1
    rejected = sum(c["rejected"] for c in per_category.values())
    total = sum(sum(c.values()) for c in per_category.values())
    print(f"out-of-distribution set: {total} images, {rejected / total:.1%} rejected (target >= 95%)")
    for category, counts in sorted(per_category.items()):
        n = sum(counts.values())
        print(f"  {category:28s} {counts['rejected']:3d}/{n:<3d} rejected   {dict(counts)}")
    reasons = Counter((p["reason"] or "").split(" (")[0] for p in ood["predictions"] if p["status"] == "rejected")
    print("reasons:", dict(reasons))


if __name__ == "__main__":
    main()
