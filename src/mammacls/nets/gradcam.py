"""Explanations: Grad-CAM heatmaps for the predicted class (Selvaraju et al. 2017).

The activations of each architecture's last convolutional block are weighted
by the spatial mean of the predicted class score's gradient, summed over
channels, rectified and scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np

from mammacls.errors import MammaclsError


def last_conv_block(arch: str, net):
    """The module whose output Grad-CAM explains: the last convolutional block."""
    from mammacls.archs import ARCH_SPECS

    if arch not in ARCH_SPECS:
        raise MammaclsError(f"no Grad-CAM layer known for {arch!r}")
    return net.get_submodule(ARCH_SPECS[arch].gradcam)


def grad_cam(net, arch: str, images: np.ndarray, mean: float, std: float, device: str = "cpu",
             target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits (N x classes), heatmaps (N x h x w, in [0, 1]) and penultimate features for
    uint8 images N x S x S, from one forward pass.

    ``target`` picks the class to explain per image (default: the predicted one).
    """
    import torch

    from mammacls.nets.networks import capture_features, members_of
    from mammacls.inference.onnx_backend import to_network_input

    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    # an ensemble's map is the mean of its members' maps, each scaled to its own peak first
    handles = [last_conv_block(arch, member).register_forward_hook(keep) for member in members_of(net)]
    try:
        net.eval()
        inputs = torch.from_numpy(to_network_input(images, mean, std)).to(device)
        with torch.enable_grad(), capture_features(arch, net) as box:
            logits = net(inputs)
            classes = logits.argmax(dim=1) if target is None else torch.as_tensor(target, device=logits.device)
            net.zero_grad(set_to_none=True)
            logits.gather(1, classes[:, None]).sum().backward()
        cams = torch.stack([_peak_scaled(torch.relu((a.grad.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)).detach())
                            for a in captured]).mean(dim=0)
    finally:
        for handle in handles:
            handle.remove()
    features = box["features"].detach().float().cpu().numpy().astype(np.float64)
    return logits.detach().float().cpu().numpy(), _peak_scaled(cams).cpu().numpy(), features


def _peak_scaled(cams):
    return cams / cams.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]


def gradcam_panel(gray: np.ndarray, cam: np.ndarray, caption: str = "") -> bytes:
    """The image beside its heatmap overlay, as PNG bytes (``mammacls serve`` keeps them in memory)."""
    import cv2

    height, width = gray.shape
    heat = cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    return _side_by_side(base, cv2.addWeighted(base, 0.55, coloured, 0.45, 0), caption)


def lesion_panel(gray: np.ndarray, probability: np.ndarray, caption: str = "") -> bytes:
    """The image beside its predicted lesion (probability >= 0.5: red tint, green outline), as PNG bytes."""
    import cv2

    height, width = gray.shape
    mask = cv2.resize(probability.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    tinted = base.copy()
    tinted[mask] = (0.6 * tinted[mask] + 0.4 * np.array([0, 0, 255])).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(tinted, contours, -1, (0, 255, 0), max(1, height // 300))
    return _side_by_side(base, tinted, caption)


def _side_by_side(base: np.ndarray, overlay: np.ndarray, caption: str) -> bytes:
    import cv2

    height, width = base.shape[:2]
    gap = np.full((height, max(4, width // 100), 3), 255, dtype=np.uint8)
    panel = np.hstack([base, gap, overlay])
    if caption:
        scale = max(0.4, height / 900)
        cv2.putText(panel, caption, (8, int(24 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, int(2 * scale)), cv2.LINE_AA)
    ok, encoded = cv2.imencode(".png", panel)
    if not ok:
        raise MammaclsError("could not encode an explanation as PNG")
    return encoded.tobytes()
