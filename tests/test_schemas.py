"""The --json documents name their schema and validate against the JSON Schema files shipped in the package."""

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mammacls.cli import app
from mammacls.schemas import EVALUATION, PREDICTIONS, load_schema, schema_file
from tests.conftest import schema_errors

jsonschema = pytest.importorskip("jsonschema")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _validator(name: str):
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(name: str, document: dict) -> list[str]:
    _validator(name)  # the schema itself is valid Draft 2020-12
    return schema_errors(name, document)


def test_schema_files_ship_in_the_package_and_name_themselves():
    for name in (PREDICTIONS, EVALUATION):
        schema = load_schema(name)
        assert schema["$id"] == name and schema["properties"]["schema"] == {"const": name}
        assert "mammacls/schemas/" in str(schema_file(name)).replace("\\", "/")


def test_predict_json_validates(cache, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    done = CliRunner().invoke(app, ["predict", str(EXAMPLES), str(broken), "--json"])
    document = json.loads(done.stdout)
    assert document["schema"] == PREDICTIONS and len(document["predictions"]) == 3 and len(document["errors"]) == 1
    assert _errors(PREDICTIONS, document) == []
    # the schema is not vacuous: each of these breaks it
    for damage in (lambda d: d.pop("schema"), lambda d: d["predictions"][0].pop("probabilities"),
                   lambda d: d["predictions"][0].update(status="fine"),
                   lambda d: d["predictions"][0]["probabilities"].update(malignant=1.5),
                   lambda d: d["errors"][0].pop("error"), lambda d: d["model"].update(sha256="abc")):
        damaged = copy.deepcopy(document)
        damage(damaged)
        assert _errors(PREDICTIONS, damaged), damage


def test_evaluate_json_and_the_reports_metrics_validate(tiny_model, use_session_cache, prepared, tmp_path):
    done = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--data", str(prepared[0]), "--json",
                                    "--bootstrap", "100", "--report", "--report-dir", str(tmp_path / "report")])
    assert done.exit_code == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["schema"] == EVALUATION
    assert _errors(EVALUATION, document) == []
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["schema"] == EVALUATION and _errors(EVALUATION, saved) == []
    damaged = copy.deepcopy(document)
    damaged["models"][0]["metrics"]["accuracy"] = 2.0
    del damaged["models"][0]["metrics"]["per_class"]["normal"]
    assert len(_errors(EVALUATION, damaged)) == 2
