"""The model card: one typed, versioned record of what a model is and how to feed it.

``metadata.json`` beside the weights holds a :class:`ModelCard` (schema ``mammacls-model/2``), parsed
and validated once when a model is opened; code reads attributes, never string keys. Bulky data live
in sibling files named in ``card.sidecars``: the per-epoch history (``history.json``) and the
train/validation fingerprints (``training_data.json``, which evaluate's overlap guard and
``calibrate`` read). Records of schema 1 (mammacls 0.1 and 0.2) are migrated when read.
Shaped after timm's ``PretrainedCfg``, torchvision's ``Weights`` and MONAI's bundle metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mammacls import CLASSES
from mammacls.archs import ARCHS
from mammacls.errors import MammaclsError

SCHEMA_VERSION = 2
SCHEMA = f"mammacls-model/{SCHEMA_VERSION}"
LEGACY_SCHEMAS = ("mammacls-model/1",)
MODEL_FILE = "model.safetensors"
# Each kind of bulky data and the sibling file of metadata.json that holds it.
SIDECAR_FILES = {"history": "history.json", "training_data": "training_data.json"}
# Why a model may not be shipped as it is: keys that only make sense on the machine that trained it.
MACHINE_SPECIFIC = ("prepared_dir",)
# One grey channel normalised with the mean of ImageNet's per-channel statistics: every channel of a
# replicated grey image then carries the same value, so summing the pretrained RGB filters is exact.
GRAY_MEAN = 0.449
GRAY_STD = 0.226
INTENDED_USE = ("research: classify a 2-D B-mode breast ultrasound image as benign, malignant or normal, "
                "with refusals for what the model cannot judge; not a medical device")
Status = Literal["training", "complete"]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input: grayscale, square resize, then (x/255 - mean) / std."""

    img_size: int
    in_chans: int = 1
    mean: tuple[float, ...] = (GRAY_MEAN,)
    std: tuple[float, ...] = (GRAY_STD,)
    resize: str = "area (shrink) / bilinear (enlarge), square resize"
    input_range: str = "grayscale uint8 / 255"

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, self.img_size, self.img_size)


@dataclass(frozen=True)
class WeightsInfo:
    file: str = MODEL_FILE
    sha256: str = ""  # filled in when the file is written
    storage_dtype: str = "float32"
    members: int = 1  # networks averaged (an ensemble) or 1
    lesion_decoder: bool = False  # mask-guided training kept each member's lesion decoder


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    # one temperature per predicted class (CLASSES order), or None: ``temperature`` for every image
    class_temperatures: tuple[float, ...] | None = None
    malignant_threshold_spec90: float | None = None  # on calibrated probabilities
    malignant_threshold_spec90_raw: float | None = None
    method: str = "temperature scaling"
    fitted_on: str = "val"
    val_before: dict[str, float] | None = None
    val_after: dict[str, float] | None = None

    def malignant_threshold(self, calibrated: bool) -> float | None:
        return self.malignant_threshold_spec90 if calibrated else self.malignant_threshold_spec90_raw

    def describe(self, label: str = "temperature ") -> str:
        """``temperature 0.70``, or the temperature of each answer."""
        from mammacls.inference.probabilities import describe_temperatures

        return describe_temperatures(self.temperature, self.class_temperatures, label)

    def probabilities(self, logits):
        """Calibrated class probabilities of N x C logits."""
        from mammacls.inference.probabilities import calibrated_softmax

        return calibrated_softmax(logits, self.temperature, self.class_temperatures)


@dataclass(frozen=True)
class OodDensity:
    """The out-of-distribution densities file and its thresholds (``mammacls.training.refusal`` fits them)."""

    file: str
    sha256: str
    threshold: float
    image_threshold: float | None = None
    member_thresholds: tuple[float, ...] | None = None
    spread: float | None = None
    dims: int | None = None
    members: int | None = None
    method: str | None = None
    colour_limit: float | None = None
    min_side: int | None = None
    min_std: float | None = None


@dataclass(frozen=True)
class Refusal:
    """When predict answers ``uncertain`` (confidence below ``min_confidence``) or ``rejected`` (``ood``)."""

    min_confidence: float | None = None
    ood: OodDensity | None = None


@dataclass(frozen=True)
class OnnxExport:
    file: str
    sha256: str
    opset: int
    input: str = "image"
    output: str = "logits"
    features: str | None = None  # penultimate features, for the refusal gate
    exported_with: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Provenance:
    """Where the model came from: ImageNet start, data summary (no paths), library versions."""

    pretrained: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)  # manifest sha256, image counts per source and class
    versions: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    processes: dict[str, Any] | None = None
    finished: str | None = None
    intended_use: str = INTENDED_USE
    compute: dict[str, Any] | None = None  # how it was trained: precision, memory format, threads (nets.compute)
    init: dict[str, Any] | None = None  # the model it started from (train --init): name, sha256, its own lineage


@dataclass(frozen=True)
class RunGroup:
    """The run a model belongs to: a cross-validation fold or a seed repeat (``member`` of ``of``), or,
    in evaluate, the ensemble of a run's folds (kind ``cv-ensemble``, ``member`` None)."""
    kind: str  # cv | repeat | cv-ensemble
    run: str
    member: int | None
    of: int

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainingSummary:
    status: Status = "training"
    config: dict[str, Any] = field(default_factory=dict)  # TrainConfig as a dict
    selection: str = ""
    best_epoch: int | None = None
    epochs_run: int | None = None
    val_metrics: dict[str, Any] | None = None
    group: RunGroup | None = None  # a cross-validation fold or seed repeat
    ensemble: dict[str, Any] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # anything else a builder recorded (recipe search, ...)


@dataclass(frozen=True)
class ModelCard:
    name: str
    arch: str
    preprocessing: Preprocessing
    weights: WeightsInfo = field(default_factory=WeightsInfo)
    classes: tuple[str, ...] = CLASSES
    calibration: Calibration | None = None
    refusal: Refusal = field(default_factory=Refusal)
    onnx: OnnxExport | None = None
    provenance: Provenance = field(default_factory=Provenance)
    training: TrainingSummary = field(default_factory=TrainingSummary)
    sidecars: dict[str, str] = field(default_factory=dict)  # kind -> file name beside metadata.json
    schema: str = SCHEMA

    @property
    def img_size(self) -> int:
        return self.preprocessing.img_size

    @property
    def temperature(self) -> float:
        return self.calibration.temperature if self.calibration else 1.0

    def calibrated(self, logits):
        """Class probabilities of N x C logits under this model's calibration (none: plain softmax)."""
        from mammacls.inference.probabilities import softmax

        return self.calibration.probabilities(logits) if self.calibration else softmax(logits)

    @property
    def mask_guided(self) -> bool:
        return self.weights.lesion_decoder

    @property
    def members(self) -> int:
        return self.weights.members

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    def with_weights(self, **changes: Any) -> ModelCard:
        """The card with fields of its weights section changed (``sha256=...``, ``file=...``)."""
        return self.replace(weights=dataclasses.replace(self.weights, **changes))

    def to_record(self) -> dict[str, Any]:
        """The JSON form written to ``metadata.json`` (and, without ``sha256``, the weights' header), with
        the digest of its own content: a hand edit (a temperature, a threshold) is then refused."""
        record = dataclasses.asdict(self)
        record = {"schema": record.pop("schema"), **record}
        return {**record, DIGEST_KEY: card_digest(record)}

    @classmethod
    def from_record(cls, record: Any, where: Path | str) -> ModelCard:
        """Parse and validate a record of any known schema; one clear line for anything else."""
        return parse_record(record, where)[0]


DIGEST_KEY = "digest"


def card_digest(record: dict[str, Any]) -> str:
    """sha256 of a card record's canonical JSON, its own digest left out."""
    import hashlib
    import json

    content = {key: value for key, value in record.items() if key != DIGEST_KEY}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_record(record: Any, where: Path | str) -> tuple[ModelCard, dict[str, Any]]:
    """The card in ``record`` (of any schema this mammacls reads, validated) and, for a schema-1 record,
    the bulky parts it held itself, by sidecar kind (else ``{}``); one clear line for anything else."""
    sidecars: dict[str, Any] = {}
    if isinstance(record, dict) and record.get("format") in LEGACY_SCHEMAS:
        record, sidecars = migrate_v1(record)
    if not isinstance(record, dict) or "schema" not in record:
        raise MammaclsError(f"{where} is not a mammacls model record")
    if record["schema"] != SCHEMA:
        raise MammaclsError(f"{where}: model schema {record['schema']!r} is not one this mammacls reads "
                            f"({SCHEMA}); upgrade mammacls")
    stored = record.get(DIGEST_KEY)
    record = {key: value for key, value in record.items() if key != DIGEST_KEY}
    try:
        card = _build(ModelCard, record)
    except UnknownFields as exc:  # the same schema with a field added later (e.g. class_temperatures)
        raise MammaclsError(f"{where}: damaged model record, or one written by a newer mammacls ({exc}); "
                            "if it is newer, upgrade mammacls") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise MammaclsError(f"{where}: damaged model record ({str(exc)[:120]})") from None
    _check(card, where)
    if stored is not None and stored != card_digest(record):  # records without one predate it
        raise MammaclsError(f"{where} was changed after it was written (its digest does not match its content): "
                            "restore it; a model's calibration is refitted with mammacls calibrate, not by hand")
    return card, sidecars


def without_machine_specific(training_data: dict[str, Any]) -> dict[str, Any]:
    """The ``training_data`` sidecar as it may travel: without paths of the machine that trained it."""
    return {key: value for key, value in training_data.items() if key not in MACHINE_SPECIFIC}


class UnknownFields(ValueError):
    """A record holds fields this mammacls's dataclasses do not have."""


def _build(cls, values: dict[str, Any]):
    """A dataclass from its JSON form, nested dataclasses and tuples included (unknown keys refused)."""
    import typing

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise UnknownFields(f"unknown {cls.__name__} fields {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        nested = next((arg for arg in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(arg)), None)
        if nested is not None and isinstance(value, dict):
            value = _build(nested, value)
        elif isinstance(value, list) and "tuple" in str(hint):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _check(card: ModelCard, where: Path | str) -> None:
    if card.arch not in ARCHS:
        raise MammaclsError(f"{where}: unknown architecture {card.arch!r}")
    if tuple(card.classes) != CLASSES:
        raise MammaclsError(f"{where}: classes {list(card.classes)} are not {list(CLASSES)}")
    size = card.preprocessing.img_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise MammaclsError(f"{where}: bad input size {size!r}")
    if card.preprocessing.in_chans != 1 or len(card.preprocessing.mean) != 1 or len(card.preprocessing.std) != 1:
        raise MammaclsError(f"{where}: mammacls models take one grayscale channel")
    if not isinstance(card.weights.members, int) or card.weights.members < 1:
        raise MammaclsError(f"{where}: bad member count {card.weights.members!r}")
    if card.calibration is not None and not card.calibration.temperature > 0:
        raise MammaclsError(f"{where}: bad temperature {card.calibration.temperature!r}")
    per_class = card.calibration.class_temperatures if card.calibration is not None else None
    if per_class is not None and (len(per_class) != len(CLASSES) or not all(t > 0 for t in per_class)):
        raise MammaclsError(f"{where}: bad class temperatures {list(per_class)!r}")


# ------------------------------------------------------------------ schema 1 ---
_V1_PREPROCESSING = {"img_size": "img_size", "in_chans": "in_chans", "mean": "mean", "std": "std",
                     "interpolation": "resize", "input_range": "input_range"}
_V1_CALIBRATION = ("malignant_threshold_spec90", "malignant_threshold_spec90_raw")
_V1_DROPPED = ("format", "num_classes", "input_size", "temperature")  # derivable or duplicated


def migrate_v1(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A schema-1 record (one flat dict, mammacls 0.1-0.2) as a schema-2 record, and the bulky parts
    that now live in sibling files: ``{"history": [...], "training_data": {...}}``."""
    old = dict(record)
    data = dict(old.pop("data", None) or {})
    sidecars: dict[str, Any] = {}
    if "history" in old:
        sidecars["history"] = old.pop("history")
    bulky = {key: data.pop(key) for key in ("train_val_groups", "train_val_fingerprints", *MACHINE_SPECIFIC)
             if key in data}
    if bulky:
        sidecars["training_data"] = bulky
    calibration = dict(old.pop("calibration", None) or {})
    for key in _V1_CALIBRATION:
        if old.get(key) is not None:
            calibration[key] = old[key]
        old.pop(key, None)
    if "temperature" in old and old["temperature"] is not None:
        calibration.setdefault("temperature", old["temperature"])
    ensemble = old.pop("ensemble", None)
    new = {
        "schema": SCHEMA, "name": old.pop("name", None) or "model", "arch": old.pop("arch", None),
        "classes": old.pop("classes", list(CLASSES)),
        "preprocessing": {new_key: old.pop(key) for key, new_key in _V1_PREPROCESSING.items() if key in old},
        "weights": {"file": old.pop("weights_file", MODEL_FILE), "sha256": old.pop("sha256", ""),
                    "storage_dtype": old.pop("storage_dtype", "float32"),
                    "members": int((ensemble or {}).get("members", 1)),
                    "lesion_decoder": bool(old.pop("mask_guided", False))},
        "calibration": calibration or None,
        "refusal": {"min_confidence": old.pop("min_confidence", None), "ood": old.pop("ood", None)},
        "onnx": old.pop("onnx", None),
        "provenance": {"pretrained": old.pop("pretrained", None), "data": data,
                       "versions": old.pop("versions", {}), "device": old.pop("device", None),
                       "processes": old.pop("training_processes", None), "finished": old.pop("finished", None)},
        "training": {"status": old.pop("status", "complete"), "config": old.pop("config", {}),
                     "selection": old.pop("selection", ""), "best_epoch": old.pop("best_epoch", None),
                     "epochs_run": old.pop("epochs_run", None), "val_metrics": old.pop("val_metrics", None),
                     "group": old.pop("group", None), "ensemble": ensemble},
        "sidecars": {kind: SIDECAR_FILES[kind] for kind in sidecars},
    }
    for key in _V1_DROPPED:
        old.pop(key, None)
    if old.get("seed") == new["training"]["config"].get("seed"):
        del old["seed"]  # a copy of the config's; an ensemble's list of member seeds stays
    new["training"]["notes"] = old  # whatever else a builder wrote (recipe search, ranking, ...)
    return new, sidecars
