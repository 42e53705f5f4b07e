"""mammacls: breast ultrasound classification (benign / malignant / normal).

The pipeline is data -> model -> train -> evaluate -> predict, one module each.
Importing this package must stay cheap: torch is imported lazily where needed.
"""

from mammacls.errors import MammaclsError

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")

__all__ = ["CLASSES", "MammaclsError", "__version__"]
