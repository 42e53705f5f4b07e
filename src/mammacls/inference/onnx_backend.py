"""Running a model's ONNX export in ONNX Runtime on the CPU: the fast, torch-free path."""

from __future__ import annotations

import os

import numpy as np

from mammacls.errors import MammaclsError
from mammacls.inference.model_files import ModelRef
from mammacls.store import sha256_file


def to_network_input(batch: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 N x S x S -> float32 N x 1 x S x S, scaled as in training."""
    scaled = batch.astype(np.float32)[:, None] / np.float32(255.0)
    return (scaled - np.float32(mean)) / np.float32(std)


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, ref: ModelRef) -> None:
        import onnxruntime as ort

        record = ref.card.onnx
        path = ref.file(record.file)
        if not path.is_file():
            raise MammaclsError(f"ONNX export missing: {path} (run mammacls export --model {ref.spec})")
        if sha256_file(path) != record.sha256:
            raise MammaclsError(f"{path} does not match the sha256 in its metadata: corrupt or modified "
                                f"(run mammacls export --model {ref.spec} to rewrite it)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:  # ONNX Runtime ignores it; a shared node's limit should hold
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own error types for bad files
            raise MammaclsError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0][:160]}") from None
        self.input_name = record.input
        self.outputs = [record.output] + ([record.features] if record.features else [])
        self.mean, self.std = ref.card.preprocessing.mean[0], ref.card.preprocessing.std[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(self.outputs[:1], {self.input_name: to_network_input(batch, self.mean, self.std)})[0]

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        results = self.session.run(self.outputs, {self.input_name: to_network_input(batch, self.mean, self.std)})
        return results[0], (results[1] if len(results) > 1 else None)
