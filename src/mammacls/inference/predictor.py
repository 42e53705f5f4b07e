"""A model opened for prediction: calibration, the refusal gate and a backend, in one object.

``Predictor.predict`` takes paths (images or DICOM), PIL images or numpy arrays and
returns typed ``Prediction``s; the CLI's ``predict`` streams files through the same
``frames_of`` / ``classify`` steps, so the accept / reject logic exists once. Nothing here
imports torch: the backend is handed in (``mammacls.load_model`` chooses ONNX Runtime or,
for a model without an export or on a GPU, PyTorch).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mammacls import CLASSES
from mammacls.errors import MammaclsError, param
from mammacls.inference.card import OodDensity
from mammacls.inference.gate import distances, image_check, model_density, status_of
from mammacls.inference.images import is_dicom, load_grayscale, resize_square, to_grayscale
from mammacls.inference.pixels import ImageReadError, InMemoryFile
from mammacls.inference.model_files import ModelRef


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of N x C logits, divided by ``temperature`` first (calibration)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Backend(Protocol):
    name: str

    def logits(self, batch: np.ndarray) -> np.ndarray: ...

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass(frozen=True)
class Prediction:
    """One answer. ``status``: ok, uncertain (below the model's confidence floor), rejected
    (the gate's ``reason``: not judged, ignore ``label``) or error (unreadable input)."""
    source: str
    label: str | None
    probabilities: dict[str, float] | None
    status: str
    reason: str | None = None
    ood_distance: float | None = None
    frames: tuple[Prediction, ...] = ()  # a cine loop's frames; the loop's answer is their summary

    @property
    def accepted(self) -> bool:
        return self.status in ("ok", "uncertain")

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["frames"] = [frame.to_dict() for frame in self.frames]
        return record


@dataclass
class Frame:
    """One image to classify: a file, one frame of a cine loop (``frame`` from 1), or an array."""
    source: str
    resized: np.ndarray
    reason: str | None
    frame: int | None = None
    frames: int = 1
    original: np.ndarray | None = None  # full size, kept only when explanations are drawn
    path: Path | InMemoryFile | None = None

    @property
    def key(self) -> str:
        return self.source if self.frame is None else f"{self.source}#frame={self.frame}"


@dataclass
class Predictor:
    ref: ModelRef
    backend: Backend | None  # None: only ``classify(frames, outputs=...)`` on outputs computed elsewhere
    calibrated: bool = True
    keep_originals: bool = False
    density: dict[str, np.ndarray] | None = field(init=False)

    def __post_init__(self) -> None:
        self.density = model_density(self.ref)

    @property
    def temperature(self) -> float:
        return self.ref.card.temperature if self.calibrated else 1.0

    @property
    def min_confidence(self) -> float | None:
        return self.ref.card.refusal.min_confidence if self.calibrated else None

    @property
    def ood_record(self) -> OodDensity | None:
        return self.ref.card.refusal.ood

    @property
    def img_size(self) -> int:
        return self.ref.card.img_size

    def describe(self) -> dict[str, Any]:
        return {**self.ref.describe(), "chosen_by": self.ref.why, "backend": self.backend.name,
                "temperature": self.temperature, "min_confidence": self.min_confidence,
                "ood_threshold": self.ood_record.threshold if self.ood_record else None}

    # ------------------------------------------------------------------ inputs ---

    def frame(self, gray: np.ndarray, colour: float | None, source: str, *, frame: int | None = None,
              frames: int = 1, path: Path | None = None, resized: np.ndarray | None = None) -> Frame:
        """Resize ``gray`` for the network (unless ``resized`` is given) and run the image half of the
        gate on it."""
        resized = resize_square(gray, self.img_size) if resized is None else resized
        reason = image_check(gray, resized, colour, self.density, self.ood_record)
        return Frame(source, resized, reason, frame, frames, gray if self.keep_originals else None, path)

    def frames_of(self, path: Path | InMemoryFile) -> list[Frame]:
        """Every frame of one file (a DICOM cine loop: all of them); ImageReadError if unreadable."""
        path = path if isinstance(path, InMemoryFile) else Path(path)
        if is_dicom(path):
            from mammacls.inference.dicom import iter_frames, open_dicom

            dicom = open_dicom(path)
            stats: dict = {}
            return [self.frame(gray, stats.get("colour_fraction"), str(path), frame=index if dicom.frames > 1 else None,
                               frames=dicom.frames, path=path)
                    for index, gray in enumerate(iter_frames(dicom, stats), start=1)]
        stats = {}
        gray = load_grayscale(path, stats)
        return [self.frame(gray, stats.get("colour_fraction"), str(path), path=path)]

    # ---------------------------------------------------------------- running ---

    def classify(self, frames: list[Frame], *, outputs: tuple | None = None) -> list[dict[str, Any]]:
        """One record per frame, in order. ``outputs`` = (logits, features) when the caller ran the
        network itself (explanations); else the backend runs here."""
        if outputs is None:
            stacked = np.stack([f.resized for f in frames])
            if self.density is not None:
                outputs = self.backend.logits_and_features(stacked)
            else:
                outputs = (self.backend.logits(stacked), None)
        logits, features = outputs
        far = distances(self.density, features) if self.density is not None and features is not None else None
        return [self._record(item, probs, None if far is None else float(far[k]))
                for k, (item, probs) in enumerate(zip(frames, softmax(logits, self.temperature)))]

    def _record(self, item: Frame, probs: np.ndarray, far: float | None) -> dict[str, Any]:
        status, reason = status_of(item.reason, far, self.ood_record.threshold if self.ood_record else None,
                                   float(probs.max()), self.min_confidence)
        record: dict[str, Any] = {"path": item.key}
        if item.frame is not None:
            record.update(file=item.source, frame=item.frame)
        record.update(label=CLASSES[int(probs.argmax())], status=status, reason=reason,
                      probabilities={c: round(float(p), 6) for c, p in zip(CLASSES, probs)})
        if far is not None:
            record["ood_distance"] = round(far, 3)
        return record

    def predict(self, images: Any, *, batch_size: int = 32) -> list[Prediction]:
        """Classify ``images``: one path, PIL image or array, or a sequence of them (mixed is fine).

        Arrays: H x W grayscale (uint8, uint16, or floats in [0, 1]) or H x W x 3/4 uint8 RGB(A).
        One ``Prediction`` per input, in order; an unreadable file gives status ``error``, a DICOM
        cine loop one summary whose ``frames`` hold each frame's answer.
        """
        if batch_size < 1:
            raise MammaclsError(f"{param('batch_size')} must be at least 1")
        items = [images] if _is_single(images) else list(images)
        per_input: list[list[Frame] | str] = []
        for index, item in enumerate(items):
            try:
                per_input.append(self._frames_of_input(item, index))
            except ImageReadError as exc:
                per_input.append(str(exc))
        flat = [f for entry in per_input if not isinstance(entry, str) for f in entry]
        records = [r for start in range(0, len(flat), batch_size) for r in self.classify(flat[start:start + batch_size])]
        return _assemble(items, per_input, iter(records))

    def _frames_of_input(self, item: Any, index: int) -> list[Frame]:
        if isinstance(item, (str, os.PathLike)):
            return self.frames_of(Path(item))
        gray, colour = to_grayscale(item, f"images[{index}]")
        return [self.frame(gray, colour, f"<image {index}>")]


def _is_single(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getbands")  # PIL images


def cine_summary(source: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for a cine loop: the mean probabilities of its frames that were not rejected."""
    accepted = [r for r in records if r["status"] != "rejected"]
    statuses = {s: sum(r["status"] == s for r in records) for s in ("ok", "uncertain", "rejected")}
    summary: dict[str, Any] = {"path": source, "frames": len(records)}
    if not accepted:
        return {**summary, "label": None, "status": "rejected", "reason": "every frame was rejected",
                "probabilities": None, "frame_status": statuses}
    mean = {c: round(float(np.mean([r["probabilities"][c] for r in accepted])), 6) for c in CLASSES}
    status = "ok" if statuses["ok"] else "uncertain"
    return {**summary, "label": max(mean, key=mean.get), "status": status,
            "reason": None if status == "ok" else "no frame was confidently classified",
            "probabilities": mean, "frame_status": statuses,
            "frame_votes": {c: sum(r["label"] == c for r in accepted) for c in CLASSES}}


def _assemble(items: Sequence, per_input: list, records: Iterable[dict[str, Any]]) -> list[Prediction]:
    answers = []
    for index, entry in enumerate(per_input):
        if isinstance(entry, str):
            answers.append(Prediction(str(items[index]), None, None, "error", entry))
            continue
        mine = [next(records) for _ in entry]
        if entry[0].frame is None:
            answers.append(_prediction(mine[0]))
        else:
            summary = cine_summary(entry[0].source, mine)
            answers.append(Prediction(summary["path"], summary["label"], summary["probabilities"], summary["status"],
                                      summary["reason"], frames=tuple(_prediction(r) for r in mine)))
    return answers


def _prediction(record: dict[str, Any]) -> Prediction:
    return Prediction(record["path"], record["label"], record["probabilities"], record["status"], record["reason"],
                      record.get("ood_distance"))
