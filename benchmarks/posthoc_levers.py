"""What the shipped default's recipe search says, and what post-hoc changes would do, on the CPU.

    python benchmarks/posthoc_levers.py [--results FILE] [--members] [--json OUT]

No training and no test image: everything comes from a recipe search's ``results.json``
(``benchmarks/recipe_search.py``; the run the default was built from is committed as
``benchmarks/results/recipe_search_2026-11-27_30ep.json``): every fold model's logits on the
train images it did not see (out-of-fold), every member's logits on the validation split, and the
image index by pixel hash.

1. **Recipe table**: each recipe's out-of-fold figures recomputed from those logits (the model
   card's table, checkable without a GPU).
2. **Calibration maps** for the shipped recipe, each scored by grouped cross-validation (5 folds x
   5 repeats; grouped by duplicate group and patient, stratified by source and class) on two sets:
   the out-of-fold logits (1,581 images, single members) and the ensemble's validation logits (339,
   the members' mean): none; one temperature fitted on both sources (what ships); one temperature
   with the sources weighted equally; temperature plus class biases (bias-corrected temperature
   scaling, Alexandari et al. 2020) pooled, sources weighted equally, or BUSI only.
3. ``--members`` (needs the search's data prepared, ``mammacls prepare``, and the default model;
   about 6 minutes on 2 cores): the default's members run on the CPU, out of fold (member k on
   fold k's images, found by pixel hash) and as the ensemble on the validation split, for
   horizontal-flip test-time augmentation and for a read-out that adds the lesion decoder's map
   (peak, area, top-500 mean) to the logits (a logistic regression, grouped cross-validation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mammacls import CLASSES
from mammacls.errors import MammaclsError
from mammacls.evaluation.metrics import calibration_metrics
from mammacls.inference.probabilities import softmax
from recipe_search import BUSBRA, BUSI, source_scores, summarise  # this script's neighbour

SHIPPED_RECIPE = "scanner-mask"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "recipe_search_2026-11-27_30ep.json"
NORMAL = CLASSES.index("normal")
# (name, fit biases?, how the two sources are weighted in the NLL); None: the raw softmax
# biases: False, True, or the classes whose answers get a temperature of their own (mammacls's own fit,
# ``training.calibration.fit_class_temperatures``; the others keep the pooled temperature)
OWN_NORMAL, OWN_EVERY = (CLASSES.index("normal"),), tuple(range(len(CLASSES)))
CALIBRATION_MAPS = (("none", None, None), ("temperature, pooled", False, "pooled"),
                    ("temperature, sources balanced", False, "balanced"), ("temperature + biases, pooled", True, "pooled"),
                    ("temperature + biases, sources balanced", True, "balanced"),
                    ("temperature + biases, BUSI only", True, "busi"),
                    ("temperature per predicted class", OWN_EVERY, "pooled"),
                    ("temperature of its own for normal answers (ships)", OWN_NORMAL, "pooled"))


def load_search(path: Path) -> dict:
    results = json.loads(Path(path).read_text())
    index = results["index"]
    results["labels"] = np.array([CLASSES.index(row["label"]) for row in index])
    results["sources"] = np.array([row["source"] for row in index])
    results["groups"] = np.array([row["group"] for row in index])
    results["fold_of"] = np.array(results["folds"])
    return results


def recipe_logits(results: dict, recipe: str, repeat: int = 0) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """Out-of-fold logits over the whole index (NaN outside cross-validation), each fold model's
    validation logits, and the folds in order."""
    runs = sorted((r for r in results["runs"] if r["recipe"] == recipe and r["repeat"] == repeat and "error" not in r),
                  key=lambda r: r["fold"])
    oof = np.full((len(results["index"]), len(CLASSES)), np.nan)
    for run in runs:
        oof[run["held_idx"]] = run["held_logits"]
    return oof, [np.asarray(r["val_logits"]) for r in runs], [r["fold"] for r in runs]


def figures(probabilities: np.ndarray, labels: np.ndarray, sources: np.ndarray) -> dict[str, float]:
    """The search's figures per source (``recipe_search.source_scores``) and, for judging
    calibration maps, BUSI's per-class recall, share called normal, ECE and NLL, and BUS-BRA's ECE."""
    out = source_scores(probabilities, labels, sources)
    predicted = probabilities.argmax(axis=1)
    busi, bra = sources == BUSI, sources == BUSBRA
    if busi.any():
        y, p = labels[busi], probabilities[busi]
        out.update({f"busi_recall_{c}": float((predicted[busi][y == k] == k).mean()) for k, c in enumerate(CLASSES)})
        out["busi_called_normal"] = float((predicted[busi] == NORMAL).mean())
        out["busi_ece"], out["busi_nll"] = (calibration_metrics(y, p)[k] for k in ("ece", "nll"))
    if bra.any():
        out["busbra_ece"] = calibration_metrics(labels[bra], probabilities[bra])["ece"]
    return out


def recipe_table(results: dict) -> dict[str, dict[str, float]]:
    """Each recipe's pooled out-of-fold figures, as the search summarises them."""
    return {recipe: entry["pooled"] for recipe, entry in
            summarise(results["runs"], results["labels"], results["sources"]).items()}


def source_weights(sources: np.ndarray, mode: str) -> np.ndarray:
    if mode == "pooled":
        return np.ones(len(sources))
    if mode == "busi":
        return (sources == BUSI).astype(np.float64)
    weights = np.ones(len(sources))
    for source in np.unique(sources):
        weights[sources == source] = 1.0 / (sources == source).sum()
    return weights


def fit_map(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, biases: bool) -> tuple[float, np.ndarray]:
    """Temperature (and class biases, normal's fixed at 0) minimising the weighted NLL of
    softmax(logits / T + b)."""
    from scipy.optimize import minimize

    def unpack(params):
        bias = np.zeros(len(CLASSES))
        if biases:
            bias[[k for k in range(len(CLASSES)) if k != NORMAL]] = params[1:]
        return float(np.exp(params[0])), bias

    def loss(params):
        temperature, bias = unpack(params)
        p = np.clip(softmax(logits / temperature + bias)[np.arange(len(labels)), labels], 1e-12, 1.0)
        return float(-(weights * np.log(p)).sum() / weights.sum())

    start = np.zeros(len(CLASSES) if biases else 1)
    return unpack(minimize(loss, start, method="L-BFGS-B", bounds=[(np.log(0.05), np.log(20.0))]
                           + [(-10.0, 10.0)] * (len(start) - 1)).x)


def fitted_map(logits: np.ndarray, labels: np.ndarray, sources: np.ndarray, biases, mode: str | None):
    """The map a CALIBRATION_MAPS entry fits on these logits, as (logits -> probabilities, what was fitted)."""
    if biases is None:
        return softmax, {}
    if isinstance(biases, tuple):
        from mammacls.inference.probabilities import calibrated_softmax
        from mammacls.training.calibration import fit_class_temperatures, fit_temperature

        temperature = fit_temperature(logits, labels)
        per_class = fit_class_temperatures(logits, labels, temperature, own=biases)
        return (lambda z: calibrated_softmax(z, temperature, per_class)), {
            "temperature": temperature, "class_temperatures": None if per_class is None else list(per_class)}
    temperature, bias = fit_map(logits, labels, source_weights(sources, mode), biases)
    return (lambda z: softmax(z / temperature + bias)), {"temperature": temperature, "bias": bias.tolist()}


def cross_validated_maps(logits: np.ndarray, labels: np.ndarray, sources: np.ndarray, groups: np.ndarray,
                         repeats: int = 5) -> dict[str, dict[str, list[float]]]:
    """Each calibration map fitted on 4/5 of the images and applied to the rest; the figures of
    the re-assembled predictions, per repeat."""
    from sklearn.model_selection import StratifiedGroupKFold

    strata = np.array([f"{s}:{c}" for s, c in zip(sources, labels)])
    scores: dict[str, dict[str, list[float]]] = {name: {} for name, *_ in CALIBRATION_MAPS}
    for repeat in range(repeats):
        predicted = {name: np.zeros_like(logits) for name, *_ in CALIBRATION_MAPS}
        for fit_idx, held in StratifiedGroupKFold(5, shuffle=True, random_state=repeat).split(logits, strata, groups):
            for name, biases, mode in CALIBRATION_MAPS:
                calibrate, _ = fitted_map(logits[fit_idx], labels[fit_idx], sources[fit_idx], biases, mode)
                predicted[name][held] = calibrate(logits[held])
        for name, probabilities in predicted.items():
            for key, value in figures(probabilities, labels, sources).items():
                scores[name].setdefault(key, []).append(value)
    return scores


def member_outputs(results: dict) -> dict[str, np.ndarray]:
    """Logits of each fold member on its held-out images (with its lesion map's peak, area and
    top-500 mean) and of every member on the validation images, as they are and flipped left-right
    (the default model's members, on the CPU)."""
    from mammacls.data.prepared import load_prepared
    from mammacls.inference.images import resize_square
    from mammacls.inference.model_files import resolve_model
    from mammacls.nets.networks import members_of, predict_lesion_maps, predict_logits
    from mammacls.nets.weights import load_network

    from assemble_default import check_same_data

    dataset = load_prepared()
    check_same_data(results, dataset)  # the search's train and val images, by pixel hash
    ref = resolve_model("default")
    members = members_of(load_network(ref, "cpu"))
    by_hash = {row["sha256"]: row for row in dataset.rows}
    size = ref.card.img_size
    images = np.stack([resize_square(dataset.load_image(by_hash[row["sha256"]]), size) for row in results["index"]])
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    out = {key: np.full((len(images), len(CLASSES)), np.nan) for key in ("oof", "oof_flipped", "oof_lesion")}
    fold_of = results["fold_of"]
    for k, member in enumerate(members):
        held = np.where(fold_of == k)[0]
        out["oof"][held], maps, _ = predict_lesion_maps(member, ref.card.arch, images[held])
        flat = maps.reshape(len(held), -1)
        out["oof_lesion"][held] = np.c_[flat.max(1), (flat > 0.5).mean(1), np.sort(flat, 1)[:, -500:].mean(1)]
        out["oof_flipped"][held] = predict_logits(member, mirrored[held])
    val = np.where(fold_of == -1)[0]
    out["val"] = np.mean([predict_logits(m, images[val]) for m in members], axis=0)
    out["val_flipped"] = np.mean([predict_logits(m, mirrored[val]) for m in members], axis=0)
    return out


def lesion_readout(logits: np.ndarray, lesion: np.ndarray, labels: np.ndarray, sources: np.ndarray,
                   groups: np.ndarray, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Grouped cross-validated logistic regression on the logits alone and on the logits plus the
    lesion map's statistics (their log-odds / log), against the plain argmax."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    def log_odds(p):
        p = np.clip(p, 1e-4, 1 - 1e-4)
        return np.log(p / (1 - p))

    inputs = {"logits (logistic regression)": logits,
              "logits + lesion map": np.c_[logits, log_odds(lesion[:, 0]), np.log(lesion[:, 1] + 1e-4),
                                           log_odds(lesion[:, 2])]}
    strata = np.array([f"{s}:{c}" for s, c in zip(sources, labels)])
    out = {"argmax of the logits": figures(softmax(logits), labels, sources)}
    for name, x in inputs.items():
        probabilities = np.zeros((len(labels), len(CLASSES)))
        for repeat in range(repeats):
            for fit_idx, held in StratifiedGroupKFold(5, shuffle=True, random_state=repeat).split(x, strata, groups):
                model = LogisticRegression(max_iter=2000).fit(x[fit_idx], labels[fit_idx])
                probabilities[held] += model.predict_proba(x[held]) / repeats
        out[name] = figures(probabilities, labels, sources)
    return out


def print_rows(title: str, rows: dict[str, dict[str, float | list[float]]], keys: tuple[str, ...]) -> None:
    print(f"\n{title}")
    print(f"{'':40s}" + "".join(f"{k:>22s}" for k in keys))
    for name, values in rows.items():
        cells = []
        for key in keys:
            value = values.get(key)
            if value is None:
                cells.append(f"{'-':>22s}")
            elif isinstance(value, list):
                cells.append(f"{np.mean(value):15.3f} ±{np.std(value):.3f}")
            else:
                cells.append(f"{value:22.3f}")
        print(f"{name:40s}" + "".join(cells))


def member_figures(logits: dict[str, np.ndarray], labels: np.ndarray, sources: np.ndarray, groups: np.ndarray,
                   fold_of: np.ndarray) -> dict:
    """Flip test-time augmentation and the lesion-map read-out, printed and returned."""
    cv, val = fold_of >= 0, fold_of == -1
    both = {"as is": (logits["oof"], logits["val"]), "flipped": (logits["oof_flipped"], logits["val_flipped"]),
            "mean of both (test-time flip)": ((logits["oof"] + logits["oof_flipped"]) / 2,
                                              (logits["val"] + logits["val_flipped"]) / 2)}
    flips = {"out_of_fold": {k: figures(softmax(o[cv]), labels[cv], sources[cv]) for k, (o, _) in both.items()},
             "validation_ensemble": {k: figures(softmax(v), labels[val], sources[val]) for k, (_, v) in both.items()}}
    plain, mirrored = logits["oof"][cv].argmax(1), both["mean of both (test-time flip)"][0][cv].argmax(1)
    truth, busi = labels[cv], sources[cv] == BUSI
    flips["busi_out_of_fold_fixed_broken"] = [int(((plain != truth) & (mirrored == truth) & busi).sum()),
                                              int(((plain == truth) & (mirrored != truth) & busi).sum())]
    for key in ("out_of_fold", "validation_ensemble"):
        print_rows(f"Flip test-time augmentation, {key.replace('_', ' ')}", flips[key], CARD_KEYS)
    print("BUSI out-of-fold images the flip fixes / breaks: %d / %d" % tuple(flips["busi_out_of_fold_fixed_broken"]))
    readout = lesion_readout(logits["oof"][cv], logits["oof_lesion"][cv], labels[cv], sources[cv], groups[cv])
    print_rows("Read-out out of fold: logits alone or with the lesion map (grouped 5-fold x 3)", readout,
               CALIBRATION_KEYS[:3] + ("busbra_malignant_auc",))
    for c in ("benign", "normal"):
        rows = cv & (labels == CLASSES.index(c)) & (sources == BUSI)
        print(f"BUSI {c} out of fold: lesion-map peak quartiles "
              f"{np.round(np.percentile(logits['oof_lesion'][rows, 0], [25, 50, 75]), 3).tolist()}")
    return {"flips": flips, "lesion_readout": readout}


CARD_KEYS = ("busi_accuracy", "busi_macro_f1", "busi_macro_auc", "busbra_malignant_auc", "busbra_called_normal")
CALIBRATION_KEYS = ("busi_accuracy", "busi_macro_f1", "busi_recall_normal", "busi_ece", "busi_nll", "busi_malignant_auc", "busbra_ece",
                    "busbra_malignant_auc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--recipe", default=SHIPPED_RECIPE)
    parser.add_argument("--members", action="store_true",
                        help="also run the default's members: flip test-time augmentation, lesion-map read-out")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if args.members and args.results.resolve() != DEFAULT_RESULTS:
        sys.exit(f"--members runs the shipped default's members, which come from {DEFAULT_RESULTS.name}")
    results = load_search(args.results)
    labels, sources, groups, fold_of = results["labels"], results["sources"], results["groups"], results["fold_of"]
    record: dict = {"results": str(args.results), "recipe": args.recipe, "recipes": recipe_table(results)}
    print_rows("Out-of-fold figures per recipe (5 fold models; the model card's recipe table)", record["recipes"], CARD_KEYS)

    oof, val_logits, _ = recipe_logits(results, args.recipe)
    cv, val = fold_of >= 0, fold_of == -1
    ensemble_val = np.mean(val_logits, axis=0)
    record["calibration"] = {
        "out_of_fold": cross_validated_maps(oof[cv], labels[cv], sources[cv], groups[cv]),
        "validation_ensemble": cross_validated_maps(ensemble_val, labels[val], sources[val], groups[val])}
    record["calibration_fitted_on_validation"] = {
        name: fitted_map(ensemble_val, labels[val], sources[val], biases, mode)[1] for name, biases, mode in CALIBRATION_MAPS[1:]}
    for key, title in (("out_of_fold", "out-of-fold logits of single members"),
                       ("validation_ensemble", "validation logits of the five-member ensemble")):
        print_rows(f"Calibration maps, grouped 5-fold x 5 on the {title} (mean ± sd over repeats)",
                   record["calibration"][key], CALIBRATION_KEYS)
    for name, fitted in record["calibration_fitted_on_validation"].items():
        print(f"fitted on all validation images, {name}: {fitted}")

    if args.members:
        try:
            record.update(member_figures(member_outputs(results), labels, sources, groups, fold_of))
        except MammaclsError as exc:  # e.g. nothing prepared yet
            sys.exit(str(exc))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
