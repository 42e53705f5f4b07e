"""Grad-CAM and lesion-map overlays beside predictions, drawn with PyTorch: ``predict --explain`` keeps
them as files in a folder, ``mammacls serve`` in memory as data URIs (uploads never touch the disk)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mammacls.inference.predictor import ExplainingRunner, Frame, Prediction, Predictor

# (frame, kind "gradcam" | "lesion", PNG bytes) -> what the record holds: a path or a data URI
Keep = Callable[[Frame, str, bytes], str]


@dataclass
class Overlays:
    """Classify frames through a PyTorch predictor and draw the asked-for overlays for each one."""
    predictor: Predictor  # keep_originals=True: overlays are drawn at full size
    gradcam: bool
    lesion: bool
    keep: Keep

    def classify(self, frames: list[Frame]) -> list[Prediction]:
        runner: ExplainingRunner = self.predictor.backend
        stacked = np.stack([f.resized for f in frames])
        cams = lesion_maps = None
        if self.gradcam:
            logits, cams, features = runner.explain(stacked)
        if self.lesion:  # one pass gives the classes, lesion maps and features
            logits, lesion_maps, features = runner.lesion_maps(stacked)
        answers = self.predictor.classify(frames, outputs=(logits, features))
        explained = []
        for k, (item, answer) in enumerate(zip(frames, answers)):
            drawn: dict[str, Any] = {}
            if cams is not None:
                drawn["explanation"] = self._draw(item, "gradcam", cams[k], answer)
            if lesion_maps is not None:
                lesion = lesion_maps[k]
                if answer.label == "normal":  # a lesion is drawn only where the model sees one
                    lesion, area = np.zeros_like(lesion), None
                else:
                    area = round(float((lesion >= 0.5).mean()), 4)
                drawn.update(lesion_area_fraction=area, lesion_map=self._draw(item, "lesion", lesion, answer))
            explained.append(replace(answer, **drawn))
        return explained

    def _draw(self, item: Frame, kind: str, heat: np.ndarray, answer: Prediction) -> str:
        from mammacls.nets.gradcam import gradcam_panel, lesion_panel

        caption = f"{answer.label} {max(answer.probabilities.values()):.2f}"
        if kind == "lesion" and answer.label == "normal":
            caption += ": no lesion drawn"
        panel = gradcam_panel if kind == "gradcam" else lesion_panel
        return self.keep(item, kind, panel(item.original, heat, caption))


@dataclass
class OverlayFolders:
    """``Keep`` for files: ``NAME.gradcam.png`` / ``NAME.lesion.png`` in their folders, never overwriting
    one written by this run (the same file name from two folders gets ``-2``, ``-3``)."""
    explain_dir: Path | None
    lesion_dir: Path | None
    written: set[str] = field(default_factory=set)

    def __call__(self, item: Frame, kind: str, png: bytes) -> str:
        from mammacls.store import atomic_write_bytes

        folder = self.explain_dir if kind == "gradcam" else self.lesion_dir
        stem = item.path.stem if item.frame is None else f"{item.path.stem}.frame{item.frame}"
        name, k = f"{stem}.{kind}.png", 2
        while str(folder / name) in self.written:
            name, k = f"{stem}.{kind}-{k}.png", k + 1
        self.written.add(str(folder / name))
        atomic_write_bytes(folder / name, png)
        return str(folder / name)


def as_data_uri(_item: Frame, _kind: str, png: bytes) -> str:
    """``Keep`` in memory: the PNG as a data URI, ready for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
