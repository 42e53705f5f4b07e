"""Prediction without torch: model files, image and DICOM decoding, the refusal gate, ONNX Runtime,
the ``Predictor`` and streamed results. Nothing in this package imports torch (a test checks it);
``mammacls.load_model`` hands a ``Predictor`` a PyTorch backend only when asked to or when a
model has no ONNX export.
"""

from mammacls.inference.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
