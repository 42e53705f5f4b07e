"""Build the shipped default model from the members a GPU recipe search saved.

    python benchmarks/assemble_default.py --run RUN_DIR [--out weights/default] [--members-alone]
    python benchmarks/assemble_default.py --refinish [--out weights/default]

RUN_DIR holds ``results.json`` and ``members-RECIPE-*.safetensors`` from
``benchmarks/recipe_search.py``. The recipe is the search's first-ranked one (its rule is in
results.json). The script checks that the latest prepared dataset is the one the search ran on
(the same train and validation images, by pixel hash), assembles the five fold members into one
ensemble, calibrates it and fits its refusal gate on the validation split (which no member
trained on) on this CPU from the original files, exports ONNX, and publishes it to ``--out``
(float16, as the members were saved; the ONNX file is exported from the published weights, so both
backends compute the same thing). With ``--members-alone`` it instead writes each member as a
model of its own into the cache (``default-member-K``), to judge the members one by one.
With ``--refinish`` it keeps the published weights as they are and fits their calibration and
refusal gate again with this mammacls's finishing code (on the same validation and train images,
found by pixel hash in the prepared datasets), then exports the ONNX file again: how a change to
calibration reaches the shipped model without retraining it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from mammacls.data.prepared import load_prepared
from mammacls.training.ensemble import assemble_ensemble
from mammacls.errors import MammaclsError
from mammacls.nets.imagenet import load_imagenet_state_dict
from mammacls.store import models_dir
from mammacls.inference.card import ModelCard, Provenance, TrainingSummary
from mammacls.inference.model_files import MODEL_FILE, ModelRef, read_card
from mammacls.nets.weights import publish_model


def member_states(run: Path, recipe: str, count: int) -> list[dict]:
    states: dict[int, dict] = {}
    for path in sorted(run.glob(f"members-{recipe}-*.safetensors")):
        for key, value in load_file(str(path)).items():
            member, rest = key.split(".", 1)
            states.setdefault(int(member[len("member"):]), {})[rest] = value
    if sorted(states) != list(range(count)):
        raise MammaclsError(f"{run}: members {sorted(states)} of {recipe}, expected 0..{count - 1}")
    return [states[k] for k in range(count)]


def member_hashes(index_rows: list[dict[str, str]], folds: list[int], member_fold: int) -> set[str]:
    """Pixel sha256 of the images a cross-validation member trained on (every fold but its own;
    fold -1 marks images outside the cross-validation, which no member saw)."""
    return {row["sha256"] for row, fold in zip(index_rows, folds) if fold >= 0 and fold != member_fold}


def check_same_data(results: dict, dataset) -> None:
    index = {row["sha256"]: row["split"] for row in results["index"]}
    here = {row["sha256"]: row["split"] for row in dataset.rows if row["split"] in ("train", "val")}
    if index != here:
        raise MammaclsError("the latest prepared dataset is not the one the recipe search ran on "
                            "(run mammacls prepare on the same sources with the same seed)")


def describe_members(results: dict, recipe: str, run: Path) -> tuple[TrainingSummary, Provenance]:
    _, imagenet = load_imagenet_state_dict("mobilenet_v2", "IMAGENET1K_V1")
    summary = results["summary"]
    # what the members trained for: each run records it (searches before that: hyper, times any factor)
    trained = {r["epochs"] for r in results.get("runs", []) if r["recipe"] == recipe and r.get("repeat") == 0 and "epochs" in r}
    epochs = trained.pop() if len(trained) == 1 else results["hyper"]["epochs"] * results["recipes"][recipe].get("epochs_factor", 1)
    training = TrainingSummary(
        config={"recipe": recipe, **results["recipes"][recipe], **results["hyper"], "epochs": epochs,
                "augmentation": "benchmarks/recipe_search.py (on the GPU)"},
        selection=("recipe by 5-fold cross-validation on the train split, grouped by duplicate group and "
                      "patient, stratified by source and class (out-of-fold figures; rule: "
                      + results["selection_rule"].strip() + "); members: the five fold models at their last "
                      "epoch; validation split: calibration and refusal gate only; test split never used"),
        ensemble={"recipe": recipe, "members_are": "the 5 cross-validation fold models", "search_run": run.name},
        notes={"seeds": [1000 * (list(results["recipes"]).index(recipe) + 1) + k for k in range(5)],
               "recipe_search": {name: {"pooled": entry["pooled"], "fold_spread": entry["fold_spread"],
                                        **({"repeat_seed": entry["repeat_seed"]} if "repeat_seed" in entry else {})}
                                 for name, entry in summary.items()},
               "ranking": results["ranking"]})
    return training, Provenance(pretrained=imagenet, device=f"{results['device']} (torch {results['torch']})")


def refinish(target: Path) -> ModelCard:
    """Calibration and refusal gate of the published model in ``target`` fitted again, weights untouched."""
    from mammacls.inference.model_files import resolve_model
    from mammacls.training.finalise import recalibrate

    with tempfile.TemporaryDirectory(prefix="mammacls-refinish-") as scratch:
        work = Path(scratch) / target.name
        shutil.copytree(target, work)  # a writable copy: the folder may be the installed package's
        ref = resolve_model(str(work))
        weights = ref.card.weights.sha256
        recalibrate(ref, device="cpu", sections_only=True)
        final = read_card(work)
        if final.weights.sha256 != weights:
            raise MammaclsError("refinishing changed the weights; nothing was copied back")
        for name in ("metadata.json", final.refusal.ood.file, "model.onnx"):
            shutil.copyfile(work / name, target / name)
    return read_card(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a recipe search's folder (results.json, members-*.safetensors)")
    parser.add_argument("--refinish", action="store_true", help="refit calibration and gate of --out, weights kept")
    parser.add_argument("--out", type=Path, default=Path("weights/default"))
    parser.add_argument("--name", default="mammacls-default-2")
    parser.add_argument("--members-alone", action="store_true")
    args = parser.parse_args()
    if args.refinish:
        card = refinish(args.out)
        print(json.dumps({"out": str(args.out), "calibration": dataclasses.asdict(card.calibration),
                          "min_confidence": card.refusal.min_confidence}, indent=1))
        return
    if args.run is None:
        parser.error("--run is required (or --refinish)")

    results = json.loads((args.run / "results.json").read_text())
    recipe = results["ranking"][0]
    dataset = load_prepared()
    check_same_data(results, dataset)
    states = member_states(args.run, recipe, 5)
    folds = results["folds"]
    trained_on = [member_hashes(results["index"], folds, k) for k in range(5)]
    training, provenance = describe_members(results, recipe, args.run)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.members_alone:
        for k, state in enumerate(states):
            target = models_dir() / f"default-member-{k + 1}"
            shutil.rmtree(target, ignore_errors=True)
            assemble_ensemble([state], arch="mobilenet_v2", img_size=results["hyper"]["img_size"], dataset=dataset,
                              name=target.name, target=target, trained_on=[trained_on[k]], reporter=say,
                              provenance=provenance, training=dataclasses.replace(
                                  training, notes={**training.notes, "member_of": args.name, "member": k + 1}))
            say(f"wrote {target}")
        return
    with tempfile.TemporaryDirectory(prefix="mammacls-assemble-") as scratch:
        built = Path(scratch) / args.name
        card = assemble_ensemble(states, arch="mobilenet_v2", img_size=results["hyper"]["img_size"],
                                 dataset=dataset, name=args.name, target=built, training=training,
                                 provenance=provenance, trained_on=trained_on, reporter=say)
        say(f"temperature {card.temperature:.3f}, refusal thresholds {card.refusal.ood.member_thresholds}")
        shutil.rmtree(args.out, ignore_errors=True)
        # the members came from the GPU as float16 (benchmarks/recipe_search.py), so float16 loses nothing
        published = publish_model(ModelRef(args.name, built / MODEL_FILE, card, "cache"), args.out,
                                  name=args.name, half_min_elements=0)
    from mammacls.nets.export import export_onnx

    export_onnx(ModelRef(args.name, args.out / MODEL_FILE, published, "file"))
    final = read_card(args.out)
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(args.out.iterdir())}
    print(json.dumps({"out": str(args.out), "sha256": final.weights.sha256, "files_mib": sizes}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except MammaclsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
