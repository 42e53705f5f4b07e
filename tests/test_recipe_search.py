"""benchmarks/recipe_search.py on the CPU (a tiny bundle) and benchmarks/posthoc_levers.py on the
committed search results of the shipped default."""

import csv
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # posthoc_levers imports its neighbour recipe_search, as a script does
SEARCH_RESULTS = REPO / "benchmarks" / "results" / "recipe_search_2026-11-27_30ep.json"


@pytest.fixture(scope="module")
def levers():
    return importlib.import_module("posthoc_levers")


def _tiny_bundle(folder: Path, size: int = 32) -> None:
    """What gpu_bundle.py writes: 110 train and 20 val images of both sources, masks, an index."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for k in range(130):
        source = "BUS-BRA" if k % 2 else "Dataset_BUSI_with_GT"
        label = ("benign", "malignant", "normal")[k % 3] if source != "BUS-BRA" else ("benign", "malignant")[k % 4 // 2]
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / "images" / f"{k:05d}.jpg")
        Image.fromarray(np.zeros((size, size), bool)).convert("1").save(folder / "images" / f"{k:05d}_mask.png")
        rows.append({"file": f"{k:05d}", "label": label, "split": "train" if k < 110 else "val", "source": source,
                     "group": f"{source}:g{k}", "patient": "", "sha256": f"{k:064x}", "mask_known": 1})
    with open(folder / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fake_imagenet(path: Path) -> None:
    """A torchvision MobileNetV2 state dict in the bundle's fp16 form (random weights: no download)."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({k: v.half().contiguous() for k, v in torchvision.models.mobilenet_v2().state_dict().items()}, str(path))


@pytest.mark.slow
def test_search_workers_train_the_epochs_asked_for(tmp_path):
    """--epochs must reach the spawned workers (it once did not: a '60-epoch' run trained 30), a
    recipe's epochs_factor multiplies it, and every train image is scored once out of fold."""
    _tiny_bundle(tmp_path / "bundle")
    _fake_imagenet(tmp_path / "bundle" / "mobilenet_v2_imagenet1k_v1.fp16.safetensors")
    recipes = "scanner-mask-per-source,scanner-mask-long"  # two candidates, one with epochs_factor 2
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recipe_search.py"), "--bundle",
                          str(tmp_path / "bundle"), "--out", str(tmp_path / "out"), "--device", "cpu",
                          "--workers", "2", "--epochs", "2", "--recipes", recipes],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r.get("error") for r in results["runs"]] == [None] * 10
    epochs = {(r["recipe"], r["epochs"]) for r in results["runs"]}
    assert epochs == {("scanner-mask-per-source", 2), ("scanner-mask-long", 4)}
    assert results["hyper"]["epochs"] == 2 and results["hyper"]["img_size"] == 32  # the size read from the bundle
    for recipe in recipes.split(","):
        held = sorted(i for r in results["runs"] if r["recipe"] == recipe for i in r["held_idx"])
        assert held == list(range(110)), recipe  # each train image once
    assert all(np.isfinite(r["held_logits"]).all() and len(r["val_logits"]) == 20 for r in results["runs"])
    assert results["ranking"][0] in ("scanner-mask-per-source", "scanner-mask-long")
    assert sorted((tmp_path / "out").glob("members-*.safetensors"))  # the two candidates' members are saved
    assert not (tmp_path / "out" / "bundle-arrays.npz").exists()


def test_class_weights_balance_classes_pooled_or_within_each_source():
    search = importlib.import_module("recipe_search")
    labels = np.array([0] * 6 + [1] * 2 + [2] * 2 + [0] * 10 + [1] * 10)  # BUSI 6/2/2, BUS-BRA 10/10
    sources = np.array(["BUSI"] * 10 + ["BUS-BRA"] * 20)
    train = np.arange(30)
    pooled = search.class_weights(labels, sources, train, "pooled")
    per_source = search.class_weights(labels, sources, train, "per-source")
    for weights in (pooled, per_source):
        assert weights.mean() == pytest.approx(1.0)
    # pooled: normal (2 of 30) outweighs benign (16 of 30) eightfold; within BUSI only threefold
    assert pooled[8] / pooled[0] == pytest.approx(8.0)
    assert per_source[8] / per_source[0] == pytest.approx(3.0)
    assert per_source[10] == pytest.approx(per_source[25])  # BUS-BRA's two classes balanced
    # every class of a source carries the same total weight
    busi = [per_source[:10][labels[:10] == c].sum() for c in range(3)]
    assert busi == pytest.approx([busi[0]] * 3)
    held_out = search.class_weights(labels, sources, np.arange(20), "per-source")
    assert not held_out[20:].any()  # images outside the training folds get no weight
    unweighted = search.class_weights(labels, sources, np.arange(20), "none")
    assert unweighted[:20].tolist() == [1.0] * 20 and not unweighted[20:].any()


def test_balanced_sampling_draws_each_sources_classes_equally_and_only_training_images():
    search = importlib.import_module("recipe_search")
    labels = np.array([0] * 60 + [1] * 20 + [2] * 20 + [0] * 100 + [1] * 100)  # BUSI 60/20/20, BUS-BRA 100/100
    sources = np.array(["BUSI"] * 100 + ["BUS-BRA"] * 200)
    train = np.arange(290)  # the last 10 BUS-BRA malignant images are held out
    np.random.seed(0)
    assert sorted(search.epoch_order(search.RECIPES["scanner-mask"], labels, sources, train)) == train.tolist()
    balanced = search.RECIPES["scanner-mask-balanced"]
    drawn = np.concatenate([search.epoch_order(balanced, labels, sources, train) for _ in range(40)])
    assert len(drawn) == 40 * 290 and drawn.max() < 290
    busi = drawn[drawn < 100]
    shares = np.bincount(labels[busi], minlength=3) / len(busi)
    assert shares == pytest.approx([1 / 3] * 3, abs=0.02)  # 60/20/20 drawn as thirds
    assert (drawn < 100).mean() == pytest.approx(100 / 290, abs=0.02)  # the sources by their size
    assert len(np.unique(drawn[drawn < 100])) == 100  # with replacement, yet every image seen


# the model card's recipe-table rows: (words that start the row, results file, recipe)
CARD_ROWS = (("standard:", "30ep", "standard"), ("scanner: +", "30ep", "scanner"),
             ("**scanner + lesion-mask loss (shipped)**", "30ep", "scanner-mask"),
             ("scanner, rerun", "rerun", "scanner"), ("scanner + mask, rerun", "rerun", "scanner-mask"),
             ("*ablation:* scanner + mask **without ImageNet**", "30ep", "scanner-mask-scratch"),
             ("*ablation:* scanner + mask **without BUS-BRA**", "30ep", "scanner-mask-busi"))


def test_committed_search_reproduces_the_model_cards_recipe_table(levers):
    """Every row of weights/MODEL_CARD.md's recipe table, recomputed from the committed logits."""
    card_lines = [line for line in (REPO / "weights" / "MODEL_CARD.md").read_text().splitlines()
                  if line.startswith("| ")]
    tables = {run: levers.recipe_table(levers.load_search(REPO / "benchmarks" / "results" /
                                                           f"recipe_search_2026-11-27_{run}.json"))
              for run in ("30ep", "rerun")}
    for start, run, recipe in CARD_ROWS:
        rows = [line for line in card_lines if line.startswith(f"| {start}")]
        assert len(rows) == 1, start
        cells = [cell.strip().strip("*") for cell in rows[0].split("|")[2:6]]
        expected = tuple(float(cell) for cell in cells)
        got = tuple(tables[run][recipe][k] for k in ("busi_accuracy", "busi_macro_f1", "busi_macro_auc",
                                                    "busbra_malignant_auc"))
        assert got == pytest.approx(expected, abs=0.0006), start


def test_committed_cpu_search_reproduces_the_model_cards_class_balance_table(levers):
    """weights/MODEL_CARD.md's class-balance table (96 px on the CPU), recomputed from its committed logits."""
    results = levers.load_search(REPO / "benchmarks" / "results" / "recipe_search_2026-12-02_cpu96.json")
    assert results["hyper"]["img_size"] == 96 and results["hyper"]["epochs"] == 10 and results["device"] == "cpu"
    table = levers.recipe_table(results)
    card_lines = (REPO / "weights" / "MODEL_CARD.md").read_text().splitlines()
    def row_of(first_cell: str) -> str:
        [row] = [line for line in card_lines if line.startswith("| ") and line.split("|")[1].strip() == first_cell]
        return row

    for start, recipe in (("scanner + mask, pooled class weights (the shipped recipe)", "scanner-mask"),
                          ("+ per-source class weights", "scanner-mask-per-source"),
                          ("+ no class weights", "scanner-mask-unweighted"),
                          ("+ no weights, sampling balanced within each source", "scanner-mask-balanced")):
        row = row_of(start)
        cells = [cell.strip().strip("*").rstrip(" %").strip("*") for cell in row.split("|")[2:7]]
        expected = (float(cells[0]), float(cells[1]), float(cells[2]), float(cells[3]) / 100, float(cells[4]))
        got = table[recipe]
        assert (got["busi_accuracy"], got["busi_macro_f1"], got["busi_macro_auc"], got["busi_predicted_normal"],
                got["busbra_malignant_auc"]) == pytest.approx(expected, abs=0.0006), start
    summary = importlib.import_module("recipe_search").summarise(results["runs"], results["labels"], results["sources"])
    for start, recipe in (("scanner + mask, pooled class weights, another seed", "scanner-mask"),
                          ("+ per-source class weights, another seed", "scanner-mask-per-source")):
        row = row_of(start)
        cells = [cell.strip().strip("*").rstrip(" %").strip("*") for cell in row.split("|")[2:7]]
        expected = (float(cells[0]), float(cells[1]), float(cells[2]), float(cells[3]) / 100, float(cells[4]))
        got = summary[recipe]["repeat_seed"]  # the same folds, the recipe's other seeds (--other-seed)
        assert (got["busi_accuracy"], got["busi_macro_f1"], got["busi_macro_auc"], got["busi_predicted_normal"],
                got["busbra_malignant_auc"]) == pytest.approx(expected, abs=0.0006), start
    search = importlib.import_module("recipe_search")  # the selection rule's pick, as the card says
    assert search.choose(search.summarise(results["runs"], results["labels"], results["sources"]))[0] == \
        "scanner-mask-per-source"


def test_calibration_map_recovers_a_known_temperature_and_biases(levers):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (4000, 3))
    true_temperature, true_bias = 1.7, np.array([0.8, -0.5, 0.0])
    p = levers.softmax(logits / true_temperature + true_bias)
    labels = np.array([rng.choice(3, p=row) for row in p])
    weights = np.ones(len(labels))
    temperature, bias = levers.fit_map(logits, labels, weights, biases=True)
    assert temperature == pytest.approx(true_temperature, rel=0.1)
    assert bias == pytest.approx(true_bias, abs=0.15)
    temperature_only, no_bias = levers.fit_map(logits, labels, weights, biases=False)
    assert not no_bias.any() and 1.2 < temperature_only < 2.4


def test_source_weights_balance_or_select(levers):
    sources = np.array([levers.BUSI] * 3 + [levers.BUSBRA] * 1)
    assert levers.source_weights(sources, "pooled").tolist() == [1, 1, 1, 1]
    assert levers.source_weights(sources, "busi").tolist() == [1, 1, 1, 0]
    assert levers.source_weights(sources, "balanced") == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1])


def test_cross_validated_maps_score_every_map_on_held_out_images(levers):
    results = levers.load_search(SEARCH_RESULTS)
    oof, _, folds = levers.recipe_logits(results, levers.SHIPPED_RECIPE)
    assert folds == [0, 1, 2, 3, 4]
    seen = results["fold_of"] >= 0
    assert not np.isnan(oof[seen]).any() and np.isnan(oof[~seen]).all()
    scores = levers.cross_validated_maps(oof[seen], results["labels"][seen], results["sources"][seen],
                                         results["groups"][seen], repeats=1)
    assert set(scores) == {name for name, *_ in levers.CALIBRATION_MAPS}
    raw, one = scores["none"], scores["temperature, pooled"]
    every, shipped = scores["temperature per predicted class"], scores["temperature of its own for normal answers (ships)"]
    # a temperature (one, or one per answer) never changes the argmax; it does change the calibration
    for calibrated in (one, every, shipped):
        assert raw["busi_accuracy"] == calibrated["busi_accuracy"] and raw["busi_ece"] != calibrated["busi_ece"]
    # normal answers' own temperature: BUSI's NLL well below one temperature's, its malignant ranking kept;
    # a temperature for every answer ranks BUSI's malignancies worse (why it does not ship)
    assert shipped["busi_nll"][0] < one["busi_nll"][0] - 0.03
    assert shipped["busi_malignant_auc"][0] >= one["busi_malignant_auc"][0] - 0.001
    assert every["busi_malignant_auc"][0] < shipped["busi_malignant_auc"][0] - 0.002
    assert raw["busi_accuracy"][0] == pytest.approx(0.820, abs=0.0006)


def test_lesion_readout_uses_the_map_when_it_carries_the_answer(levers):
    """Benign and normal have the same logits here; only the lesion map's peak tells them apart."""
    rng = np.random.default_rng(2)
    n = 600
    labels = rng.choice(3, n)
    sources = np.full(n, levers.BUSI)
    logits = rng.normal(0, 0.3, (n, 3))
    logits[labels == 1, 1] += 3.0
    peak = np.where(labels == 2, rng.uniform(0.01, 0.2, n), rng.uniform(0.8, 0.99, n))
    lesion = np.c_[peak, peak / 10, peak * 0.9]
    readout = levers.lesion_readout(logits, lesion, labels, sources, np.arange(n).astype(str), repeats=1)
    assert readout["logits + lesion map"]["busi_accuracy"] > 0.95
    assert readout["logits (logistic regression)"]["busi_accuracy"] < 0.8


def test_member_figures_count_what_the_flip_fixes_and_breaks(levers, capsys):
    rng = np.random.default_rng(3)
    n = 100
    sources = np.where(np.arange(n) % 2, levers.BUSBRA, levers.BUSI)
    labels = np.where(sources == levers.BUSI, np.arange(n) % 3, (np.arange(n) // 2) % 2)
    fold_of = np.where(np.arange(n) < 80, np.arange(n) % 5, -1)
    right = np.eye(3)[labels] * 4 + rng.normal(0, 0.1, (n, 3))
    oof, flipped = right.copy(), right.copy()
    busi_images = np.where((sources == levers.BUSI) & (fold_of >= 0))[0]
    fixed, broken = busi_images[:3], busi_images[3:5]
    oof[fixed] = np.roll(right[fixed], 1, axis=1)  # wrong as is; the mirror (weighted more) puts it right
    flipped[fixed] = right[fixed] * 3
    flipped[broken] = np.roll(right[broken], 1, axis=1) * 3  # right as is, wrong after the mean
    logits = {"oof": oof, "oof_flipped": flipped, "oof_lesion": np.full((n, 3), 0.5),
              "val": right[fold_of == -1], "val_flipped": right[fold_of == -1]}
    figures = levers.member_figures(logits, labels, sources, np.arange(n).astype(str), fold_of)
    assert figures["flips"]["busi_out_of_fold_fixed_broken"] == [3, 2]
    assert "fixes / breaks: 3 / 2" in capsys.readouterr().out
    as_is = figures["flips"]["out_of_fold"]["as is"]["busi_accuracy"]
    assert as_is == pytest.approx(1 - 3 / len(busi_images))
    assert set(figures["lesion_readout"]) == {"argmax of the logits", "logits (logistic regression)", "logits + lesion map"}


def test_committed_warm_start_logits_reproduce_the_model_cards_table():
    """weights/MODEL_CARD.md's warm-start table, recomputed from benchmarks/results/warm_start.json."""
    warm_start = importlib.import_module("warm_start_search")
    document = json.loads((REPO / "benchmarks" / "results" / "warm_start.json").read_text())
    by_hash = {entry["sha256"]: entry for entry in json.loads(SEARCH_RESULTS.read_text())["index"]}
    rows = [by_hash[sha] for sha in document["index"]]
    assert len(rows) == 1581
    card = {line.split("|")[1].strip(): line.split("|")[2:8] for line in
            (REPO / "weights" / "MODEL_CARD.md").read_text().splitlines() if line.startswith("| ")}
    for run, start in (("shipped", "shipped members"), ("pooled-s0", "+ 2 epochs, pooled class weights (control)"),
                       ("per-source-s0", "+ 2 epochs, per-source class weights")):
        got = warm_start.scores(np.array(document["runs"][run]["logits"]), rows)
        cells = [cell.strip().strip("*").rstrip(" %") for cell in card[start]]
        expected = (float(cells[0]), float(cells[1]), float(cells[2]), float(cells[3]) / 100, float(cells[4]),
                    float(cells[5]) / 100)
        assert (got["busi_accuracy"], got["busi_macro_f1"], got["busi_macro_auc"], got["busi_predicted_normal"],
                got["busbra_malignant_auc"], got["busbra_called_normal"]) == pytest.approx(expected, abs=0.0006), run


def test_the_lite0_recipe_trains_a_fold_from_the_bundles_file(tmp_path, monkeypatch):
    """EfficientNet-Lite0 in the search (candidate d of issue 22): its ImageNet file beside MobileNetV2's
    in the bundle, folded to grey, with the lesion decoder; one fold, one epoch, in this process."""
    import torch
    from safetensors.torch import save_file

    search = importlib.import_module("recipe_search")
    lite0 = importlib.import_module("efficientnet_lite0")
    _tiny_bundle(tmp_path / "bundle")
    torch.manual_seed(0)
    imagenet = {k: v.half().contiguous() for k, v in lite0.build().state_dict().items()}
    imagenet["features.9._bn1.running_mean"].fill_(3.0)  # a mark no fresh network has
    save_file(imagenet, str(tmp_path / "bundle" / search.LITE0_FILE))
    index, images, masks = search.load_bundle(tmp_path / "bundle")
    monkeypatch.setitem(search.HYPER, "epochs", 1)
    monkeypatch.setitem(search.HYPER, "batch_size", 16)
    data = {"images": torch.from_numpy(images), "masks": torch.from_numpy(masks),
            "known": np.ones(len(index), np.float32), "labels": np.array([search.CLASSES.index(r["label"]) for r in index]),
            "sources": np.array([r["source"] for r in index]), "folds": search.fold_assignment(index),
            "imagenet": tmp_path / "bundle" / "mobilenet_v2_imagenet1k_v1.fp16.safetensors"}  # lite0's is its neighbour
    result, state = search.train_one(("lite0-scanner-mask", 0, 0), data, torch.device("cpu"))
    assert result["epochs"] == 1 and len(result["held_idx"]) == int((data["folds"] == 0).sum())
    assert np.isfinite(result["held_logits"]).all() and np.asarray(result["val_logits"]).shape == (20, 3)
    assert tuple(state["features.0._conv_stem.weight"].shape) == (32, 1, 3, 3)
    assert any(key.startswith("lesion_decoder.") for key in state)
    untouched = imagenet["features.9._depthwise_conv.weight"].float()
    assert not torch.equal(state["features.9._depthwise_conv.weight"].float(), untouched)  # it trained from there
    # the file was loaded: 5 steps at batch norm's momentum 0.01 keep its mark near 3 (a fresh network: 0)
    assert state["features.9._bn1.running_mean"].float().mean() == pytest.approx(3.0, abs=0.5)


@pytest.fixture(scope="module")
def wrong_and_sure():
    return importlib.import_module("wrong_and_sure")


def test_committed_logits_reproduce_the_model_cards_sure_and_wrong_table(wrong_and_sure, levers):
    """weights/MODEL_CARD.md's leave-one-source-out tables (both directions) and their committed JSON,
    recomputed from the searches."""
    card = (REPO / "weights" / "MODEL_CARD.md").read_text().splitlines()
    committed = json.loads((REPO / "benchmarks" / "results" / "wrong_and_sure.json").read_text())
    bra, busi = wrong_and_sure.BUSBRA, wrong_and_sure.BUSI
    figures = {bra: wrong_and_sure.report(levers.load_search(levers.DEFAULT_RESULTS), bra),
               busi: wrong_and_sure.report(levers.load_search(wrong_and_sure.CPU_RESULTS), busi)}
    for held_out, expected_n in ((bra, 225), (busi, 95)):
        rows = wrong_and_sure.card_rows(figures[held_out])
        assert len(rows) == len(wrong_and_sure.COMBINATIONS)
        for row in rows:
            assert row in card, row
        held = figures[held_out]["held_out_scanner"]["ensemble_on_val"]
        for name, row in committed[held_out]["held_out_scanner"]["ensemble_on_val"].items():
            assert held[name].keys() == row.keys(), name
            for key, value in row.items():
                assert held[name][key] == pytest.approx(value, abs=1e-9), (held_out, name, key)
        assert held[wrong_and_sure.COMBINATIONS[0]]["n"] == expected_n
    single = {k: figures[k]["held_out_scanner"]["single_models_on_train"] for k in (bra, busi)}
    assert (single[bra]["n"], single[bra]["errors"], single[bra]["sure_wrong"]) == (1049, 467, 134)  # the card's prose
    assert (single[busi]["n"], single[busi]["errors"], single[busi]["sure_wrong"]) == (441, 104, 15)
    assert single[busi]["lesions_called_normal"] == 0.0  # never saw a normal scan, never answers normal


def test_unanimity_and_probability_averaging_do_what_their_names_say(wrong_and_sure):
    # two members sure of class 0 and one sure of class 1 on image 0; all sure of class 2 on image 1
    members = np.array([[[8.0, 0, 0], [0, 0, 8.0]], [[8.0, 0, 0], [0, 0, 8.0]], [[0, 8.0, 0], [0, 0, 8.0]]])
    labels = np.array([1, 2])
    fitted = {"temperature": 1.0, "floor": 0.4}
    logits_mean, ok = wrong_and_sure.Combiner(wrong_and_sure.COMBINATIONS[0]).apply(members, fitted)
    assert ok.tolist() == [True, True] and logits_mean[0].max() > 0.9  # mean logits: sure of class 0
    _, ok = wrong_and_sure.Combiner("mean logits + unanimous").apply(members, fitted)
    assert ok.tolist() == [False, True]  # image 0 has a dissenting member
    probability_mean, _ = wrong_and_sure.Combiner("mean probabilities").apply(members, fitted)
    assert probability_mean[0].max() < 0.7 and probability_mean[0].argmax() == 0  # the dissent flattens it
    assert np.allclose(probability_mean.sum(axis=1), 1.0)
    sure = wrong_and_sure.sure_and_wrong(logits_mean, np.array([True, True]), labels)
    assert sure.tolist() == [True, False]  # wrong at p > 0.9 and ok; the second is right
    assert wrong_and_sure.sure_and_wrong(logits_mean, np.array([False, True]), labels).tolist() == [False, False]
    row = wrong_and_sure.scored(logits_mean, np.array([True, True]), labels)
    assert (row["errors"], row["sure_wrong"], row["sure_wrong_per_100"]) == (1, 1, 50.0)
    # normal answers' own temperature: fitted only where there are normal answers, and it keeps every answer
    normal_own = wrong_and_sure.Combiner(wrong_and_sure.COMBINATIONS[1])
    assert normal_own.normal_own and not wrong_and_sure.Combiner(wrong_and_sure.COMBINATIONS[0]).normal_own
    rng = np.random.default_rng(0)
    truth = rng.choice(3, 400, p=[0.4, 0.3, 0.3])
    many = rng.normal(0, 1, (3, 400, 3)) + 2.0 * np.eye(3)[truth]
    lesion_as_normal = rng.random(400) < 0.15  # some lesions answered normal, and very surely
    many[:, lesion_as_normal & (truth != 2), 2] += 8.0
    many[:, truth == 2, 2] += 6.0  # normal answers far too sure in general
    fitted = normal_own.fit(many, truth)
    assert fitted["class_temperatures"][2] > fitted["temperature"] == fitted["class_temperatures"][0]
    softened, _ = normal_own.apply(many, fitted)
    assert (softened.argmax(axis=1) == many.mean(axis=0).argmax(axis=1)).all()


def test_a_normal_answer_with_a_lesion_on_its_map_is_flagged_or_re_answered():
    rules = importlib.import_module("lesion_vs_normal")
    # three members; image 0 answered normal with a bright map, image 1 normal with a dark map, image 2 benign
    logits = np.tile(np.array([[[1.0, 0.5, 3.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]]]), (3, 1, 1))
    peak = np.array([0.9, 0.1, 0.9])
    fitted = {"temperature": 1.0, "floor": 0.4, "lesion_peak": 0.8}
    probabilities, ok = rules.apply(logits, peak, fitted, "as trained")
    assert probabilities.argmax(axis=1).tolist() == [2, 2, 0] and ok.all()
    _, ok = rules.apply(logits, peak, fitted, "uncertain")
    assert ok.tolist() == [False, True, True]
    answered, ok = rules.apply(logits, peak, fitted, "answer")
    assert answered.argmax(axis=1).tolist() == [0, 2, 0] and ok.all()  # benign, the likelier lesion class
    assert np.allclose(answered.sum(axis=1), 1.0) and answered[0, 2] == 0.0
    labels = np.array([0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    normals_peak = np.r_[0.9, 0.9, np.linspace(0.0, 0.5, 19)]
    # the threshold lets 95 % of the own source's normal scans keep their answer
    refit = rules.fit(np.zeros((3, len(labels), 3)), normals_peak, labels)
    assert np.mean(normals_peak[labels == 2] < refit["lesion_peak"]) == pytest.approx(0.95, abs=0.06)


def test_the_cards_lesion_map_paragraph_is_the_committed_measurement():
    figures = json.loads((REPO / "benchmarks" / "results" / "lesion_vs_normal.json").read_text())
    card = " ".join((REPO / "weights" / "MODEL_CARD.md").read_text().split())
    auc = figures["separation_auc"]
    for value in (auc["own"]["map_peak"], auc["own"]["classifier"],
                  auc["foreign_lesions_against_own_normals"]["map_peak"],
                  auc["foreign_lesions_against_own_normals"]["classifier"]):
        assert f"{value:.2f}" in card
    before, after = figures["as trained"]["held_out"], figures["answer"]["held_out"]
    assert f"{before['lesions_called_normal']:.0%} to {after['lesions_called_normal']:.0%}".replace("%", " %") in card
    assert figures["uncertain"]["held_out"]["sure_wrong"] == before["sure_wrong"]  # "removes none"


def _synthetic_search(rng) -> dict:
    """Three five-fold runs over 40 train and 10 val images of both sources (posthoc_levers.load_search's keys)."""
    sources = np.array(["Dataset_BUSI_with_GT", "BUS-BRA"] * 25)
    labels = np.array([k % 3 if s == "Dataset_BUSI_with_GT" else k // 2 % 2 for k, s in enumerate(sources)])
    folds = np.array([k % 5 for k in range(40)] + [-1] * 10)
    runs = []
    for recipe, repeat in (("scanner-mask", 0), ("scanner-mask", 1), ("lite0-scanner-mask", 0)):
        for fold in range(5):
            held = np.where(folds == fold)[0]
            runs.append({"recipe": recipe, "fold": fold, "repeat": repeat, "held_idx": held.tolist(),
                         "held_logits": rng.normal(size=(len(held), 3)).tolist(),
                         "val_logits": rng.normal(size=(10, 3)).tolist()})
    return {"index": [{}] * 50, "runs": runs, "folds": folds.tolist(), "labels": labels, "sources": sources}


def test_second_architecture_pairs_fold_models_that_never_saw_the_fold():
    """Each pair averages fold k of one run with fold k of the other on fold k's images; the
    disagreement counts the images the two name differently; validation pairs average the two
    five-member means."""
    diversity = importlib.import_module("second_architecture")
    levers = importlib.import_module("posthoc_levers")
    results = _synthetic_search(np.random.default_rng(3))
    table = diversity.diversity_table(results)
    assert list(table) == ["pooled"]  # the per-source family has no runs here
    family = table["pooled"]
    assert list(family["single"]) == ["MobileNetV2, seed 1", "MobileNetV2, seed 2", "EfficientNet-Lite0"]
    held = np.array(results["folds"]) >= 0
    first, _, _ = levers.recipe_logits(results, "scanner-mask", 0)
    lite0, lite0_val, _ = levers.recipe_logits(results, "lite0-scanner-mask", 0)
    pair = family["pairs"]["MobileNetV2, seed 1 + EfficientNet-Lite0"]
    expected = diversity.scores((first + lite0) / 2, held, results)
    assert {k: pair[k] for k in expected} == pytest.approx(expected)
    assert pair["disagreement"] == pytest.approx((first[held].argmax(1) != lite0[held].argmax(1)).mean())
    assert 0 < pair["disagreement"] < 1
    alone = family["validation"]["EfficientNet-Lite0 (5 members)"]
    val_rows = ~held
    full = np.full_like(lite0, np.nan)
    full[val_rows] = np.mean(lite0_val, axis=0)
    assert alone == pytest.approx(diversity.scores(full, val_rows, results))
    assert len(family["validation"]) == 3 + 3
    results["runs"] = [r for r in results["runs"] if not (r["recipe"] == "lite0-scanner-mask" and r["fold"] == 4)]
    assert "EfficientNet-Lite0" not in diversity.diversity_table(results)["pooled"]["single"]  # an unfinished run is left out


def test_committed_cpu_search_reproduces_the_model_cards_second_architecture_table():
    """weights/MODEL_CARD.md's second-architecture table (96 px on the CPU), recomputed from the committed logits."""
    diversity = importlib.import_module("second_architecture")
    levers = importlib.import_module("posthoc_levers")
    table = diversity.diversity_table(levers.load_search(diversity.CPU_SEARCH))
    assert list(table) == ["pooled", "per-source"]
    card = {line.split("|")[1].strip(): line.split("|")[2:8] for line in
            (REPO / "weights" / "MODEL_CARD.md").read_text().splitlines() if line.startswith("| ")}
    checked = 0
    for weights, family in table.items():
        assert len(family["single"]) == 3 and len(family["pairs"]) == 3
        for part in ("single", "pairs"):
            for name, got in family[part].items():
                cells = [cell.strip().rstrip(" %") for cell in card[f"{weights}: {name}"]]
                expected = [float(cells[0]), float(cells[1]), float(cells[2]), float(cells[3]) / 100, float(cells[4])]
                keys = ["busi_accuracy", "busi_macro_f1", "busi_macro_auc", "busi_predicted_normal", "busbra_malignant_auc"]
                if part == "pairs":
                    expected.append(float(cells[5]) / 100)
                    keys.append("disagreement")
                assert [got[k] for k in keys] == pytest.approx(expected, abs=0.0006), (weights, name)
                checked += 1
    assert checked == 12
