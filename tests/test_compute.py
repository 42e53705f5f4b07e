"""Where a network runs: the CPU fast path's choices, the allocator, and CUDA found without torch."""

from __future__ import annotations

import pytest

from mammacls.errors import MammaclsError


def test_precision_auto_takes_bf16_only_where_the_cpu_has_it(monkeypatch):
    from mammacls.nets import compute

    monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda: False)
    chosen = compute.choose_compute("resnet18", "cpu")
    assert (chosen.precision, chosen.memory_format) == ("fp32", "channels-last")
    with pytest.raises(MammaclsError, match="no native bf16") as refused:
        compute.choose_compute("resnet18", "cpu", precision="bf16")
    assert refused.value.parameter == "precision"
    monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda: True)
    assert compute.choose_compute("mobilenet_v2", "cpu").precision == "bf16"
    assert compute.choose_compute("mobilenet_v2", "cpu", training=False).precision == "fp32"  # predict stays exact
    assert compute.choose_compute("vgg16", "cpu", "fp32", "contiguous").memory_format == "contiguous"



def test_threads_never_exceed_the_cpus_this_process_may_use(monkeypatch):
    import torch

    from mammacls.nets import compute

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(compute, "usable_cpus", lambda: 1)
    try:
        assert compute.tune_cpu_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert compute.usable_cpus() >= 1


def test_the_allocator_tuning_can_be_left_out(monkeypatch):
    from mammacls.nets import compute

    monkeypatch.setattr(compute, "_ALLOCATOR_NOTE", [])
    monkeypatch.setenv(compute.ALLOCATOR_ENV, "default")
    assert compute.tune_cpu_allocator() is None
    monkeypatch.setattr(compute, "_ALLOCATOR_NOTE", [])
    monkeypatch.delenv(compute.ALLOCATOR_ENV)
    import sys

    note = compute.tune_cpu_allocator()
    assert (note is not None) == (sys.platform.startswith("linux")), note  # glibc's mallopt answered
    assert compute.tune_cpu_allocator() == note  # once per process


def test_nvidia_gpus_are_found_without_torch_and_cuda_visible_devices_hides_them(monkeypatch):
    from mammacls import runtime

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runtime.nvidia_gpu_visible() is False
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert runtime.nvidia_gpu_visible() is False


def test_the_device_is_decided_from_the_driver_before_torch_is_asked(monkeypatch):
    import torch

    from mammacls import runtime
    from mammacls.nets import networks

    asked = []
    monkeypatch.setattr(networks, "resolve_device", lambda device: asked.append(device) or "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append("is_available") or True)
    monkeypatch.setattr(runtime, "nvidia_gpu_visible", lambda: False)
    assert runtime.resolved_device("auto") == runtime.resolved_device("cpu") == "cpu" and asked == []
    assert runtime.resolved_device("cuda") == "cuda" and len(asked) == 1  # asked for: torch decides
    monkeypatch.setattr(runtime, "nvidia_gpu_visible", lambda: True)
    assert runtime.resolved_device("auto") == "cuda" and len(asked) == 2  # a driver shows a GPU: torch decides
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(MammaclsError, match="no CUDA device is available"):
            runtime.resolved_device("cuda")


def test_device_auto_runs_on_the_gpu_when_there_is_one(monkeypatch, tiny_model, use_session_cache):
    from mammacls import runtime
    from mammacls.inference.model_files import resolve_model
    from mammacls.inference.onnx_backend import OnnxBackend

    ref = resolve_model("tiny")
    monkeypatch.setattr(runtime, "_cuda_usable", lambda: False)
    backend, _ = runtime.open_backend(ref, "auto")
    assert isinstance(backend, OnnxBackend)  # no GPU: ONNX Runtime on the CPU, as before
    chosen = []

    class FakeTorchBackend:
        name = "torch"

        def __init__(self, ref, device):
            chosen.append(device)

    monkeypatch.setattr(runtime, "_cuda_usable", lambda: True)
    monkeypatch.setattr(runtime, "TorchBackend", FakeTorchBackend)
    monkeypatch.setattr("mammacls.nets.networks.resolve_device", lambda device: str(device))
    backend, _ = runtime.open_backend(ref, "auto")
    assert isinstance(backend, FakeTorchBackend) and chosen == ["cuda"]
    backend, _ = runtime.open_backend(ref, "auto", "onnx")  # asked for ONNX: it stays
    assert isinstance(backend, OnnxBackend)
    backend, _ = runtime.open_backend(ref, "cpu")
    assert isinstance(backend, OnnxBackend)


def test_cpu_torch_backend_agrees_with_onnx_in_the_fast_layout(tiny_model, use_session_cache):
    import numpy as np

    from mammacls import runtime
    from mammacls.inference.model_files import resolve_model

    ref = resolve_model("tiny")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    torch_backend, _ = runtime.open_backend(ref, "cpu", "torch")
    assert torch_backend.compute.memory_format == "channels-last" and torch_backend.compute.precision == "fp32"
    onnx_backend, _ = runtime.open_backend(ref, "cpu", "onnx")
    assert np.abs(torch_backend.logits(images) - onnx_backend.logits(images)).max() < 1e-4
