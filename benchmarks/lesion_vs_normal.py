"""Does the lesion decoder know better when the classifier calls a foreign lesion "normal"? (issue 22)

    python benchmarks/lesion_vs_normal.py --bundle B --run RUN [--json OUT]

On a scanner its members never saw, most of the sure and wrong answers are lesions called normal
(``wrong_and_sure.py``). Members trained with the lesion-mask loss also draw a lesion map. This
reads the BUSI-only members a recipe search saved (``recipe_search.py --recipes scanner-mask-busi
--keep scanner-mask-busi``: fp16 state dicts, ``members-scanner-mask-busi-*.safetensors`` in RUN) and
the bundle they were trained from, runs them on the
validation images of both sources, and asks whether "the map shows a lesion" contradicts a "normal"
answer often enough to act on. Everything is fitted on the members' own source's validation images
and applied to the held-out source's:

- a map shows a lesion when the members' mean peak lesion probability reaches the threshold that
  5 % of the own source's validation *normal* scans reach (so 95 % of true normals keep "normal");
- rule ``uncertain``: a "normal" answer whose map shows a lesion gets status uncertain;
- rule ``answer``: such an answer becomes the likelier of benign and malignant.

Figures per rule on the held-out scanner (sure and wrong, lesions called normal, accuracy) and, cross-
fitted on the own source's validation images (fitted on four of five grouped folds, applied to the
fifth), what it costs there: normal scans flagged or re-answered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mammacls import CLASSES
from recipe_search import BUSBRA, RECIPES, build_net, fold_assignment, load_bundle  # neighbours
from wrong_and_sure import COMBINATIONS, HELD_OUT, SURE, Combiner, scored

NORMAL = CLASSES.index("normal")
NORMALS_KEPT = 0.95  # share of the own source's normal validation scans whose "normal" stays as it is
RULES = ("as trained", "uncertain", "answer")


def member_outputs(bundle: Path, run: Path, recipe: str) -> dict:
    """Every member's logits and lesion-map peak on the bundle's validation images."""
    import torch
    from safetensors.torch import load_file

    from mammacls.nets.networks import predict_lesion_maps

    index, images, _ = load_bundle(bundle)
    val = np.where(fold_assignment(index) == -1)[0]
    tensors = {}
    for path in sorted(run.glob(f"members-{recipe}-*.safetensors")):
        tensors.update(load_file(str(path)))
    if not tensors:
        raise SystemExit(f"no members-{recipe}-*.safetensors in {run}: run recipe_search.py --keep {recipe}")
    logits, peaks = [], []
    for k in sorted({int(key.split(".", 1)[0][len("member"):]) for key in tensors}):
        net = build_net(RECIPES[recipe], bundle / "mobilenet_v2_imagenet1k_v1.fp16.safetensors")
        net.load_state_dict({key.split(".", 1)[1]: value.float() for key, value in tensors.items()
                             if key.startswith(f"member{k}.")})
        with torch.inference_mode():
            member_logits, maps, _ = predict_lesion_maps(net, "mobilenet_v2", images[val])
        logits.append(member_logits)
        peaks.append(maps.reshape(len(val), -1).max(axis=1))
    return {"logits": np.stack(logits), "peak": np.mean(peaks, axis=0),
            "labels": np.array([CLASSES.index(index[i]["label"]) for i in val]),
            "sources": np.array([index[i]["source"] for i in val]), "groups": np.array([index[i]["group"] for i in val])}


def fit(logits: np.ndarray, peak: np.ndarray, labels: np.ndarray) -> dict:
    combiner = Combiner(COMBINATIONS[0])
    fitted = combiner.fit(logits, labels)
    normals = peak[labels == NORMAL]
    fitted["lesion_peak"] = float(np.quantile(normals, NORMALS_KEPT)) if len(normals) else float("inf")
    return fitted


def apply(logits: np.ndarray, peak: np.ndarray, fitted: dict, rule: str) -> tuple[np.ndarray, np.ndarray]:
    probabilities, ok = Combiner(COMBINATIONS[0]).apply(logits, fitted)
    contradicted = (probabilities.argmax(axis=1) == NORMAL) & (peak >= fitted["lesion_peak"])
    if rule == "uncertain":
        ok = ok & ~contradicted
    elif rule == "answer":  # the likelier lesion class takes the normal class's probability
        probabilities = probabilities.copy()
        lesion_class = probabilities[contradicted][:, :NORMAL].argmax(axis=1)
        probabilities[np.where(contradicted)[0], lesion_class] += probabilities[contradicted, NORMAL]
        probabilities[contradicted, NORMAL] = 0.0
    return probabilities, ok


def separation(logits: np.ndarray, peak: np.ndarray, labels: np.ndarray, own: np.ndarray, foreign: np.ndarray,
               temperature: float) -> dict:
    """ROC-AUC of lesion against normal scan, by the map's peak and by the classifier's own 1 - p(normal):
    among the own source's validation images, and the held-out source's lesions against the own source's
    normals (the map can only help where it separates better than the classifier already does)."""
    from sklearn.metrics import roc_auc_score

    from mammacls.inference.probabilities import softmax

    not_normal = 1 - softmax(logits.mean(axis=0), temperature)[:, NORMAL]
    normals = own[labels[own] == NORMAL]
    sets = {"own": own, "foreign_lesions_against_own_normals": np.r_[foreign, normals]}
    return {name: {"map_peak": float(roc_auc_score(labels[idx] != NORMAL, peak[idx])),
                   "classifier": float(roc_auc_score(labels[idx] != NORMAL, not_normal[idx]))}
            for name, idx in sets.items()}


def evaluate_rules(outputs: dict, held_out: str) -> dict:
    from sklearn.model_selection import StratifiedGroupKFold

    trained_on, _ = HELD_OUT[held_out]
    logits, peak, labels, sources = outputs["logits"], outputs["peak"], outputs["labels"], outputs["sources"]
    own = np.where(sources == trained_on)[0]
    foreign = np.where((sources == held_out) & np.isin(labels, labels[own]))[0]
    fitted = fit(logits[:, own], peak[own], labels[own])
    strata = [f"{y}" for y in labels[own]]
    splits = list(StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0).split(own, strata, outputs["groups"][own]))
    out = {"lesion_peak": fitted["lesion_peak"], "temperature": fitted["temperature"], "floor": fitted["floor"],
           "foreign_lesion_peak_median": float(np.median(peak[foreign])),
           "own_normal_peak_median": float(np.median(peak[own][labels[own] == NORMAL])),
           "separation_auc": separation(logits, peak, labels, own, foreign, fitted["temperature"])}
    for rule in RULES:
        probabilities, ok = apply(logits[:, foreign], peak[foreign], fitted, rule)
        held = scored(probabilities, ok, labels[foreign])
        own_p, own_ok = np.zeros((len(own), len(CLASSES))), np.zeros(len(own), dtype=bool)
        for fit_on, apply_to in splits:
            part = fit(logits[:, own[fit_on]], peak[own[fit_on]], labels[own[fit_on]])
            own_p[apply_to], own_ok[apply_to] = apply(logits[:, own[apply_to]], peak[own[apply_to]], part, rule)
        normals = labels[own] == NORMAL
        out[rule] = {"held_out": held, "own_source": scored(own_p, own_ok, labels[own]),
                     "own_normals_still_normal_and_ok": float(((own_p.argmax(axis=1) == NORMAL) & own_ok)[normals].mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="a recipe_search.py --out folder with the kept members")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # only BUSI has normal scans: the direction where a lesion can be called normal is BUS-BRA held out
    held_out, (_, recipe) = BUSBRA, HELD_OUT[BUSBRA]
    figures = evaluate_rules(member_outputs(args.bundle, args.run, recipe), held_out)
    print(f"{held_out} held out ({recipe}); a lesion is seen at mean peak >= {figures['lesion_peak']:.3f} "
          f"(median: own normals {figures['own_normal_peak_median']:.3f}, foreign lesions "
          f"{figures['foreign_lesion_peak_median']:.3f}); sure: p >= {SURE}")
    for name, auc in figures["separation_auc"].items():
        print(f"  lesion against normal, {name}: ROC-AUC of the map's peak {auc['map_peak']:.3f}, "
              f"of the classifier's 1 - p(normal) {auc['classifier']:.3f}")
    keys = ("accuracy", "errors", "sure_wrong", "sure_wrong_per_100", "lesions_called_normal", "correct_not_ok", "ece")
    for rule in RULES:
        row = figures[rule]
        print(f"  {rule:11s} held out: " + " ".join(f"{k}={row['held_out'][k]:.3g}" for k in keys)
              + f" | own source: accuracy={row['own_source']['accuracy']:.3g} sure_wrong={row['own_source']['sure_wrong']}"
              f" normals still normal and ok={row['own_normals_still_normal_and_ok']:.3g}")
    if args.json:
        args.json.write_text(json.dumps({"recipe": recipe, "held_out": held_out, **figures}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
