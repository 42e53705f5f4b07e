"""mammacls: breast ultrasound classification (benign / malignant / normal).

    import mammacls
    classifier = mammacls.load_model("default")          # the shipped model; or a name, folder, file
    for answer in classifier.predict(["scan.png", "loop.dcm"]):
        print(answer.source, answer.status, answer.label, answer.probabilities)

The pipeline is prepare -> train -> evaluate -> predict. Importing this package must stay
cheap: torch is imported lazily where needed, and never on the ONNX prediction path.
"""

from mammacls.errors import MammaclsError

__version__ = "0.2.0"

CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")

__all__ = ["CLASSES", "MammaclsError", "__version__", "load_model"]


def load_model(model: str | None = None, *, device: str = "auto", backend: str = "auto", calibrated: bool = True):
    """A ``mammacls.inference.Predictor`` for ``model`` (see ``mammacls.runtime.load_model``)."""
    from mammacls.runtime import load_model as open_model

    return open_model(model, device=device, backend=backend, calibrated=calibrated)
