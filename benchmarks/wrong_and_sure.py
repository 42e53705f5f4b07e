"""Where the model is wrong on a scanner it never saw, how often is it sure? (issue "Default model 3")

    python benchmarks/wrong_and_sure.py [--busbra-held-out FILE] [--busi-held-out FILE] [--json OUT]

Leave one source out, with committed recipe searches' logits and no training here. Each direction
has members trained on one source only, so the other source's scanners are scanners they never saw:

- **BUS-BRA held out**: ``scanner-mask-busi`` (the shipped recipe on BUSI's folds only) in the 224 px,
  30-epoch GPU search the default came from;
- **BUSI held out**: ``scanner-mask-busbra`` (on BUS-BRA's folds only: no normal scan either, so BUSI
  is scored on its lesions) in the 96 px, 10-epoch CPU search, a proxy whose figures compare with
  each other, not with the 224 px ones.

Per direction, three views:

- **held-out scanner, ensemble**: the five members on the held-out source's validation images (each
  predicted by all five), calibrated and given their confidence floor on their own source's
  validation images alone, as a model trained there would ship;
- **held-out scanner, single models**: each fold model on the held-out source's train images of its
  held-out fold (every one of them, by the one model that held it out), its temperature and floor
  from its own source's validation logits;
- **in source**, for what a change costs where the model knows the scanner: the shipped recipe's five
  members of the same search on both sources' validation images, calibration cross-fitted (fitted on
  four of five grouped folds of the validation split, applied to the fifth).

A prediction is *sure and wrong* when it is an error whose status would be ``ok`` (top probability at
or above the confidence floor, ``training.refusal.choose_min_confidence``; for the ``unanimous`` rules
also every member naming the ensemble's class) with top probability >= 0.9. The feature-space gate is
not applied (the search kept logits, not features): a foreign scan it would reject counts here, so
these are upper bounds. Combinations of the members:

  mean logits, one temperature      what shipped until 2026-12-02: the members' logits averaged, then
                                    temperature scaling (the baseline of the intervals)
  normal answers' own temperature   what ships: the same, with a temperature of their own for images
                                    answered normal (``training.calibration.fit_class_temperatures``)
  + unanimous                       ... uncertain unless all members name the ensemble's class
  mean probabilities                one temperature for the members (fitted on their pooled logits),
                                    their probabilities averaged: a deep ensemble (Lakshminarayanan
                                    et al. 2017), where members that disagree flatten the answer
  + unanimous                       ... and uncertain unless all members agree
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mammacls import CLASSES
from mammacls.evaluation.metrics import calibration_metrics
from mammacls.inference.probabilities import calibrated_softmax, softmax
from mammacls.training.calibration import fit_class_temperatures, fit_temperature
from mammacls.training.refusal import choose_min_confidence
from posthoc_levers import DEFAULT_RESULTS, SHIPPED_RECIPE, load_search, recipe_logits  # this script's neighbour
from recipe_search import BUSBRA, BUSI

# held-out source: (the source its members were trained on, their recipe in the search)
HELD_OUT = {BUSBRA: (BUSI, "scanner-mask-busi"), BUSI: (BUSBRA, "scanner-mask-busbra")}
CPU_RESULTS = DEFAULT_RESULTS.parent / "recipe_search_2026-12-02_cpu96.json"  # the only BUS-BRA-only members
SURE = 0.9
NORMAL = CLASSES.index("normal")
COMBINATIONS = ("mean logits, one temperature (shipped before)", "mean logits, normal answers' own temperature (ships)",
                "mean logits + unanimous",
                "mean probabilities", "mean probabilities + unanimous")


class Combiner:
    """One way to turn the members' logits (M x N x 3) into probabilities and ok statuses, fitted on
    some images and applied to others."""

    def __init__(self, name: str):
        self.name = name
        self.averages_probabilities = name.startswith("mean probabilities")
        self.unanimous = name.endswith("unanimous")
        self.normal_own = "normal answers" in name

    def probabilities(self, member_logits: np.ndarray, temperature: float,
                      class_temperatures: tuple[float, ...] | None = None) -> np.ndarray:
        if self.averages_probabilities:
            return np.stack([softmax(z, temperature) for z in member_logits]).mean(axis=0)
        return calibrated_softmax(member_logits.mean(axis=0), temperature, class_temperatures)

    def fit(self, member_logits: np.ndarray, labels: np.ndarray) -> dict:
        if self.averages_probabilities:
            temperature = fit_temperature(np.concatenate(member_logits), np.tile(labels, len(member_logits)))
        else:
            temperature = fit_temperature(member_logits.mean(axis=0), labels)
        per_class = fit_class_temperatures(member_logits.mean(axis=0), labels, temperature) if self.normal_own else None
        floor = choose_min_confidence(self.probabilities(member_logits, temperature, per_class), labels)
        return {"temperature": temperature, "class_temperatures": per_class, "floor": floor}

    def apply(self, member_logits: np.ndarray, fitted: dict) -> tuple[np.ndarray, np.ndarray]:
        probabilities = self.probabilities(member_logits, fitted["temperature"], fitted.get("class_temperatures"))
        ok = probabilities.max(axis=1) >= fitted["floor"]
        if self.unanimous:
            ok &= (member_logits.argmax(axis=2) == probabilities.argmax(axis=1)).all(axis=0)
        return probabilities, ok


def sure_and_wrong(probabilities: np.ndarray, ok: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (probabilities.argmax(axis=1) != labels) & ok & (probabilities.max(axis=1) >= SURE)


def scored(probabilities: np.ndarray, ok: np.ndarray, labels: np.ndarray) -> dict:
    """The figures of one scored set: errors, how many of them sure and ok, the cost in correct answers
    turned uncertain, calibration, and (lesions) the share called normal."""
    predicted = probabilities.argmax(axis=1)
    wrong, right = predicted != labels, predicted == labels
    sure = sure_and_wrong(probabilities, ok, labels)
    lesions = labels != NORMAL
    return {"n": int(len(labels)), "accuracy": float(right.mean()), "errors": int(wrong.sum()),
            "sure_wrong": int(sure.sum()), "sure_wrong_share_of_errors": float(sure.sum() / max(1, wrong.sum())),
            "sure_wrong_per_100": float(100 * sure.mean()),
            "correct_not_ok": float((right & ~ok).sum() / max(1, right.sum())),
            "ece": float(calibration_metrics(labels, probabilities)["ece"]),
            "lesions_called_normal": float((predicted[lesions] == NORMAL).mean()) if lesions.any() else 0.0}


def paired_interval(first: np.ndarray, second: np.ndarray, draws: int = 2000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval (images resampled together) of ``second`` minus ``first``, per-image
    indicators (sure and wrong, correct), as a difference per 100 scans."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(first), (draws, len(first)))
    differences = 100 * (second[picks].mean(axis=1) - first[picks].mean(axis=1))
    return [float(v) for v in np.percentile(differences, [2.5, 97.5])]


def held_out_scanner_ensemble(results: dict, held_out: str) -> dict:
    """The members that never saw ``held_out`` on its validation images (of the classes they were
    trained on), calibrated and floored on their own source's validation images."""
    trained_on, recipe = HELD_OUT[held_out]
    _, val_logits, _ = recipe_logits(results, recipe)
    members = np.stack(val_logits)
    val = results["fold_of"] == -1
    labels, sources = results["labels"][val], results["sources"][val]
    fit_on = sources == trained_on
    scored_on = (sources == held_out) & np.isin(labels, labels[fit_on])
    rows, sure, correct = {}, {}, {}
    for name in COMBINATIONS:
        combiner = Combiner(name)
        fitted = combiner.fit(members[:, fit_on], labels[fit_on])
        probabilities, ok = combiner.apply(members[:, scored_on], fitted)
        rows[name] = {**scored(probabilities, ok, labels[scored_on]), **fitted}
        sure[name] = sure_and_wrong(probabilities, ok, labels[scored_on]).astype(float)
        correct[name] = (probabilities.argmax(axis=1) == labels[scored_on]).astype(float)
    ships = COMBINATIONS[0]
    for name in COMBINATIONS[1:]:
        rows[name]["sure_wrong_per_100_change_ci95"] = paired_interval(sure[ships], sure[name])
        rows[name]["accuracy_points_change_ci95"] = paired_interval(correct[ships], correct[name])
    return rows


def held_out_scanner_single_models(results: dict, held_out: str) -> dict:
    """Each fold model that never saw ``held_out`` on its train images it held out (of the classes it
    was trained on), calibrated and floored on its own source's validation logits."""
    trained_on, recipe = HELD_OUT[held_out]
    runs = sorted((r for r in results["runs"] if r["recipe"] == recipe and r["repeat"] == 0
                   and "error" not in r), key=lambda r: r["fold"])
    val = results["fold_of"] == -1
    own_val = results["sources"][val] == trained_on
    val_labels = results["labels"][val][own_val]
    probabilities, ok, labels = [], [], []
    for run in runs:
        held = np.asarray(run["held_idx"])
        keep = (results["sources"][held] == held_out) & np.isin(results["labels"][held], val_labels)
        combiner = Combiner(COMBINATIONS[0])  # one member: both averages are the same
        fitted = combiner.fit(np.asarray(run["val_logits"])[own_val][None], val_labels)
        p, o = combiner.apply(np.asarray(run["held_logits"])[keep][None], fitted)
        probabilities.append(p), ok.append(o), labels.append(results["labels"][held[keep]])
    return scored(np.concatenate(probabilities), np.concatenate(ok), np.concatenate(labels))


def in_source(results: dict, folds: int = 5) -> dict:
    """The shipped recipe's members on both sources' validation images, calibration cross-fitted."""
    from sklearn.model_selection import StratifiedGroupKFold

    _, val_logits, _ = recipe_logits(results, SHIPPED_RECIPE)
    members = np.stack(val_logits)
    val = results["fold_of"] == -1
    labels, sources, groups = results["labels"][val], results["sources"][val], results["groups"][val]
    strata = [f"{s}:{y}" for s, y in zip(sources, labels)]
    splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0).split(labels, strata, groups))
    rows = {}
    for name in COMBINATIONS:
        combiner = Combiner(name)
        probabilities, ok = np.zeros((len(labels), len(CLASSES))), np.zeros(len(labels), dtype=bool)
        for fit_on, apply_to in splits:
            probabilities[apply_to], ok[apply_to] = combiner.apply(
                members[:, apply_to], combiner.fit(members[:, fit_on], labels[fit_on]))
        rows[name] = {source: scored(probabilities[sources == source], ok[sources == source], labels[sources == source])
                      for source in (BUSI, BUSBRA)}
    return rows


def report(results: dict, held_out: str) -> dict:
    trained_on, recipe = HELD_OUT[held_out]
    return {"held_out_scanner": {"source": held_out, "trained_on": trained_on, "recipe": recipe,
                                 "img_size": results["hyper"]["img_size"], "epochs": results["hyper"]["epochs"],
                                 "ensemble_on_val": held_out_scanner_ensemble(results, held_out),
                                 "single_models_on_train": held_out_scanner_single_models(results, held_out)},
            "in_source": {"recipe": SHIPPED_RECIPE, "calibration": "cross-fitted, 5 grouped folds of val",
                          "by_combination": in_source(results)},
            "sure": SURE, "gate": "confidence floor (and unanimity where named); feature gate not applied"}


def card_rows(figures: dict) -> list[str]:
    """The model card's table rows ("Sure and wrong on a scanner the members never saw")."""
    def sure(row: dict) -> str:
        return f"{row['sure_wrong']} / {row['errors']} ({row['sure_wrong_share_of_errors']:.0%})"

    held = figures["held_out_scanner"]["ensemble_on_val"]
    rows = []
    for name in COMBINATIONS:
        foreign, known = held[name], figures["in_source"]["by_combination"][name]
        busi, bra = known[BUSI], known[BUSBRA]
        cells = [name, f"{foreign['accuracy']:.3f}", sure(foreign), f"{foreign['sure_wrong_per_100']:.1f}",
                 f"{foreign['correct_not_ok']:.0%}", f"{foreign['ece']:.3f}", sure(busi), f"{busi['ece']:.3f}",
                 sure(bra), f"{bra['correct_not_ok']:.0%}", f"{bra['ece']:.3f}"]
        rows.append("| " + " | ".join(cell.replace("%", " %") for cell in cells) + " |")  # the card's "21 %"
    return rows


def print_report(figures: dict) -> None:
    held = figures["held_out_scanner"]
    print(f"{held['source']} held out (members trained on {held['trained_on']} only, {held['img_size']} px, "
          f"{held['epochs']} epochs), ensemble on its {held['ensemble_on_val'][COMBINATIONS[0]]['n']} validation "
          f"images of the classes they know; sure and wrong: an ok error at p >= {SURE}")
    keys = ("accuracy", "errors", "sure_wrong", "sure_wrong_share_of_errors", "sure_wrong_per_100", "correct_not_ok",
            "ece", "lesions_called_normal")
    for name, row in held["ensemble_on_val"].items():
        print(f"  {name:38s} " + " ".join(f"{k}={row[k]:.3g}" for k in keys)
              + (f" change vs ships (95 %): sure and wrong per 100 {row['sure_wrong_per_100_change_ci95']}, accuracy "
                 f"points {row['accuracy_points_change_ci95']}" if "accuracy_points_change_ci95" in row else ""))
    single = held["single_models_on_train"]
    print(f"  single models, {single['n']} train images: " + " ".join(f"{k}={single[k]:.3g}" for k in keys))
    print("in source (shipped recipe, val, calibration cross-fitted)")
    for name, by_source in figures["in_source"]["by_combination"].items():
        for source, row in by_source.items():
            print(f"  {name:38s} {source:22s} " + " ".join(f"{k}={row[k]:.3g}" for k in keys))
    print("\n".join(card_rows(figures)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busbra-held-out", type=Path, default=DEFAULT_RESULTS,
                        help=f"a search with the {HELD_OUT[BUSBRA][1]} recipe (default: the 224 px GPU search)")
    parser.add_argument("--busi-held-out", type=Path, default=CPU_RESULTS,
                        help=f"a search with the {HELD_OUT[BUSI][1]} recipe (default: the 96 px CPU search)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    out = {}
    for held_out, path in ((BUSBRA, args.busbra_held_out), (BUSI, args.busi_held_out)):
        results = load_search(path)
        recipe = HELD_OUT[held_out][1]
        if not any(run["recipe"] == recipe for run in results["runs"]):
            raise SystemExit(f"{path} has no {recipe} runs: run recipe_search.py --recipes {recipe} first")
        out[held_out] = {"results": path.name, **report(results, held_out)}
        print_report(out[held_out])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
