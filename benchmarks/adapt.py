"""Adapting a model to a new scanner: how many of its patients must be labelled?

    python benchmarks/adapt.py --out benchmarks/results/adapt.json --plot benchmarks/results/adapt.png

1. A base model that has never seen BUS-BRA: MobileNetV2 from ImageNet (IMAGENET1K_V1, the file the
   README says how to get offline), mask-guided, ``scanner`` augmentation, trained on BUSI alone on
   this machine with the fast CPU path (``--base NAME`` reuses one).
2. BUS-BRA (GE scanners, Brazil) plays the hospital. ``prepare BUSI BUS-BRA`` splits each source on
   its own by patient, so BUSI's splits are the base model's and BUS-BRA's test split (225 images of
   patients no model here sees) is the same for every point of the curve.
3. For each number of adaptation patients (drawn at random from BUS-BRA's train split, whole duplicate
   groups; plus a proportional share of its validation patients for selection and calibration), the
   base is fine-tuned with ``train --init BASE`` on them with BUSI's train split mixed in (BUSI's
   validation split too), exactly as the README's adaptation recipe does.
4. Every model is scored on BUS-BRA's test split (malignant ROC-AUC with a 95 % bootstrap interval,
   sensitivity at the model's own 90 %-specificity threshold, lesions called normal, share accepted by
   the refusal gate) and on BUSI's (accuracy: does the model forget?).

``--lrs`` also runs the all-patients point at other learning rates (the choice of train's default
for ``--init``). The test splits are read only to score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
BUSI, BUSBRA = "Dataset_BUSI_with_GT", "BUS-BRA"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def prepare(sources: list[Path]) -> Path:
    from mammacls.data.prepare import prepare_dataset

    return Path(prepare_dataset(sources if len(sources) > 1 else sources[0])["prepared_dir"])


def train_base(busi_dir: Path, name: str, epochs: int) -> str:
    from mammacls.training import TrainConfig, augmentation_preset, train_model

    config = TrainConfig(arch="mobilenet_v2", pretrained=True, imagenet="IMAGENET1K_V1", epochs=epochs,
                         img_size=224, mask_guided=True, augmentation=augmentation_preset("scanner"),
                         label_smoothing=0.05, patience=epochs)
    started = time.perf_counter()
    train_model(config, data_dir=busi_dir, name=name)
    log(f"base {name}: {time.perf_counter() - started:.0f} s")
    return name


def draw_groups(rows: list[dict], patients: int | None, seed: int) -> list[dict]:
    """Rows of ``patients`` patients drawn at random (whole duplicate groups); None: all rows."""
    if patients is None:
        return rows
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group_id"], []).append(row)
    order = np.random.default_rng(seed).permutation(sorted(groups))
    chosen, seen = [], set()
    for group in order:
        if len(seen) >= patients:
            break
        chosen += groups[group]
        seen |= {row["patient"] or row["path"] for row in groups[group]}
    return chosen


def adaptation_split(dataset, patients: int | None, seed: int) -> dict[str, list[str]]:
    """BUSI's train/val splits plus ``patients`` BUS-BRA train patients and a proportional share of
    BUS-BRA's validation patients (15/70 of them, at least 3)."""
    by_source = {(row["source"], row["split"]): [] for row in dataset.rows}
    for row in dataset.rows:
        by_source[(row["source"], row["split"])].append(row)
    val_patients = None if patients is None else max(3, round(patients * 15 / 70))
    train = by_source[(BUSI, "train")] + draw_groups(by_source[(BUSBRA, "train")], patients, seed)
    val = by_source[(BUSI, "val")] + draw_groups(by_source[(BUSBRA, "val")], val_patients, seed + 1)
    return {"train": [row["path"] for row in train], "val": [row["path"] for row in val]}


def adapt(base: str, dataset_dir: Path, split: dict, name: str, epochs: int, lr: float | None) -> tuple[str, float]:
    from mammacls.store import models_dir
    from mammacls.training import TrainConfig, augmentation_preset, train_model

    if (models_dir() / name / "metadata.json").is_file():  # a rerun keeps what an earlier one trained
        from mammacls.inference.model_files import resolve_model

        history = resolve_model(name).sidecar("history") or []
        return name, float(sum(h["seconds"] for h in history))
    config = TrainConfig(init=base, epochs=epochs, lr=lr, augmentation=augmentation_preset("scanner"),
                         label_smoothing=0.05, patience=epochs)
    started = time.perf_counter()
    train_model(config, data_dir=dataset_dir, name=name, split_rows=split)
    return name, time.perf_counter() - started


def test_sets(dataset_dir: Path):
    """BUS-BRA's and BUSI's test splits as two evaluation sets."""
    from dataclasses import replace

    from mammacls.evaluation.evaluate import load_eval_set

    full = load_eval_set(dataset_dir)
    sets = {}
    for source in (BUSBRA, BUSI):
        keep = [k for k, s in enumerate(full.sources) if s == source]
        sets[source] = replace(full, description=f"{source} test split", paths=[full.paths[k] for k in keep],
                               labels=full.labels[keep], images=[full.images[k] for k in keep],
                               sha256=[full.sha256[k] for k in keep], sources=[source] * len(keep),
                               _resized={}, _phashes=None)
    return sets


def score(name: str, sets) -> dict:
    from mammacls.evaluation.evaluate import evaluate_models
    from mammacls.inference.model_files import resolve_model

    ref = resolve_model(name)
    busbra = evaluate_models([ref], sets[BUSBRA], resamples=1000)[0]
    busi = evaluate_models([ref], sets[BUSI], resamples=1000)[0]
    figures = busbra.metrics.sources[BUSBRA]
    point, ci = figures.point, figures.ci95
    return {
        "busbra_malignant_auc": point.malignant_auc, "busbra_malignant_auc_ci95": ci.malignant_auc,
        "busbra_sensitivity_at_val_spec90": point.malignant_sensitivity_at_val_threshold,
        "busbra_specificity_at_val_spec90": point.malignant_specificity_at_val_threshold,
        "busbra_called_normal": figures.predicted_absent.get("normal"),
        "busbra_accepted": busbra.metrics.selective.coverage,
        "busi_accuracy": busi.metrics.accuracy, "busi_accuracy_ci95": busi.metrics.ci95.accuracy,
        "busi_macro_f1": busi.metrics.macro_f1, "busi_accepted": busi.metrics.selective.coverage,
    }


def curve(rows: list[dict]) -> list[dict]:
    """Per number of patients: the mean and spread of the draws' BUS-BRA AUC, and the mean interval."""
    points = {}
    for row in rows:
        if row["kind"] == "curve":
            points.setdefault(row.get("requested", row["patients"]), []).append(row)  # first runs: one draw
    summary = []
    for draws in points.values():
        aucs = [d["busbra_malignant_auc"] for d in draws]
        summary.append({"patients": int(np.mean([d["patients"] for d in draws])), "draws": len(draws),
                        "auc_mean": float(np.mean(aucs)), "auc_min": min(aucs), "auc_max": max(aucs),
                        "auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
                        "ci95_mean": [float(np.mean([d["busbra_malignant_auc_ci95"][i] for d in draws])) for i in (0, 1)],
                        "busi_accuracy_mean": float(np.mean([d["busi_accuracy"] for d in draws])),
                        "called_normal_mean": float(np.mean([d["busbra_called_normal"] for d in draws])),
                        "accepted_mean": float(np.mean([d["busbra_accepted"] for d in draws])),
                        "seconds_mean": float(np.mean([d["seconds"] for d in draws]))})
    return sorted(summary, key=lambda point: point["patients"])


def plot(rows: list[dict], base: dict, target: Path) -> None:
    from matplotlib.figure import Figure

    points = curve(rows)
    x = [p["patients"] for p in points]
    auc = [p["auc_mean"] for p in points]
    figure = Figure(figsize=(6, 3.8), dpi=120)
    axes = figure.subplots()
    axes.fill_between(x, [p["ci95_mean"][0] for p in points], [p["ci95_mean"][1] for p in points], alpha=0.15,
                      label="95 % bootstrap interval (test images), mean over draws")
    for row in rows:
        if row["kind"] == "curve":
            axes.plot(row["patients"], row["busbra_malignant_auc"], ".", color="grey", alpha=0.6)
    draws = max(p["draws"] for p in points)
    axes.plot(x, auc, marker="o", label="adapted (--init base, BUSI mixed in)"
              + (": mean of the patient draws" if draws > 1 else ", one patient draw"))
    axes.axhline(base["busbra_malignant_auc"], color="grey", linestyle="--", label="base (BUSI only), before")
    axes.set_xscale("log")
    axes.minorticks_off()  # the log axis's own minor labels (3×10¹ …) would crowd the patient counts
    axes.set_xticks(x, [str(v) for v in x])
    axes.set_xlabel("BUS-BRA patients used for adaptation")
    axes.set_ylabel("BUS-BRA test malignant ROC-AUC")
    axes.set_title("Adapting a BUSI-only MobileNetV2 to BUS-BRA (225 test images)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a BUSI-only model in the cache (default: train one)")
    parser.add_argument("--base-epochs", type=int, default=15)
    parser.add_argument("--patients", nargs="+", default=["25", "50", "100", "200", "all"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=None, help="fine-tuning rate (default: train's for --init)")
    parser.add_argument("--lrs", type=float, nargs="*", default=[], help="also the all-patients point at these")
    parser.add_argument("--seed", type=int, default=0, help="which patients are drawn")
    parser.add_argument("--draws", type=int, default=3, help="patient draws per point (one for all patients)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    busi_only = prepare([DATA / BUSI])
    both = prepare([DATA / BUSI, DATA / BUSBRA])
    from mammacls.data.prepared import load_prepared

    dataset = load_prepared(both)
    base = args.base or train_base(busi_only, f"adapt-base-{time.strftime('%Y%m%d-%H%M%S')}", args.base_epochs)
    sets = test_sets(both)
    rows = [{"kind": "base", "patients": 0, "name": base, **score(base, sets)}]
    log(f"base: {rows[0]}")
    runs = [("curve", None if p == "all" else int(p), args.lr, draw) for p in args.patients
            for draw in range(1 if p == "all" else args.draws)]
    runs += [("lr", None, lr, 0) for lr in args.lrs]
    for kind, patients, lr, draw in runs:
        split = adaptation_split(dataset, patients, args.seed + draw)
        label = "all" if patients is None else str(patients)
        name, seconds = adapt(base, both, split, f"{base}-{label}-d{draw}-lr{lr or 'default'}", args.epochs, lr)
        used = {r["patient"] for r in dataset.rows if r["path"] in set(split["train"]) and r["source"] == BUSBRA}
        from mammacls.inference.model_files import resolve_model

        card = resolve_model(name).card
        row = {"kind": kind, "requested": label, "draw": draw, "patients": len(used), "name": name,
               "lr": card.training.config["lr"],
               "train_images": len(split["train"]), "val_images": len(split["val"]),
               "busbra_train_images": sum(1 for r in dataset.rows if r["path"] in set(split["train"])
                                          and r["source"] == BUSBRA),
               "seconds": round(seconds, 1), **score(name, sets)}
        rows.append(row)
        log(f"{kind} {label}: {row}")
        if args.out:  # after every point: a long run keeps what it measured
            args.out.write_text(json.dumps({"epochs": args.epochs, "rows": rows, "curve": curve(rows)}, indent=2)
                                + "\n", encoding="utf-8")
    print(f"{'run':<8} {'patients':>8} {'lr':>8} {'BUS-BRA AUC [95% CI]':>24} {'sens@spec90':>11} {'normal':>7} "
          f"{'accepted':>8} {'BUSI acc':>8} {'seconds':>8}")
    for r in rows:
        ci = r["busbra_malignant_auc_ci95"] or (float("nan"), float("nan"))
        print(f"{r['kind']:<8} {r['patients']:>8} {r.get('lr', 0) or 0:>8.0e} "
              f"{r['busbra_malignant_auc']:>8.3f} [{ci[0]:.3f}-{ci[1]:.3f}]   "
              f"{r['busbra_sensitivity_at_val_spec90'] or float('nan'):>11.3f} {r['busbra_called_normal']:>7.1%} "
              f"{r['busbra_accepted']:>8.1%} {r['busi_accuracy']:>8.3f} {r.get('seconds', 0):>8.0f}")
    print(f"{'patients':>8} {'draws':>5} {'AUC mean':>8} {'min-max':>13} {'BUSI acc':>8} {'called normal':>13}")
    for point in curve(rows):
        print(f"{point['patients']:>8} {point['draws']:>5} {point['auc_mean']:>8.3f} "
              f"{point['auc_min']:.3f}-{point['auc_max']:.3f} {point['busi_accuracy_mean']:>8.3f} "
              f"{point['called_normal_mean']:>13.1%}")
    if args.plot:
        plot(rows, rows[0], args.plot)


if __name__ == "__main__":
    main()
