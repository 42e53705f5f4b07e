"""Grad-CAM: the heatmap of a model whose class evidence is a bright blob lands on the blob."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.nets.gradcam import grad_cam
from mammacls.nets.networks import GRAY_MEAN, GRAY_STD, build_model
from mammacls.inference.onnx_backend import to_network_input

SIZE = 64


def blob_image(rng, bright: bool, centre=None, radius=7):
    img = rng.integers(20, 70, size=(SIZE, SIZE)).astype(np.float64)
    if bright:
        cy, cx = centre if centre is not None else rng.integers(radius + 2, SIZE - radius - 2, size=2)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 235
    return img.astype(np.uint8)


def train_blob_model(arch: str, steps: int = 40):
    """Class 1 ('malignant') when a bright blob is present, class 0 otherwise."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_model(arch)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(steps):
        labels = rng.integers(0, 2, size=16)
        images = np.stack([blob_image(rng, bool(y)) for y in labels])
        loss = torch.nn.functional.cross_entropy(
            net(torch.from_numpy(to_network_input(images, GRAY_MEAN, GRAY_STD))), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18"])
def test_heatmap_lands_on_the_blob(arch):
    """At 64 px the last block is a 2 x 2 grid: the hottest cell must be the one holding the blob."""
    net = train_blob_model(arch)
    rng = np.random.default_rng(1)
    hits = 0
    centres = [(14, 15), (15, 47), (47, 19), (45, 45), (20, 40), (42, 12)]  # away from the cell borders
    for centre in centres:
        image = blob_image(rng, True, centre)
        logits, cams, _ = grad_cam(net, arch, image[None], GRAY_MEAN, GRAY_STD, target=np.array([1]))
        cell = np.unravel_index(cams[0].argmax(), cams[0].shape)
        expected = (centre[0] * cams.shape[1] // SIZE, centre[1] * cams.shape[2] // SIZE)
        hits += cell == expected
    assert hits >= len(centres) - 1, f"{arch}: hottest cell on the blob in only {hits} of {len(centres)} images"


def test_grad_cam_shapes_for_every_architecture_and_batch():
    images = np.random.default_rng(0).integers(0, 255, size=(3, 64, 64)).astype(np.uint8)
    for arch, cells in (("resnet18", 2), ("mobilenet_v2", 2), ("vgg16", 4)):
        net = build_model(arch).eval()
        logits, cams, features = grad_cam(net, arch, images, GRAY_MEAN, GRAY_STD)
        assert logits.shape == (3, 3) and cams.shape == (3, cells, cells) and len(features) == 3
        assert cams.min() >= 0 and np.allclose(cams.reshape(3, -1).max(1)[cams.reshape(3, -1).max(1) > 0], 1)
        with torch.no_grad():
            plain = net(torch.from_numpy(to_network_input(images, GRAY_MEAN, GRAY_STD))).numpy()
        assert np.allclose(logits, plain, atol=1e-4)  # explaining does not change the prediction


def test_predict_explain_writes_overlays_and_json_paths(tiny_model, use_session_cache, tmp_path):
    folder = tmp_path / "in"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    rng = np.random.default_rng(2)
    for sub in ("a", "b"):  # the same file name in two folders must not overwrite
        Image.fromarray(blob_image(rng, True)).save(folder / sub / "scan (1).png")
    out = tmp_path / "explained"
    result = CliRunner().invoke(app, ["predict", str(folder), "--explain", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["model"]["backend"] == "torch"
    paths = [p["explanation"] for p in document["predictions"]]
    assert len(set(paths)) == 2 and all(p.startswith(str(out)) for p in paths)
    assert all("ood_distance" in p for p in document["predictions"])  # features come from the same pass
    for p in paths:
        panel = Image.open(p)
        assert panel.mode == "RGB" and panel.width > 2 * SIZE and panel.height == SIZE
    bad = CliRunner().invoke(app, ["predict", str(folder), "--explain", str(out), "--backend", "onnx"])
    assert bad.exit_code == 1 and "needs PyTorch" in bad.stderr
