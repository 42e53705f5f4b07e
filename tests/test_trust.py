"""Evaluation you can trust: bootstrap intervals, calibration, grouped CV, leakage guard, report."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mammacls.training.calibration import fit_temperature, nll
from mammacls.cli import app
from mammacls.errors import MammaclsError
from mammacls.inference.probabilities import softmax
from mammacls.evaluation.metrics import (
    bootstrap_ci, brier_score, expected_calibration_error, malignant_metrics, threshold_at_specificity,
)
from mammacls.training import TrainConfig, train_cross_validation, train_repeats

runner = CliRunner()


def _synthetic(n: int, seed: int = 0, sharp: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.55, 0.28, 0.17])
    logits = rng.normal(size=(n, 3)) + 1.8 * np.eye(3)[y]
    return y, logits * sharp


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    widths = []
    for n in (100, 1600):
        y, logits = _synthetic(n)
        probs = softmax(logits)
        ci = bootstrap_ci(y, probs, resamples=1000, seed=1)
        accuracy = (probs.argmax(1) == y).mean()
        assert ci["accuracy"][0] <= accuracy <= ci["accuracy"][1]
        for key in ("macro_f1", "roc_auc_macro", "recall_malignant", "precision_normal"):
            assert ci[key][0] < ci[key][1]
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(n): 4x fewer points wide at 16x the data


def test_bootstrap_is_seeded_and_stratified():
    y, logits = _synthetic(150)
    probs = softmax(logits)
    assert bootstrap_ci(y, probs, seed=3) == bootstrap_ci(y, probs, seed=3)
    assert bootstrap_ci(y, probs, seed=3) != bootstrap_ci(y, probs, seed=4)


def test_temperature_scaling_lowers_nll_of_an_overconfident_model():
    y, logits = _synthetic(600, seed=2, sharp=4.0)  # 4x sharper than the truth: overconfident
    temperature = fit_temperature(logits, y)
    assert temperature > 2.0
    assert nll(logits, y, temperature) < nll(logits, y, 1.0) - 0.1
    before = expected_calibration_error(y, softmax(logits))
    after = expected_calibration_error(y, softmax(logits, temperature))
    assert after < before
    # scaling never changes the predicted class
    assert (softmax(logits, temperature).argmax(1) == logits.argmax(1)).all()


def test_normal_answers_get_their_own_temperature_and_keep_every_answer():
    """Answers "normal" 3x too sure, the others as sure as they should be: one temperature can fit only
    one of the two; normal answers' own temperature recovers the distortion, lesion answers keep the
    shared one (so their malignant probabilities rank as before), and no answer changes."""
    from mammacls.inference.probabilities import calibrated_softmax
    from mammacls.training.calibration import fit_class_temperatures

    y, truth = _synthetic(3000, seed=5)
    logits = truth * np.where(truth.argmax(1) == 2, 3.0, 1.0)[:, None]
    shared = fit_temperature(logits, y)
    per_class = fit_class_temperatures(logits, y, shared)
    undistorted = fit_class_temperatures(truth, y, fit_temperature(truth, y))  # what the synthetic logits need
    assert per_class is not None and undistorted is not None
    assert per_class[0] == per_class[1] == shared  # benign and malignant answers: the shared temperature
    assert per_class[2] / undistorted[2] == pytest.approx(3.0, rel=0.1)  # the distortion comes back
    one, each = softmax(logits, shared), calibrated_softmax(logits, shared, per_class)
    assert (each.argmax(1) == logits.argmax(1)).all() and np.allclose(each.sum(1), 1.0)
    lesion_answers = logits.argmax(1) != 2
    assert np.allclose(each[lesion_answers], one[lesion_answers])
    assert -np.log(each[np.arange(len(y)), y]).mean() < nll(logits, y, shared) - 0.01
    normal_answers = ~lesion_answers  # where the distortion was, calibration improves
    assert expected_calibration_error(y[normal_answers], each[normal_answers]) < \
        expected_calibration_error(y[normal_answers], one[normal_answers]) - 0.05
    assert np.allclose(calibrated_softmax(logits, shared, None), one)  # no class temperatures: as before
    every = fit_class_temperatures(logits, y, shared, own=(0, 1, 2))  # every class its own, when asked
    assert every is not None and len(set(every)) == 3


def test_class_temperatures_need_enough_answers_and_stay_near_the_shared_one():
    from mammacls.training.calibration import (MAX_TEMPERATURE_RATIO, MIN_PREDICTED_FOR_OWN_TEMPERATURE,
                                               fit_class_temperatures)

    y, logits = _synthetic(60, seed=1)
    assert (logits.argmax(1) == 2).sum() < MIN_PREDICTED_FOR_OWN_TEMPERATURE  # too few normal answers
    assert fit_class_temperatures(logits, y, 1.3) is None  # nothing to fit: one temperature
    y, logits = _synthetic(600, seed=3, sharp=0.01)  # nearly flat logits: NLL wants T near 0.01
    fitted = fit_class_temperatures(logits, y, 1.0)
    assert fitted is not None and fitted[2] == pytest.approx(1.0 / MAX_TEMPERATURE_RATIO, rel=1e-3)


def test_ece_and_brier_on_known_cases():
    y = np.array([0, 1, 2, 0])
    perfect = np.eye(3)[y]
    assert expected_calibration_error(y, perfect) == 0.0 and brier_score(y, perfect) == 0.0
    uniform = np.full((4, 3), 1 / 3)
    assert brier_score(y, uniform) == pytest.approx(2 / 3)
    assert expected_calibration_error(y, uniform) == pytest.approx(abs(0.5 - 1 / 3))


def test_threshold_at_specificity_gives_that_specificity_on_the_data_it_was_fitted_on():
    y, logits = _synthetic(400, seed=5)
    probs = softmax(logits)
    threshold = threshold_at_specificity(y, probs[:, 1], 0.9)
    mal = malignant_metrics(y, probs, threshold)
    assert mal["specificity_at_spec90"] >= 0.9
    assert mal["specificity_at_spec90"] < 0.92  # the lowest such threshold: as sensitive as possible
    assert 0 < mal["sensitivity_at_spec90"] <= 1


def test_trained_model_carries_calibration_threshold_and_fingerprints(tiny_model, use_session_cache):
    from mammacls.inference.model_files import resolve_model

    calibration = tiny_model.calibration
    assert calibration.temperature > 0 and calibration.fitted_on == "val"
    assert calibration.val_after["nll"] <= calibration.val_before["nll"] + 1e-9
    assert 0 <= calibration.malignant_threshold_spec90 <= 1
    prints = resolve_model("tiny").sidecar("training_data")["train_val_fingerprints"]
    n = tiny_model.provenance.data["train_images"] + tiny_model.provenance.data["val_images"]
    assert len(prints["sha256"]) == len(prints["phash"]) == n


@pytest.fixture(scope="module")
def cv_run(prepared, tmp_path_factory):
    """A 3-fold cross-validation run of tiny models, in its own cache."""
    import os

    cache = tmp_path_factory.mktemp("cv-cache")
    old = os.environ.get("MAMMACLS_CACHE_DIR")
    os.environ["MAMMACLS_CACHE_DIR"] = str(cache)
    try:
        config = TrainConfig(arch="mobilenet_v2", pretrained=False, epochs=1, img_size=32, batch_size=16)
        summary = train_cross_validation(config, folds=3, data_dir=prepared[0], name="cv")
        again = train_cross_validation(config, folds=3, data_dir=prepared[0], name="cv")  # finished folds are skipped
    finally:
        if old is None:
            os.environ.pop("MAMMACLS_CACHE_DIR", None)
        else:
            os.environ["MAMMACLS_CACHE_DIR"] = old
    return cache, summary, again


def test_cross_validation_saves_every_fold_and_summarises(cv_run, prepared):
    cache, summary, again = cv_run
    assert [r["name"] for r in summary["runs"]] == ["cv-fold1", "cv-fold2", "cv-fold3"]
    assert set(summary["summary"]) == {"accuracy", "macro_f1", "roc_auc_macro"}
    assert again["runs"] == summary["runs"]
    from mammacls.data.prepared import load_prepared

    test_hashes = {r["sha256"] for r in load_prepared(prepared[0]).split("test")}
    assert test_hashes
    for fold in (1, 2, 3):
        folder = cache / "models" / f"cv-fold{fold}"
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["training"]["group"] == {"kind": "cv", "run": "cv", "member": fold, "of": 3}
        assert meta["training"]["status"] == "complete" and meta["calibration"]["temperature"] > 0
        prints = json.loads((folder / "training_data.json").read_text())["train_val_fingerprints"]
        assert not set(prints["sha256"]) & test_hashes  # test split untouched


def test_fold_splitter_keeps_groups_whole_and_classes_stratified(prepared):
    from mammacls.data.prepared import load_prepared
    from mammacls.training import cv_fold_rows

    dataset = load_prepared(prepared[0])
    rows = {r["path"]: r for r in dataset.rows}
    folds = cv_fold_rows(dataset, 4, seed=0)
    all_val = [p for split in folds for p in split["val"]]
    assert sorted(all_val) == sorted(p for p, r in rows.items() if r["split"] in ("train", "val"))
    for split in folds:
        train_groups = {rows[p]["group_id"] for p in split["train"]}
        val_groups = {rows[p]["group_id"] for p in split["val"]}
        assert not train_groups & val_groups
        assert {rows[p]["label"] for p in split["val"]} == {"benign", "malignant", "normal"}
    # on a larger synthetic pool the class ratios hold in every fold
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    labels = rng.choice(["benign", "malignant", "normal"], p=[0.55, 0.28, 0.17], size=600)
    fake_rows = [{"path": f"p{i}", "label": lab, "group_id": f"g{i // 2}", "split": "train"}
                 for i, lab in enumerate(labels)]
    fake = SimpleNamespace(split=lambda name: fake_rows if name == "train" else [])
    for split in cv_fold_rows(fake, 5, seed=1):
        val_labels = [fake_rows[int(p[1:])]["label"] for p in split["val"]]
        assert abs(val_labels.count("malignant") / len(val_labels) - 0.28) < 0.05


def test_repeats_use_consecutive_seeds(prepared, cache):
    summary = train_repeats(TrainConfig(arch="mobilenet_v2", pretrained=False, epochs=1, img_size=32, seed=7),
                            repeats=2, data_dir=prepared[0], name="rep")
    assert [r["name"] for r in summary["runs"]] == ["rep-seed7", "rep-seed8"]
    with pytest.raises(MammaclsError, match="repeats must be at least 2"):
        train_repeats(TrainConfig(pretrained=False), repeats=1, data_dir=prepared[0])


def test_evaluate_cv_run_shows_folds_and_ensemble_with_intervals(cv_run, prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMMACLS_CACHE_DIR", str(cv_run[0]))
    result = runner.invoke(app, ["evaluate", "--data", str(prepared[0]), "--json", "--bootstrap", "200",
                                 "--report", "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    names = [m["name"] for m in document["models"]]
    assert names == ["cv-fold1", "cv-fold2", "cv-fold3", "cv-ensemble"]
    [group] = document["groups"]
    assert group["kind"] == "cv" and len(group["members"]) == 3
    for entry in document["models"]:
        metrics = entry["metrics"]
        lo, hi = metrics["ci95"]["accuracy"]
        assert lo <= metrics["accuracy"] <= hi
        assert metrics["per_class"]["malignant"]["recall_ci95"] is not None
        assert {"ece", "brier"} <= set(metrics["calibration"]["before"])
    ensemble = document["models"][-1]
    assert ensemble["model"]["members"] == 3 and ensemble["model"]["member_names"] == ["cv-fold1", "cv-fold2", "cv-fold3"]
    folds = document["models"][:3]
    assert all("sensitivity_at_spec90" in f["metrics"]["malignant"] for f in folds)
    assert "cross-validation folds" in result.stderr
    html_text = (tmp_path / "r" / "index.html").read_text()
    from tests.test_cli import _assert_self_contained_html

    _assert_self_contained_html(html_text)
    assert "cv-ensemble" in html_text and "Misclassified" in html_text and "reliability" in html_text
    for kind in ("confusion_matrix", "roc", "precision_recall", "reliability"):
        assert (tmp_path / "r" / f"{kind}_cv-ensemble.png").is_file()


def test_no_calibration_gives_raw_probabilities(tiny_model, use_session_cache, prepared):
    calibrated = json.loads(runner.invoke(app, ["evaluate", "--model", "tiny", "--data", str(prepared[0]),
                                                "--json", "--bootstrap", "100"]).stdout)
    raw = json.loads(runner.invoke(app, ["evaluate", "--model", "tiny", "--data", str(prepared[0]),
                                         "--json", "--bootstrap", "100", "--no-calibration"]).stdout)
    assert calibrated["calibrated"] is True and raw["calibrated"] is False
    cal, unc = calibrated["models"][0]["metrics"], raw["models"][0]["metrics"]
    assert cal["calibration"]["after"] == unc["calibration"]["after"]
    assert cal["log_loss"] == pytest.approx(cal["calibration"]["after"]["nll"], abs=1e-6)
    assert unc["log_loss"] == pytest.approx(unc["calibration"]["before"]["nll"], abs=1e-6)


def test_predict_uses_calibrated_probabilities_by_default(tiny_model, use_session_cache, busi_dir):
    image = str(Path(busi_dir[0]) / "benign" / "benign (5).png")
    calibrated = json.loads(runner.invoke(app, ["predict", image, "--model", "tiny", "--json"]).stdout)
    raw = json.loads(runner.invoke(app, ["predict", image, "--model", "tiny", "--json", "--no-calibration"]).stdout)
    assert calibrated["model"]["temperature"] == pytest.approx(tiny_model.temperature)
    assert raw["model"]["temperature"] == 1.0
    if abs(tiny_model.temperature - 1.0) > 1e-3:
        assert calibrated["predictions"][0]["probabilities"] != raw["predictions"][0]["probabilities"]


def test_overlap_refusal_counts_identical_and_near_duplicates(tiny_model, use_session_cache, prepared, tmp_path):
    """A folder holding copies (and a slightly altered copy) of training images is refused."""
    from PIL import Image

    from mammacls.data.prepared import load_prepared

    dataset = load_prepared(prepared[0])
    folder = tmp_path / "leaky"
    for label in ("benign", "malignant", "normal"):
        (folder / label).mkdir(parents=True)
    train_rows = [r for r in dataset.split("train")][:4]
    for i, row in enumerate(train_rows):
        gray = dataset.load_image(row)
        if i == 0:
            gray = np.clip(gray.astype(int) + 2, 0, 255).astype(np.uint8)  # near-duplicate, not identical
        Image.fromarray(gray).save(folder / row["label"] / f"copy {i}.png")
    test_row = dataset.split("test")[0]
    Image.fromarray(dataset.load_image(test_row)).save(folder / test_row["label"] / "unseen.png")
    result = runner.invoke(app, ["evaluate", "--model", "tiny", "--data", str(folder)])
    assert result.exit_code == 1
    assert "4 of 5 evaluation images overlap" in result.stderr and "(3 identical, 1 near-duplicates)" in result.stderr
