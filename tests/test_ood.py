"""Refusal and abstention: image checks, densities, thresholds, and what predict/evaluate report."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.inference.card import OodDensity
from mammacls.inference.gate import distances, image_check, image_reason, image_statistics, status_of
from mammacls.training.refusal import choose_min_confidence, fit_density, fit_image_density
from tests.conftest import textured_image


def speckle(rng, size=160):
    """Ultrasound-like: dark background, multiplicative speckle, a brighter band and a dark lesion."""
    import cv2

    base = np.full((size, size), 60.0)
    base[size // 5: size // 2] += 50
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(50, size - 50, size=2)
    base[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(12, 30) ** 2] = 25
    noise = cv2.GaussianBlur(rng.rayleigh(1.0, size=(size, size)), (3, 3), 0)
    return np.uint8(np.clip(base * noise, 0, 255))


def test_image_reasons():
    rng = np.random.default_rng(0)
    ok = speckle(rng)
    assert image_reason(ok, 0.0) is None
    assert "blank" in image_reason(np.full((200, 200), 7, np.uint8), 0.0)
    assert "too small" in image_reason(ok[:40, :40], 0.0)
    assert "strongly coloured" in image_reason(ok, 0.3)
    assert image_reason(ok, 0.009) is None  # BUSI's most coloured image (markers) is accepted


def test_image_statistics_density_rejects_what_does_not_look_like_ultrasound():
    rng = np.random.default_rng(1)
    train = np.stack([image_statistics(speckle(rng)) for _ in range(120)])
    val = np.stack([image_statistics(speckle(rng)) for _ in range(60)])
    fitted = fit_image_density(train, val)
    record = OodDensity(file="ood.safetensors", sha256="", threshold=1.0, image_threshold=fitted["threshold"])
    unseen = [speckle(rng) for _ in range(30)]
    accepted = sum(image_check(img, img, 0.0, fitted["arrays"], record) is None for img in unseen)
    assert accepted >= 28
    document = np.full((160, 160), 250, np.uint8)
    document[20::14, 10:150] = 20  # lines of "text"
    yy, xx = np.mgrid[0:160, 0:160]
    others = {"document": document, "noise": rng.integers(0, 256, (160, 160)).astype(np.uint8),
              "gradient": np.uint8(xx * 255 / 159), "photo-like": np.uint8(127 + 100 * np.sin(xx / 9) * np.cos(yy / 13))}
    for name, img in others.items():
        reason = image_check(img, img, 0.0, fitted["arrays"], record)
        assert reason and "image statistics (brightness, contrast, speckle, edges) are far from" in reason, name


def test_feature_density_separates_far_points_and_keeps_near_ones():
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 4, size=(3, 50))
    labels = rng.integers(0, 3, size=400)
    train = centres[labels] + rng.normal(size=(400, 50))
    val = centres[rng.integers(0, 3, size=100)] + rng.normal(size=(100, 50))
    fitted = fit_density(train, labels, val, 3)
    test_in = centres[rng.integers(0, 3, size=200)] + rng.normal(size=(200, 50))
    test_out = rng.normal(0, 4, size=(200, 50)) + 12
    assert (distances(fitted["arrays"], test_in) <= fitted["threshold"]).mean() >= 0.97
    assert (distances(fitted["arrays"], test_out) > fitted["threshold"]).mean() >= 0.97


def test_min_confidence_marks_where_validation_is_mostly_wrong():
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0.34, 1.0, size=400)
    labels = np.zeros(400, dtype=int)
    correct = rng.random(400) < confidence  # confident predictions are right more often
    predicted = np.where(correct, 0, 1)
    probabilities = np.repeat(((1 - confidence) / 2)[:, None], 3, axis=1)  # the rest split evenly
    probabilities[np.arange(400), predicted] = confidence
    threshold = choose_min_confidence(probabilities, labels)
    below = confidence < threshold
    assert 0.4 <= threshold < 0.75
    assert correct[below].mean() < 0.6 < correct[~below].mean()


def test_status_order_rejects_before_it_abstains():
    assert status_of("blank or constant image", 1.0, 5.0, 0.99, 0.5) == ("rejected", "blank or constant image")
    assert status_of(None, 9.0, 5.0, 0.99, 0.5)[0] == "rejected"
    assert status_of(None, 1.0, 5.0, 0.45, 0.5)[0] == "uncertain"
    assert status_of(None, 1.0, 5.0, 0.95, 0.5) == ("ok", None)


def test_trained_model_stores_its_density_and_predict_reports_status(tiny_model, use_session_cache, tmp_path):
    assert tiny_model.refusal.ood.threshold > 0 and tiny_model.refusal.ood.image_threshold > 0
    assert 0 < tiny_model.refusal.min_confidence < 1
    rng = np.random.default_rng(4)
    folder = tmp_path / "in"
    folder.mkdir()
    gray = textured_image(rng, 1, size=(96, 80))
    Image.fromarray(gray).save(folder / "scan.png")
    colour = np.stack([gray, gray // 3, gray // 5], axis=-1)
    Image.fromarray(colour).save(folder / "doppler.png")
    Image.fromarray(np.full((90, 90), 128, np.uint8)).save(folder / "blank.png")
    result = CliRunner().invoke(app, ["predict", str(folder), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    by_name = {p["path"].rsplit("/", 1)[-1]: p for p in document["predictions"]}
    assert by_name["blank.png"]["status"] == "rejected" and "blank" in by_name["blank.png"]["reason"]
    assert by_name["doppler.png"]["status"] == "rejected" and "coloured" in by_name["doppler.png"]["reason"]
    assert by_name["scan.png"]["status"] in ("ok", "uncertain", "rejected")
    assert "ood_distance" in by_name["scan.png"]
    assert sum(document["status_counts"].values()) == 3
    assert "rejected" in result.stderr  # the table shows the status


def test_onnx_features_match_torch(tiny_model, use_session_cache):
    from mammacls.inference.onnx_backend import OnnxBackend
    from mammacls.runtime import TorchBackend
    from mammacls.inference.model_files import resolve_model

    ref = resolve_model("tiny")
    images = np.random.default_rng(5).integers(0, 255, size=(4, 32, 32)).astype(np.uint8)
    fast_logits, fast_features = OnnxBackend(ref).logits_and_features(images)
    eager_logits, eager_features = TorchBackend(ref, "cpu").logits_and_features(images)
    assert np.allclose(fast_logits, eager_logits, atol=1e-4)
    assert fast_features.shape == eager_features.shape == (4, 512)
    assert np.allclose(fast_features, eager_features, atol=1e-4)


def test_evaluate_reports_coverage_and_accuracy_on_accepted(tiny_model, use_session_cache, prepared):
    result = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--data", str(prepared[0]), "--json",
                                      "--bootstrap", "100"])
    assert result.exit_code == 0, result.stderr
    selective = json.loads(result.stdout)["models"][0]["metrics"]["selective"]
    assert selective["checked"] is True
    assert 0 <= selective["coverage"] <= 1 and 0 <= selective["coverage_ok"] <= selective["coverage"]
    assert 0 <= selective["sure_errors"]["sure"] <= selective["sure_errors"]["errors"]
    assert selective["sure_errors"]["min_probability"] == 0.9
    assert "refusal: predict would reject" in result.stderr
    assert f"wrong and sure (status ok, p >= 0.9): {selective['sure_errors']['sure']} of " in result.stderr


def test_wrong_and_sure_counts_the_accepted_mistakes_marked_ok_at_high_probability(tiny_model, use_session_cache,
                                                                                   prepared):
    """Logits set by hand on the tiny model's own features: sure mistakes, hesitant mistakes (status
    uncertain, or ok below p 0.9), right answers and a rejected image; each counted where it belongs."""
    from mammacls.evaluation.evaluate import _logits_and_features, load_eval_set
    from mammacls.evaluation.scoring import selective_metrics
    from mammacls.inference.model_files import resolve_model

    ref = resolve_model("tiny")
    eval_set = load_eval_set(prepared[0])
    eval_set.images = [np.kron(image, np.ones((2, 2), dtype=image.dtype)) for image in eval_set.images]  # >= 64 px
    n = len(eval_set.labels)
    assert n >= 6
    _, features = _logits_and_features(ref, eval_set.at_size(ref.card.img_size), "cpu", 32)
    wrong_class = (eval_set.labels + 1) % 3
    logits = np.zeros((n, 3))
    logits[np.arange(n), eval_set.labels] = 8.0  # right and sure
    logits[0, :] = 0.0
    logits[0, wrong_class[0]] = 9.0  # wrong and sure: p > 0.99 at the tiny model's temperature
    logits[1, :] = 0.0
    logits[1, wrong_class[1]] = 0.3  # wrong, hardly above the others: uncertain or below 0.9
    features[2] = 1e6  # far from everything the model saw: rejected, whatever its label
    logits[2, :] = 0.0
    logits[2, wrong_class[2]] = 9.0
    eval_set.sources = ["A"] * 2 + ["B"] * (n - 2)
    selective, statuses = selective_metrics(ref, eval_set, logits, features, calibrated=True)
    assert statuses[0] == "ok" and statuses[2] == "rejected"
    assert (selective.sure_errors.errors, selective.sure_errors.sure) == (2, 1)
    assert selective.sure_errors.share == pytest.approx(0.5)
    by_source = selective.sure_errors_by_source
    assert (by_source["A"].errors, by_source["A"].sure) == (2, 1) and (by_source["B"].errors, by_source["B"].sure) == (0, 0)
    assert by_source["B"].share is None and by_source["B"].to_record()["share"] is None


@pytest.mark.parametrize("bad", ["--model"])
def test_calibrate_needs_a_model(bad, cache):
    result = CliRunner().invoke(app, ["calibrate"])
    assert result.exit_code == 2


def test_the_uncertain_reason_never_shows_two_equal_numbers():
    from mammacls.inference.gate import status_of

    status, reason = status_of(None, None, None, 0.48999, 0.49)
    assert status == "uncertain" and reason == "top probability 0.48999 below the model's confidence floor 0.49000"
    status, reason = status_of(None, None, None, 0.4861, 0.49)
    assert reason == "top probability 0.486 below the model's confidence floor 0.490"
    status, reason = status_of(None, None, None, 0.312, 0.4)
    assert reason == "top probability 0.31 below the model's confidence floor 0.40"
    assert status_of(None, None, None, 0.5, 0.4) == ("ok", None)
