"""The JSON documents mammacls prints (``--json``) and serves, named and described for scripts.

Each document carries ``"schema"``: its name and version. A version only grows (new fields); a field
that is removed or changes meaning gets a new name. The JSON Schema files beside this module describe
each one (``schema_file``); the tests validate real output against them.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

PREDICTIONS = "mammacls-predictions/1"  # predict --json, and POST /v1/predict of mammacls serve
EVALUATION = "mammacls-evaluation/1"  # evaluate --json, and the report's metrics.json

_FILES = {PREDICTIONS: "predictions.schema.json", EVALUATION: "evaluation.schema.json"}


def schema_file(name: str):
    """The JSON Schema of the document named ``name`` (a Traversable inside the installed package)."""
    return resources.files("mammacls.schemas") / _FILES[name]


def load_schema(name: str) -> dict[str, Any]:
    return json.loads(schema_file(name).read_text(encoding="utf-8"))
