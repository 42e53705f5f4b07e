"""Choosing how to run a model: ONNX Runtime on the CPU (``mammacls.inference.onnx_backend``,
no torch import), or PyTorch (``TorchBackend`` here), on CUDA when an NVIDIA GPU is there.

Both backends take the same uint8 N x S x S batches (``resize_square``) and normalise them
with ``to_network_input``, so their probabilities agree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mammacls.choices import Backend, Device, parse_choice
from mammacls.errors import MammaclsError, param
from mammacls.inference.onnx_backend import OnnxBackend
from mammacls.inference.model_files import ModelRef


class TorchBackend:
    name = "torch"

    def __init__(self, ref: ModelRef, device: str) -> None:
        from mammacls.nets.compute import choose_compute, to_layout
        from mammacls.nets.weights import load_network

        self.device = device
        self.arch = ref.card.arch
        self.compute = choose_compute(self.arch, device, training=False)  # fp32: agrees with ONNX within 1e-4
        self.net = to_layout(load_network(ref, device), self.compute)
        self.mean, self.std = ref.card.preprocessing.mean[0], ref.card.preprocessing.std[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        from mammacls.nets.networks import predict_logits

        return predict_logits(self.net, batch, self.device, batch_size=len(batch))

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from mammacls.nets.networks import predict_logits_and_features

        return predict_logits_and_features(self.net, self.arch, batch, self.device, batch_size=len(batch))

    def lesion_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits, lesion probability maps and penultimate features (mask-guided models)."""
        from mammacls.nets.networks import predict_lesion_maps

        return predict_lesion_maps(self.net, self.arch, batch, self.device, batch_size=len(batch))

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits, Grad-CAM heatmaps of the predicted classes and penultimate features."""
        from mammacls.nets.gradcam import grad_cam

        return grad_cam(self.net, self.arch, batch, self.mean, self.std, self.device)


def nvidia_gpu_visible() -> bool:
    """Whether an NVIDIA GPU is there for this process, found without importing torch (so that a
    machine without one keeps its torch-free start): the driver's device nodes, honouring
    ``CUDA_VISIBLE_DEVICES``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    if sys.platform.startswith("linux"):
        gpus = Path("/proc/driver/nvidia/gpus")
        return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()
    if sys.platform == "win32":
        import shutil

        return shutil.which("nvidia-smi") is not None
    return False  # macOS has no CUDA


def _cuda_usable() -> bool:
    """An NVIDIA GPU that torch can use (torch is imported only when the driver shows a GPU)."""
    if not nvidia_gpu_visible():
        return False
    import torch

    return torch.cuda.is_available()


def resolved_device(device: str | Device) -> str:
    """``device`` as "cpu" or "cuda"; torch is imported only where an NVIDIA GPU could answer, so a
    CPU-only machine decides without it."""
    device = parse_choice(Device, device, "device")
    if device == Device.auto:
        return Device.cuda.value if _cuda_usable() else Device.cpu.value
    if device == Device.cpu:
        return Device.cpu.value
    from mammacls.nets.networks import resolve_device  # cuda asked for: torch says whether there is one

    return resolve_device(device)


def open_backend(ref: ModelRef, device: str | Device = "auto",
                 backend: str | Backend = "auto") -> tuple[Any, str | None]:
    """Pick how to run ``ref``: PyTorch on CUDA when an NVIDIA GPU is usable (``device='auto'``) or asked
    for; else ONNX Runtime on the CPU when the model has an export; PyTorch on the CPU for
    ``backend='torch'`` or a model without an export.

    Returns the backend and, when PyTorch was chosen only for want of an export, a hint.
    """
    from mammacls.inference.model_files import verify_weights

    device, backend = parse_choice(Device, device, "device"), parse_choice(Backend, backend, "backend")
    if device == "auto" and backend != "onnx" and _cuda_usable():
        device = Device.cuda
    has_onnx = ref.card.onnx is not None
    if backend == "onnx":
        if device == "cuda":
            raise MammaclsError(f"{param('backend')} onnx runs on the CPU; drop {param('device')} cuda "
                                f"or use {param('backend')} torch")
        if not has_onnx:
            raise MammaclsError(f"model {ref.name} has no ONNX export: run mammacls export --model {ref.spec}")
    if backend == "onnx" or (backend == "auto" and device != "cuda" and has_onnx):
        verify_weights(ref)  # ONNX never reads the weights, yet they must be the card's (PyTorch checks as it loads)
        return OnnxBackend(ref), None
    from mammacls.nets.networks import resolve_device

    hint = None
    if backend == "auto" and device != "cuda":
        hint = (f"model {ref.name} has no ONNX export, so predict imports PyTorch (slower start); "
                f"run mammacls export --model {ref.spec}"
                + (" (it writes to the cache, never into the installed package)" if ref.read_only else ""))
    return TorchBackend(ref, resolve_device(device)), hint


def load_model(model: str | None = None, *, device: str | Device = "auto", backend: str | Backend = "auto",
               calibrated: bool = True, allow_unfinished: bool = False):
    """Open a model for prediction: ``mammacls.load_model("default").predict(images)``.

    ``model``: a cache name, a model folder, a ``.safetensors`` file or ``"default"`` (the shipped
    model); None: the one chosen with ``mammacls use``, else the shipped one. On the CPU a model with
    an ONNX export runs in ONNX Runtime and torch is never imported.
    """
    from mammacls.inference.model_files import check_finished, resolve_model
    from mammacls.inference.predictor import Predictor

    ref = resolve_model(model)
    check_finished(ref, allow_unfinished)  # a killed run's weights have no calibration and no gate
    runner, _ = open_backend(ref, device, backend)
    return Predictor(ref, runner, calibrated=calibrated and ref.card.calibration is not None)
