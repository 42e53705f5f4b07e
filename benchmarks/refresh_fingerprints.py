"""Give a model's ``training_data.json`` the fingerprints newer mammacls records: each image's 32 x 32
thumbnail (so evaluate's overlap guard asks the thumbnails to agree with the perceptual hash) and its
name (``source:file``, so a refusal names the image it matches), taken from the prepared dataset the
model was trained on (matched by pixel sha256; nothing else changes).

    python benchmarks/refresh_fingerprints.py weights/default [--data PREPARED_DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a model folder")
    parser.add_argument("--data", type=Path, default=None, help="prepared dataset (default: the latest)")
    args = parser.parse_args()

    from mammacls.data.prepared import load_prepared
    from mammacls.inference.model_files import folder_ref
    from mammacls.store import atomic_write_json
    from mammacls.training.batches import load_rows

    ref = folder_ref(args.model, args.model.name, "file")
    path = args.model / ref.card.sidecars["training_data"]
    training_data = json.loads(path.read_text(encoding="utf-8"))
    prints = training_data["train_val_fingerprints"]
    dataset = load_prepared(args.data)
    by_sha = {}
    for row in dataset.rows:
        by_sha.setdefault(row["sha256"], row)
    missing = [sha for sha in prints["sha256"] if sha not in by_sha]
    if missing:
        raise SystemExit(f"{len(missing)} of the model's images are not in {dataset.root}")
    fresh: dict[str, list] = {"sha256": [], "phash": []}
    load_rows(dataset, [by_sha[sha] for sha in prints["sha256"]], ref.card.img_size, fresh)
    if fresh["phash"] != prints["phash"]:
        raise SystemExit("the perceptual hashes differ from the recorded ones: not the same images")
    prints["thumb"], prints["name"] = fresh["thumb"], fresh["name"]
    atomic_write_json(path, training_data)
    print(f"{path}: thumbnails and names for {len(prints['sha256'])} images")


if __name__ == "__main__":
    main()
