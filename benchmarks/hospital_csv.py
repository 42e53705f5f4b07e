"""A stand-in for a hospital's labelled scans, written as a user would write their CSV.

    python benchmarks/hospital_csv.py scans.csv [--patients N]

The scans are BUS-BRA's test-split patients (``prepare``'s default seed): the shipped default trained
on BUS-BRA's train split and calibrated on its validation split, so it has never seen them. Benign
and malignant, with lesion masks and patient ids, no normal scans: what a site's own set usually is.
Then, as the README's "Adapt the shipped model to your scanner" does:

    mammacls prepare ../shared/data/Dataset_BUSI_with_GT hospital=scans.csv
    mammacls train --init default --epochs 3 --name adapted
    mammacls evaluate --model default --model adapted
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_hospital_csv(busbra: Path, target: Path, patients: int | None = None, prepared: Path | None = None) -> Path:
    """Write the CSV of ``patients`` (all when None) patients of BUS-BRA's test split to ``target``.
    ``prepared``: a prepared dataset that holds BUS-BRA (a source's split does not depend on what else
    was prepared with it); by default BUS-BRA is prepared alone in a throwaway cache."""
    import os
    import tempfile

    from mammacls.data.prepare import prepare_dataset
    from mammacls.data.prepared import load_prepared

    with tempfile.TemporaryDirectory(prefix="mammacls-hospital-") as scratch:
        if prepared is None:
            previous = os.environ.get("MAMMACLS_CACHE_DIR")
            os.environ["MAMMACLS_CACHE_DIR"] = scratch  # a throwaway prepare: the user's cache is not touched
            try:
                prepared = Path(prepare_dataset(busbra)["prepared_dir"])
            finally:
                if previous is None:
                    os.environ.pop("MAMMACLS_CACHE_DIR")
                else:
                    os.environ["MAMMACLS_CACHE_DIR"] = previous
        dataset = load_prepared(prepared)
        source = busbra.resolve()
        test_rows = [r for r in dataset.split("test") if Path(r["path"]).is_relative_to(source)]
        chosen: dict[str, list[dict]] = {}
        for row in sorted(test_rows, key=lambda r: (r["patient"], r["path"])):
            if patients is None or len(chosen) < patients or row["patient"] in chosen:
                chosen.setdefault(row["patient"], []).append(row)
    with open(target, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient", "mask"])
        for patient, rows in chosen.items():
            for row in rows:
                writer.writerow([row["path"], row["label"], f"H{patient}", row["mask_paths"]])
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path)
    parser.add_argument("--patients", type=int, default=None, help="how many (default: the whole test split)")
    parser.add_argument("--busbra", type=Path, default=DATA / "BUS-BRA")
    args = parser.parse_args()
    path = write_hospital_csv(args.busbra, args.target, args.patients)
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    print(f"{path}: {len(rows)} scans of {len({r['patient'] for r in rows})} patients "
          f"({sum(r['label'] == 'malignant' for r in rows)} malignant)")


if __name__ == "__main__":
    main()
