"""Warm starts from the shipped members, judged out of fold on the CPU (issue "Default model 3").

    python benchmarks/warm_start_search.py --out benchmarks/results/warm_start.json
    python benchmarks/warm_start_search.py --out benchmarks/results/warm_start.json --assemble per-source --seed 0

The shipped default is the five fold models of the committed recipe search
(``benchmarks/results/recipe_search_2026-11-27_30ep.json``): member k trained on every fold of the
train split but fold k. Here member k continues with ``mammacls train --init`` on those same four
folds for ``--epochs`` more epochs (``scanner`` augmentation, label smoothing 0.05, as it was
trained), selected on the prepared validation split (which no member trained on), and is scored on
its own held-out fold k: every train image is predicted once by a model that never saw it. Variants:

  shipped      the members as they are (their CPU logits on their held-out folds: the baseline)
  pooled       + epochs with the shipped loss (class weights from the pooled counts): the control
  per-source   + epochs with class weights from each source's own counts (BUS-BRA has no normals,
               so pooled weights make BUSI's normals look rarer than they are)

``--seeds`` repeats each variant (augmentation and batch order) to give the seed spread. The test
split is never read. ``--assemble VARIANT --seed S`` builds the five fine-tuned fold models of one
variant into a shipped-style ensemble (calibrated and gated on validation, ONNX), in ``--target``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from assemble_default import check_same_data, member_hashes  # noqa: E402
from recipe_search import source_scores  # noqa: E402

SEARCH = HERE / "results" / "recipe_search_2026-11-27_30ep.json"
VARIANTS = ("pooled", "per-source")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def search_rows(results: dict, dataset) -> list[dict]:
    """The prepared train/val rows in the search's index order (checked by pixel hash)."""
    rows = [row for row in dataset.rows if row["split"] in ("train", "val")]
    if [row["sha256"] for row in rows] != [entry["sha256"] for entry in results["index"]]:
        raise SystemExit("the prepared dataset's train/val rows are not in the search's order")
    return rows


def member_models(shipped_ref) -> list[str]:
    """Each shipped member as a single-network model in the cache (``ws-member-K``), to start from."""
    from mammacls.inference.card import Refusal, WeightsInfo
    from mammacls.nets.networks import members_of
    from mammacls.nets.weights import load_network, save_model
    from mammacls.store import models_dir

    names = []
    ensemble = load_network(shipped_ref, "cpu")
    for k, member in enumerate(members_of(ensemble)):
        name = f"ws-member-{k}"
        target = models_dir() / name
        if not (target / "metadata.json").is_file():
            card = shipped_ref.card.replace(name=name, onnx=None, sidecars={}, calibration=None, refusal=Refusal(),
                                            weights=WeightsInfo(members=1, lesion_decoder=True))
            save_model(member, card, target, sidecars={"training_data": shipped_ref.sidecar("training_data")})
        names.append(name)
    return names


def fold_logits(model: str, dataset, rows: list[dict]) -> np.ndarray:
    from mammacls.inference.model_files import resolve_model
    from mammacls.nets.networks import predict_logits
    from mammacls.nets.weights import load_network
    from mammacls.training.batches import load_rows

    ref = resolve_model(model)
    images, _ = load_rows(dataset, rows, ref.card.img_size, {"sha256": [], "phash": []})
    return predict_logits(load_network(ref, "cpu"), images, "cpu", batch_size=64)


def check_member_folds(results: dict, members: list[str], dataset, rows, folds) -> None:
    """Member k is fold k's model: its CPU logits on fold k match the search's out-of-fold logits."""
    by_fold = {run["fold"]: run for run in results["runs"] if run["recipe"] == "scanner-mask" and run["repeat"] == 0}
    for k, name in enumerate(members):
        held = [rows[i] for i in by_fold[k]["held_idx"]]
        gaps = np.abs(fold_logits(name, dataset, held) - np.array(by_fold[k]["held_logits"]))
        # fp16 GPU vs fp32 CPU: hundredths on average, a few tenths at worst; another member: whole units
        if gaps.mean() > 0.1 or gaps.max() > 1.0:
            raise SystemExit(f"member {k} does not reproduce fold {k}'s search logits "
                             f"(mean gap {gaps.mean():.2f}, max {gaps.max():.2f})")
        log(f"member {k} = fold {k} (logit gap to the GPU search: mean {gaps.mean():.3f}, max {gaps.max():.3f})")


def fine_tune(member: str, variant: str, seed: int, fold: int, rows, folds, epochs: int, lr: float | None) -> str:
    from mammacls.store import models_dir
    from mammacls.training import TrainConfig, augmentation_preset, train_model

    name = f"ws-{variant}-s{seed}-fold{fold}"
    if (models_dir() / name / "metadata.json").is_file():
        return name  # a rerun keeps what an earlier one trained
    split = {"train": [r["path"] for r, f in zip(rows, folds) if f >= 0 and f != fold],
             "val": [r["path"] for r, f in zip(rows, folds) if f == -1]}
    config = TrainConfig(init=member, epochs=epochs, lr=lr, seed=1000 + 100 * seed + fold, class_weights=variant,
                         augmentation=augmentation_preset("scanner"), label_smoothing=0.05, patience=epochs)
    started = time.perf_counter()
    train_model(config, name=name, split_rows=split, export=False)
    log(f"{name}: {time.perf_counter() - started:.0f} s")
    return name


def scores(logits: np.ndarray, rows: list[dict]) -> dict:
    from mammacls import CLASSES
    from mammacls.inference.probabilities import softmax

    labels = np.array([CLASSES.index(r["label"]) for r in rows])
    sources = np.array([r["source"] for r in rows])
    return source_scores(softmax(logits), labels, sources)


def assemble(variant: str, seed: int, results: dict, dataset, folds, target: Path) -> None:
    import shutil
    import tempfile

    from safetensors.torch import load_file

    from mammacls.inference.card import TrainingSummary
    from mammacls.inference.model_files import MODEL_FILE, ModelRef, resolve_model
    from mammacls.nets.export import export_onnx
    from mammacls.nets.weights import publish_model
    from mammacls.training.ensemble import assemble_ensemble

    names = [f"ws-{variant}-s{seed}-fold{k}" for k in range(5)]
    refs = [resolve_model(name) for name in names]
    states = [load_file(str(ref.weights)) for ref in refs]
    trained_on = [member_hashes(results["index"], folds, k) for k in range(5)]
    shipped = resolve_model("default").card
    training = TrainingSummary(
        config={**shipped.training.config, "warm_start": refs[0].card.training.config},
        selection=("members: the five fold models of the shipped default, each fine-tuned on its own four folds "
                   f"({variant} class weights), epoch chosen on the validation split; judged out of fold by "
                   "benchmarks/warm_start_search.py; validation split: selection, calibration and refusal gate; "
                   "test split never used"),
        ensemble={"members_are": "the 5 cross-validation fold models, warm-started from mammacls-default-2"},
        notes={"warm_start_search": str(SEARCH.name), "variant": variant, "seed": seed})
    with tempfile.TemporaryDirectory(prefix="mammacls-assemble-") as scratch:
        built = Path(scratch) / "mammacls-default-3"
        card = assemble_ensemble(states, arch="mobilenet_v2", img_size=224, dataset=dataset, name="mammacls-default-3",
                                 target=built, training=training, trained_on=trained_on, reporter=log,
                                 provenance=shipped.provenance.__class__(
                                     pretrained=shipped.provenance.pretrained, device="cpu",
                                     init={"model": "default", "card_name": shipped.name,
                                           "sha256": shipped.weights.sha256, "members": 5}))
        shutil.rmtree(target, ignore_errors=True)
        published = publish_model(ModelRef(card.name, built / MODEL_FILE, card, "cache"), target,
                                  name="mammacls-default-3")
    export_onnx(ModelRef("mammacls-default-3", target / MODEL_FILE, published, "file"))
    log(f"assembled {variant} seed {seed} into {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--assemble", choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=Path, default=Path("weights/default"))
    args = parser.parse_args()

    from mammacls.data.prepared import load_prepared
    from mammacls.inference.model_files import resolve_model

    results = json.loads(SEARCH.read_text())
    dataset = load_prepared()
    check_same_data(results, dataset)
    rows, folds = search_rows(results, dataset), results["folds"]
    if args.assemble:
        return assemble(args.assemble, args.seed, results, dataset, folds, args.target)
    members = member_models(resolve_model("default"))
    check_member_folds(results, members, dataset, rows, folds)
    train_rows = [i for i, f in enumerate(folds) if f >= 0]
    document = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    document.update(epochs=args.epochs, search=SEARCH.name, index=[rows[i]["sha256"] for i in train_rows])

    def oof(model_of_fold) -> np.ndarray:
        logits = np.zeros((len(rows), 3))
        for k in range(5):
            held = [i for i, f in enumerate(folds) if f == k]
            logits[held] = fold_logits(model_of_fold(k), dataset, [rows[i] for i in held])
        return logits[train_rows]

    if "shipped" not in document["runs"]:
        document["runs"]["shipped"] = {"logits": oof(lambda k: members[k]).tolist()}
    for variant in args.variants:
        for seed in args.seeds:
            key = f"{variant}-s{seed}"
            if key in document["runs"]:
                continue
            names = [fine_tune(members[k], variant, seed, k, rows, folds, args.epochs, args.lr) for k in range(5)]
            document["runs"][key] = {"logits": oof(names.__getitem__).tolist()}
            args.out.write_text(json.dumps(document) + "\n", encoding="utf-8")
    picked = [rows[i] for i in train_rows]
    table = {key: scores(np.array(run["logits"]), picked) for key, run in document["runs"].items()}
    document["scores"] = table
    args.out.write_text(json.dumps(document) + "\n", encoding="utf-8")
    keys = ("busi_accuracy", "busi_macro_f1", "busi_macro_auc", "busi_predicted_normal", "busbra_malignant_auc",
            "busbra_called_normal")
    print(f"{'run':<16}" + "".join(f"{k:>22}" for k in keys))
    for key, row in table.items():
        print(f"{key:<16}" + "".join(f"{row[k]:>22.3f}" for k in keys))


if __name__ == "__main__":
    main()
