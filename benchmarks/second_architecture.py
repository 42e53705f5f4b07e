"""Does a second architecture make a more diverse ensemble than a second seed? (issue 22, candidate d)

    python benchmarks/second_architecture.py [--results FILE] [--json OUT]

No training: from a recipe search that holds, on the same five grouped folds, one recipe with
MobileNetV2 twice (two seeds, ``--other-seed``) and with EfficientNet-Lite0 once (the committed
96 px CPU search, ``benchmarks/results/recipe_search_2026-12-02_cpu96.json``). Every pair is fold
model k of one run with fold model k of another, their logits averaged as the shipped ensemble
averages its members', scored on fold k, which neither saw: so each train image is predicted by a
two-model ensemble that never trained on it. Also each pair's disagreement (the share of images the
two name differently) and, on the validation split, the five-member ensembles and the ten-member
ensembles made of two runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mammacls.inference.probabilities import softmax
from posthoc_levers import load_search, recipe_logits  # this script's neighbours
from recipe_search import FOLDS, source_scores

CPU_SEARCH = Path(__file__).resolve().parent / "results" / "recipe_search_2026-12-02_cpu96.json"
KEYS = ("busi_accuracy", "busi_macro_f1", "busi_macro_auc", "busi_predicted_normal", "busbra_malignant_auc")
# (class weights, MobileNetV2 recipe, Lite0 recipe)
FAMILIES = (("pooled", "scanner-mask", "lite0-scanner-mask"),
            ("per-source", "scanner-mask-per-source", "lite0-scanner-mask-per-source"))


def runs_of(results: dict, recipe: str, repeat: int) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """A run's out-of-fold logits over the index and its fold models' validation logits, or None
    unless all five folds are there."""
    oof, val, folds = recipe_logits(results, recipe, repeat)
    return (oof, val) if folds == list(range(FOLDS)) else None


def scores(logits: np.ndarray, rows: np.ndarray, results: dict) -> dict[str, float]:
    out = source_scores(softmax(logits[rows]), results["labels"][rows], results["sources"][rows])
    return {k: out[k] for k in KEYS}


def diversity_table(results: dict) -> dict[str, dict]:
    """Per class-weight family: single runs, pairs of runs (out of fold) and ensembles on validation."""
    held = np.array(results["folds"]) >= 0
    val_rows = np.array(results["folds"]) == -1
    table = {}
    for weights, mobilenet, lite0 in FAMILIES:
        runs = {"MobileNetV2, seed 1": runs_of(results, mobilenet, 0), "MobileNetV2, seed 2": runs_of(results, mobilenet, 1),
                "EfficientNet-Lite0": runs_of(results, lite0, 0)}
        runs = {name: run for name, run in runs.items() if run is not None}
        if len(runs) < 2:
            continue
        family = {"single": {}, "pairs": {}, "validation": {}}
        for name, (oof, val) in runs.items():
            family["single"][name] = scores(oof, held, results)
            full = np.full_like(oof, np.nan)
            full[val_rows] = np.mean(val, axis=0)
            family["validation"][f"{name} (5 members)"] = scores(full, val_rows, results)
        names = list(runs)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                (oof_a, val_a), (oof_b, val_b) = runs[first], runs[second]
                pair = scores((oof_a + oof_b) / 2, held, results)
                pair["disagreement"] = float((oof_a[held].argmax(1) != oof_b[held].argmax(1)).mean())
                family["pairs"][f"{first} + {second}"] = pair
                full = np.full_like(oof_a, np.nan)
                full[val_rows] = (np.mean(val_a, axis=0) + np.mean(val_b, axis=0)) / 2
                family["validation"][f"{first} + {second} (10 members)"] = scores(full, val_rows, results)
        table[weights] = family
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=CPU_SEARCH)
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    table = diversity_table(load_search(args.results))
    for weights, family in table.items():
        print(f"\n{weights} class weights")
        for part, rows in family.items():
            print(f"  {part}")
            for name, row in rows.items():
                figures = "  ".join(f"{key} {value:.3f}" for key, value in row.items())
                print(f"    {name:<58} {figures}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
