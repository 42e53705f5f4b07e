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
from mammacls.inference.probabilities import softmax


class NetworkRunner(Protocol):
    """What runs the network on uint8 N x S x S batches: ONNX Runtime (``OnnxBackend``) or PyTorch
    (``mammacls.runtime.TorchBackend``, which is also an ``ExplainingRunner``)."""
    name: str

    def logits(self, batch: np.ndarray) -> np.ndarray: ...

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


class ExplainingRunner(NetworkRunner, Protocol):
    """A runner with gradients and the lesion decoder: Grad-CAM and lesion maps (PyTorch only)."""

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits, Grad-CAM heatmaps of the predicted classes (peak 1) and penultimate features."""
        ...

    def lesion_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits, lesion probability maps and penultimate features (mask-guided models)."""
        ...


@dataclass(frozen=True)
class Prediction:
    """One answer. ``status``: ok, uncertain (below the model's confidence floor), rejected
    (the gate's ``reason``: not judged, ignore ``label``) or error (unreadable input).

    A DICOM cine loop's answer summarises its ``frames`` (``frame_status``, ``frame_votes``); a frame's
    own answer names its ``file`` and ``frame`` (from 1). Explanations, when asked for, are PNGs: a path
    (``predict --explain``) or a data URI (``mammacls serve``). ``to_record`` is the JSON record of
    ``predict --json`` (schema ``mammacls-predictions/1``)."""
    source: str
    label: str | None
    probabilities: dict[str, float] | None
    status: str
    reason: str | None = None
    ood_distance: float | None = None
    frames: tuple[Prediction, ...] = ()  # a cine loop's frames; the loop's answer is their summary
    file: str | None = None
    frame: int | None = None
    frame_status: dict[str, int] | None = None
    frame_votes: dict[str, int] | None = None
    explanation: str | None = None
    lesion_map: str | None = None
    lesion_area_fraction: float | None = None  # of the image the lesion map covers; None: no lesion drawn

    @property
    def accepted(self) -> bool:
        return self.status in ("ok", "uncertain")

    @property
    def is_cine(self) -> bool:
        return self.frame_status is not None

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["frames"] = [frame.to_dict() for frame in self.frames]
        return record

    def to_record(self) -> dict[str, Any]:
        """The JSON record: an image or frame, a cine loop's summary, or an unreadable input's error."""
        if self.status == "error":
            return {"path": self.source, "error": self.reason}
        record: dict[str, Any] = {"path": self.source}
        if self.is_cine:
            record["frames"] = len(self.frames)
        if self.frame is not None:
            record.update(file=self.file, frame=self.frame)
        record.update(label=self.label, status=self.status, reason=self.reason, probabilities=self.probabilities)
        if self.is_cine:
            record["frame_status"] = self.frame_status
            if self.frame_votes is not None:
                record["frame_votes"] = self.frame_votes
        if self.ood_distance is not None:
            record["ood_distance"] = self.ood_distance
        if self.explanation is not None:
            record["explanation"] = self.explanation
        if self.lesion_map is not None:
            record.update(lesion_area_fraction=self.lesion_area_fraction, lesion_map=self.lesion_map)
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
    backend: NetworkRunner | None  # None: only ``classify(frames, outputs=...)`` on outputs computed elsewhere
    calibrated: bool = True
    keep_originals: bool = False
    density: dict[str, np.ndarray] | None = field(init=False)

    def __post_init__(self) -> None:
        self.density = model_density(self.ref)

    @property
    def temperature(self) -> float:
        return self.ref.card.temperature if self.calibrated else 1.0

    @property
    def class_temperatures(self) -> list[float] | None:
        calibration = self.ref.card.calibration
        per_class = calibration.class_temperatures if self.calibrated and calibration else None
        return None if per_class is None else list(per_class)

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
                "temperature": self.temperature, "class_temperatures": self.class_temperatures,
                "min_confidence": self.min_confidence,
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

    def classify(self, frames: list[Frame], *, outputs: tuple | None = None) -> list[Prediction]:
        """One answer per frame, in order. ``outputs`` = (logits, features) when the caller ran the
        network itself (explanations); else the backend runs here."""
        if outputs is None:
            stacked = np.stack([f.resized for f in frames])
            if self.density is not None:
                outputs = self.backend.logits_and_features(stacked)
            else:
                outputs = (self.backend.logits(stacked), None)
        logits, features = outputs
        far = distances(self.density, features) if self.density is not None and features is not None else None
        return [self._answer(item, probs, None if far is None else float(far[k]))
                for k, (item, probs) in enumerate(zip(frames, self.probabilities(logits)))]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities of N x C logits: calibrated as the model's card says, or plain softmax."""
        return self.ref.card.calibrated(logits) if self.calibrated else softmax(logits)

    def _answer(self, item: Frame, probs: np.ndarray, far: float | None) -> Prediction:
        status, reason = status_of(item.reason, far, self.ood_record.threshold if self.ood_record else None,
                                   float(probs.max()), self.min_confidence)
        in_loop = item.frame is not None
        return Prediction(item.key, CLASSES[int(probs.argmax())], {c: round(float(p), 6) for c, p in zip(CLASSES, probs)},
                          status, reason, None if far is None else round(far, 3),
                          file=item.source if in_loop else None, frame=item.frame)

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
        answers = [a for start in range(0, len(flat), batch_size) for a in self.classify(flat[start:start + batch_size])]
        return _assemble(items, per_input, iter(answers))

    def _frames_of_input(self, item: Any, index: int) -> list[Frame]:
        if isinstance(item, (str, os.PathLike)):
            return self.frames_of(Path(item))
        gray, colour = to_grayscale(item, f"images[{index}]")
        return [self.frame(gray, colour, f"<image {index}>")]


def _is_single(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getbands")  # PIL images


def cine_summary(source: str, frames: list[Prediction]) -> Prediction:
    """One answer for a cine loop: the mean probabilities of its frames that were not rejected."""
    accepted = [f for f in frames if f.status != "rejected"]
    statuses = {s: sum(f.status == s for f in frames) for s in ("ok", "uncertain", "rejected")}
    if not accepted:
        return Prediction(source, None, None, "rejected", "every frame was rejected", frames=tuple(frames),
                          frame_status=statuses)
    mean = {c: round(float(np.mean([f.probabilities[c] for f in accepted])), 6) for c in CLASSES}
    status = "ok" if statuses["ok"] else "uncertain"
    return Prediction(source, max(mean, key=mean.get), mean, status,
                      None if status == "ok" else "no frame was confidently classified", frames=tuple(frames),
                      frame_status=statuses, frame_votes={c: sum(f.label == c for f in accepted) for c in CLASSES})


def _assemble(items: Sequence, per_input: list, answers: Iterable[Prediction]) -> list[Prediction]:
    assembled = []
    for index, entry in enumerate(per_input):
        if isinstance(entry, str):
            assembled.append(Prediction(str(items[index]), None, None, "error", entry))
            continue
        mine = [next(answers) for _ in entry]
        assembled.append(mine[0] if entry[0].frame is None else cine_summary(entry[0].source, mine))
    return assembled
