"""What ``evaluate`` finds, as one frozen, typed tree: built once by ``evaluation.evaluate``, read by the
terminal tables, the HTML report and ``--json`` (``Evaluation.to_record``, schema ``mammacls-evaluation/1``).

Field names are the JSON's. A figure that cannot be computed (a class the set lacks) is None; an
interval is (low, high) of a 95 % class-stratified bootstrap, or None. ``to_record`` is the only place
that turns the tree into dictionaries, in the key order the JSON has always had.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from mammacls.inference.card import RunGroup
from mammacls.inference.model_files import ModelSummary

Interval = tuple[float, float]


def as_interval(value: Any) -> Interval | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _plain(value: Any) -> Any:
    """Records and tuples as JSON: records by their own ``to_record``, intervals and tuples as lists."""
    if hasattr(value, "to_record"):
        return value.to_record()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _record(obj, *, skip_none: tuple[str, ...] = ()) -> dict[str, Any]:
    """A record's fields in order, as JSON; the fields in ``skip_none`` are left out when None."""
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)
            if not (f.name in skip_none and getattr(obj, f.name) is None)}


class Record:
    """A record of the tree: ``to_record`` gives its fields in order as JSON, leaving out those named in
    ``SKIP_NONE`` when they are None (figures that were not computed have no key)."""
    SKIP_NONE: ClassVar[tuple[str, ...]] = ()

    def to_record(self) -> dict[str, Any]:
        return _record(self, skip_none=self.SKIP_NONE)


@dataclass(frozen=True)
class ClassFigures(Record):
    precision: float | None
    recall: float | None
    f1: float | None
    support: int
    roc_auc: float | None
    recall_ci95: Interval | None = None
    precision_ci95: Interval | None = None


@dataclass(frozen=True)
class Spec90Point:
    """Malignant vs the rest at the threshold that gave 90 % specificity on the validation split."""
    threshold: float
    sensitivity: float | None
    specificity: float | None
    sensitivity_ci95: Interval | None = None


@dataclass(frozen=True)
class MalignantFigures:
    """Malignant vs the rest: at the argmax, and at the validation threshold for 90 % specificity when the
    model has one."""
    sensitivity: float | None
    specificity: float | None
    sensitivity_ci95: Interval | None = None
    specificity_ci95: Interval | None = None
    at_spec90: Spec90Point | None = None

    def to_record(self) -> dict[str, Any]:
        """Flat, in the key order of mammacls-evaluation/1; the threshold's figures only when there is one."""
        at = self.at_spec90
        at_spec90 = {} if at is None else {"threshold_spec90": at.threshold, "sensitivity_at_spec90": at.sensitivity,
                                           "specificity_at_spec90": at.specificity}
        record = {"sensitivity": self.sensitivity, "specificity": self.specificity, **at_spec90,
                  "sensitivity_ci95": _plain(self.sensitivity_ci95), "specificity_ci95": _plain(self.specificity_ci95)}
        if at is not None:
            record["sensitivity_at_spec90_ci95"] = _plain(at.sensitivity_ci95)
        return record


@dataclass(frozen=True)
class HeadlineIntervals(Record):
    accuracy: Interval | None = None
    macro_f1: Interval | None = None
    roc_auc_macro: Interval | None = None

    SKIP_NONE: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "roc_auc_macro")  # absent: not computed


@dataclass(frozen=True)
class CalibrationScores(Record):
    ece: float
    brier: float
    nll: float


@dataclass(frozen=True)
class ReliabilityBin(Record):
    low: float
    high: float
    count: int
    confidence: float | None
    accuracy: float | None


@dataclass(frozen=True)
class CalibrationFigures(Record):
    SKIP_NONE: ClassVar[tuple[str, ...]] = ("class_temperatures",)
    temperature: float
    class_temperatures: tuple[float, ...] | None  # per predicted class (CLASSES order), or None
    applied: bool  # the model's calibration was applied to these probabilities
    before: CalibrationScores
    after: CalibrationScores
    bins_before: tuple[ReliabilityBin, ...]
    bins_after: tuple[ReliabilityBin, ...]


@dataclass(frozen=True)
class Bootstrap(Record):
    resamples: int
    seed: int
    stratified: bool = True
    level: float = 0.95


@dataclass(frozen=True)
class RejectedImage(Record):
    path: str
    reason: str | None


SURE = 0.9  # "wrong and sure": an answer marked ok whose top probability is at least this


@dataclass(frozen=True)
class SureErrors(Record):
    """Of the accepted answers that are wrong (``errors``), those predict marks ok with a top probability
    of at least ``SURE`` (``sure``): the mistakes a reader has no reason to doubt."""
    errors: int
    sure: int

    @property
    def share(self) -> float | None:
        return self.sure / self.errors if self.errors else None

    def to_record(self) -> dict[str, Any]:
        return {"errors": self.errors, "sure": self.sure, "share": self.share, "min_probability": SURE}


@dataclass(frozen=True)
class SelectiveFigures(Record):
    """What predict's refusal gate would do with these images: coverage, and accuracy on what it accepts."""
    coverage_by_source: dict[str, float]
    checked: bool
    coverage: float
    accuracy_accepted: float | None
    coverage_ok: float
    accuracy_ok: float | None
    rejected: int
    uncertain: int
    min_confidence: float | None
    ood_threshold: float | None
    sure_errors: SureErrors
    sure_errors_by_source: dict[str, SureErrors]
    rejected_images: tuple[RejectedImage, ...] = ()


@dataclass(frozen=True)
class SourcePoint:
    """Point figures of one source (only the classes it holds), or their intervals (then each figure is an
    Interval, under the same name)."""
    accuracy: Any = None
    macro_f1: Any = None
    roc_auc_macro: Any = None
    recall: dict[str, Any] = field(default_factory=dict)  # by class the source holds (``recall_<class>``)
    malignant_auc: Any = None
    malignant_sensitivity: Any = None
    malignant_specificity: Any = None
    malignant_sensitivity_at_set_spec90: Any = None
    malignant_sensitivity_at_val_threshold: Any = None
    malignant_specificity_at_val_threshold: Any = None
    present: tuple[str, ...] = field(default=(), compare=False)  # the figures computed (the JSON's keys)

    RECALL: ClassVar[str] = "recall_"

    @classmethod
    def from_figures(cls, figures: dict[str, Any], intervals: bool = False) -> SourcePoint:
        names = {f.name for f in fields(cls)} - {"present", "recall"}
        value = as_interval if intervals else (lambda figure: figure)
        known = {k: value(v) for k, v in figures.items() if k in names}
        recall = {k[len(cls.RECALL):]: value(v) for k, v in figures.items() if k.startswith(cls.RECALL)}
        present = tuple(k for k in figures if k in names or k.startswith(cls.RECALL))
        return cls(**known, recall=recall, present=present)

    def to_record(self) -> dict[str, Any]:
        return {name: _plain(self.recall[name[len(self.RECALL):]] if name.startswith(self.RECALL)
                             else getattr(self, name)) for name in self.present}


@dataclass(frozen=True)
class SourceFigures:
    n: int
    counts: dict[str, int]
    classes_absent: tuple[str, ...]
    predicted_absent: dict[str, float]  # how often the model named a class the source does not hold
    val_threshold_spec90: float | None
    point: SourcePoint
    ci95: SourcePoint

    @classmethod
    def from_figures(cls, figures: dict[str, Any]) -> SourceFigures:
        return cls(figures["n"], figures["counts"], tuple(figures["classes_absent"]), figures["predicted_absent"],
                   figures["val_threshold_spec90"], SourcePoint.from_figures(figures),
                   SourcePoint.from_figures(figures["ci95"], intervals=True))

    def to_record(self) -> dict[str, Any]:
        return {"n": self.n, "counts": self.counts, "classes_absent": list(self.classes_absent),
                "predicted_absent": self.predicted_absent, "val_threshold_spec90": self.val_threshold_spec90,
                **self.point.to_record(), "ci95": self.ci95.to_record()}


@dataclass(frozen=True)
class Metrics(Record):
    n: int
    accuracy: float
    balanced_accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_f1: float
    roc_auc_macro: float | None
    roc_auc_weighted: float | None
    log_loss: float | None
    per_class: dict[str, ClassFigures]
    confusion_matrix: tuple[tuple[int, ...], ...]
    malignant: MalignantFigures
    ci95: HeadlineIntervals
    calibration: CalibrationFigures
    bootstrap: Bootstrap
    selective: SelectiveFigures | None = None
    sources: dict[str, SourceFigures] = field(default_factory=dict)

    @property
    def predicted_counts(self) -> list[int]:
        """How often each class was predicted (the confusion matrix's columns)."""
        return [int(v) for v in np.asarray(self.confusion_matrix).sum(axis=0)]


@dataclass(frozen=True)
class OverlapMatch(Record):
    path: str
    kind: str  # identical | near-duplicate
    matches: str  # the training image it matches
    phash_distance: int
    thumbnail_correlation: float | None = None

    SKIP_NONE: ClassVar[tuple[str, ...]] = ("thumbnail_correlation",)  # fingerprints without thumbnails


@dataclass(frozen=True)
class Overlap(Record):
    """Evaluation images the model trained or validated on."""
    checked: bool
    images: int
    identical: int
    near_duplicate: int
    paths: tuple[str, ...] = ()
    matches: tuple[OverlapMatch, ...] | None = None  # None: an ensemble's, merged from its folds

    SKIP_NONE: ClassVar[tuple[str, ...]] = ("matches",)


@dataclass(frozen=True)
class ModelResult:
    name: str
    model: ModelSummary
    metrics: Metrics
    probabilities: np.ndarray = field(repr=False, compare=False)  # N x 3, as scored (calibrated or not)
    statuses: tuple[str, ...] = ()  # each image's status as predict would give it
    history: tuple[dict[str, Any], ...] = ()  # the training curves
    overlap: Overlap | None = None
    group: RunGroup | None = None

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model.to_record(), "metrics": self.metrics.to_record(),
                "overlap": _plain(self.overlap), "group": _plain(self.group)}


GROUP_COLUMNS = ("val_accuracy", "val_macro_f1", "val_roc_auc_macro", "test_accuracy", "test_macro_f1",
                 "test_roc_auc_macro")


@dataclass(frozen=True)
class GroupRow:
    name: str
    member: int
    values: tuple[float | None, ...]  # GROUP_COLUMNS, in order

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "member": self.member, **dict(zip(GROUP_COLUMNS, self.values))}


@dataclass(frozen=True)
class MeanStd(Record):
    mean: float | None
    std: float


@dataclass(frozen=True)
class GroupSummary:
    """A cross-validation or repeat run: validation and test figures per member, mean and spread."""
    run: str
    kind: str
    members: tuple[GroupRow, ...]
    summary: tuple[MeanStd, ...]  # GROUP_COLUMNS, in order

    def to_record(self) -> dict[str, Any]:
        return {"run": self.run, "kind": self.kind, "members": [row.to_record() for row in self.members],
                "summary": {c: s.to_record() for c, s in zip(GROUP_COLUMNS, self.summary)}}


@dataclass(frozen=True)
class DroppedImage:
    """An image left out (``--drop-overlap``) because ``model`` trained or validated on it."""
    model: str
    match: OverlapMatch

    def to_record(self) -> dict[str, Any]:
        return {"model": self.model, **self.match.to_record()}


@dataclass(frozen=True)
class SkippedFile(Record):
    path: str
    reason: str


@dataclass(frozen=True)
class DataSummary(Record):
    description: str
    n: int
    counts: dict[str, int]
    classes_absent: tuple[str, ...]
    sources: dict[str, int]
    skipped: tuple[SkippedFile, ...]  # unreadable rows and files, each named
    dropped_overlap: tuple[DroppedImage, ...]

    @property
    def shows_sources(self) -> bool:
        """Per-source figures matter when there are several sources or the set lacks a class."""
        return len(self.sources) > 1 or bool(self.classes_absent)


@dataclass(frozen=True)
class Evaluation:
    data: DataSummary
    models: tuple[ModelResult, ...]
    groups: tuple[GroupSummary, ...]
    calibrated: bool
    report: str | None = None  # the HTML report, when one was written

    def to_record(self) -> dict[str, Any]:
        from mammacls.schemas import EVALUATION

        record = {"schema": EVALUATION, "data": self.data.to_record(),
                  "models": [m.to_record() for m in self.models], "groups": [g.to_record() for g in self.groups],
                  "calibrated": self.calibrated}
        if self.report is not None:
            record["report"] = self.report
        return record
