"""Model files, read without torch: finding a model, its metadata record, its integrity.

A model is a folder holding ``model.safetensors`` and ``metadata.json`` (arch,
classes, input size, normalisation, calibration, refusal thresholds, training
config, metrics, versions and the weights' sha256). The metadata is also in the
safetensors header, so a lone ``.safetensors`` file still describes itself; the
header is parsed here as the JSON it is (8-byte length, then JSON), so reading it
needs neither torch nor any tensor. Model files are never unpickled.
Writing and loading weights into networks is ``mammacls.weights`` (torch).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mammacls import CLASSES
from mammacls.archs import ARCHS
from mammacls.errors import MammaclsError
from mammacls.store import atomic_write_json, models_dir

MODEL_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "mammacls-model/1"
HEADER_KEY = "mammacls"
OVERLAY_FILE = "overlay.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

def shipped_weights_dir() -> Path:
    """The ``weights/`` folder: inside the installed package, or the repo's own."""
    package = Path(__file__).resolve().parents[1]  # mammacls/
    packaged = package / "weights"
    if packaged.is_dir():
        return packaged
    return package.parents[1] / "weights"  # a source checkout: src/mammacls -> the repository


def derived_dir(metadata: dict[str, Any]) -> Path:
    """Cache folder for what is derived from a read-only model, keyed by its weights' sha256."""
    from mammacls.store import cache_dir

    return cache_dir() / "derived" / f"{metadata.get('name') or 'model'}-{str(metadata.get('sha256'))[:16]}"


def shipped_ref(why: str) -> ModelRef:
    shipped = shipped_model_dir()
    if shipped is None:
        raise MammaclsError("no shipped default model in this installation; run mammacls train")
    meta = read_metadata(shipped)
    overlay = derived_dir(meta) / OVERLAY_FILE
    if overlay.is_file():
        try:
            meta.update(json.loads(overlay.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise MammaclsError(f"cannot read {overlay} ({exc}); delete it to use the shipped files alone") from None
    return ModelRef("default", shipped / MODEL_FILE, meta, "shipped", why)


def shipped_model_dir() -> Path | None:
    folder = shipped_weights_dir() / "default"
    return folder if (folder / METADATA_FILE).is_file() and (folder / MODEL_FILE).is_file() else None


@dataclass
class ModelRef:
    name: str
    weights: Path
    metadata: dict[str, Any]
    source: str  # "cache", "file" or "shipped"
    why: str = ""  # how it was chosen, for the one line predict prints

    @property
    def read_only(self) -> bool:
        """The shipped model lives inside the installed package, which is never written to."""
        return self.source == "shipped"

    @property
    def files_dir(self) -> Path:
        """Where files derived from this model (ONNX export, refitted densities) are written."""
        return derived_dir(self.metadata) if self.read_only else self.weights.parent

    def file(self, name: str) -> Path:
        """A file of the model: a derived copy in the cache first (read-only models), else beside the weights."""
        derived = self.files_dir / name
        return derived if self.read_only and derived.is_file() else self.weights.parent / name

    def update_metadata(self, changes: dict[str, Any]) -> None:
        """Record ``changes``: in metadata.json beside the weights, or for a read-only model in its
        overlay in the cache, which is merged whenever the model is opened."""
        target = self.files_dir / (OVERLAY_FILE if self.read_only else METADATA_FILE)
        current = json.loads(target.read_text(encoding="utf-8")) if target.is_file() else {}
        current.update(changes)
        atomic_write_json(target, current)
        self.metadata.update(changes)

    def describe(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "name": self.name, "source": self.source, "path": str(self.weights), "arch": meta.get("arch"),
            "img_size": meta.get("img_size"), "classes": meta.get("classes"),
            "sha256": meta.get("sha256"), "val_metrics": meta.get("val_metrics"),
            "pretrained": (meta["pretrained"].get("weights") if isinstance(meta.get("pretrained"), dict)
                           else meta.get("pretrained")),
            "mask_guided": bool(meta.get("mask_guided")), "members": ensemble_size(meta),
        }


def list_cached_models() -> list[ModelRef]:
    root = models_dir()
    refs = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if (folder / METADATA_FILE).is_file() and (folder / MODEL_FILE).is_file():
                try:
                    refs.append(ModelRef(folder.name, folder / MODEL_FILE, read_metadata(folder), "cache"))
                except MammaclsError:
                    continue  # a half-written or foreign folder is not a model
    return refs


def read_metadata(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MammaclsError(f"cannot read model metadata {path}: {exc}") from None
    return _validated(meta, path)


def _validated(meta: Any, where: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MammaclsError(f"{where} is not a mammacls model record")
    if meta.get("arch") not in ARCHS:
        raise MammaclsError(f"{where}: unknown architecture {meta.get('arch')!r}")
    if list(meta.get("classes", [])) != list(CLASSES):
        raise MammaclsError(f"{where}: classes {meta.get('classes')} are not {list(CLASSES)}")
    if not isinstance(meta.get("img_size"), int) or meta["img_size"] < 8:
        raise MammaclsError(f"{where}: bad input size {meta.get('img_size')!r}")
    return meta


def safetensors_header(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (its header is 8 bytes of length, then JSON)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if not 0 < length <= _MAX_HEADER:
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise MammaclsError(f"{path} is not a valid safetensors file ({str(exc)[:100]})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _header_metadata(path: Path) -> dict[str, Any]:
    header = safetensors_header(path)
    if HEADER_KEY not in header:
        raise MammaclsError(f"{path} carries no mammacls metadata (and no {METADATA_FILE} beside it)")
    try:
        return _validated(json.loads(header[HEADER_KEY]), path)
    except json.JSONDecodeError:
        raise MammaclsError(f"{path}: damaged mammacls metadata in the file header") from None


def resolve_model(spec: str | None) -> ModelRef:
    """Find a model by cache name, path or ``default`` (shipped); with no ``spec``, the model chosen
    with ``mammacls use``, else the shipped one. Never a silent switch: ``ref.why`` says which rule picked it."""
    from mammacls.store import chosen_model

    if spec is None:
        chosen = chosen_model()
        if chosen is None:
            return shipped_ref("the shipped model; choose another with --model NAME or mammacls use NAME")
        try:
            ref = resolve_model(chosen)
        except MammaclsError:
            raise MammaclsError(f"the model chosen with 'mammacls use' ({chosen}) is gone: "
                                "run mammacls use default, or mammacls use NAME") from None
        ref.why = "chosen with mammacls use; mammacls use default returns to the shipped model"
        return ref
    if spec == "default":
        return shipped_ref("--model default")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise MammaclsError(f"{path} holds no {MODEL_FILE}")
        return ModelRef(path.name, path / MODEL_FILE, read_metadata(path), "file", "--model")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise MammaclsError(
                f"{path} is not a .safetensors model: mammacls only loads safetensors (it never unpickles files)"
            )
        beside = path.parent / METADATA_FILE
        if beside.is_file():
            meta = read_metadata(path.parent)
            if meta.get("weights_file") == path.name:
                return ModelRef(path.stem, path, meta, "file", "--model")
        return ModelRef(path.stem, path, _header_metadata(path), "file", "--model")
    cached_dir = models_dir() / spec
    if "/" not in spec and (cached_dir / METADATA_FILE).is_file():
        return ModelRef(spec, cached_dir / MODEL_FILE, read_metadata(cached_dir), "cache", "--model")
    names = [ref.name for ref in list_cached_models()]
    import difflib

    close = difflib.get_close_matches(spec, [*names, "default"], n=1)
    raise MammaclsError(f"no model named {spec!r}: not a file, folder or cached model"
                        + (f"; did you mean {close[0]}?" if close else f" (cached: {', '.join(names) or 'none'})"))


def ensemble_size(metadata: dict[str, Any]) -> int:
    """How many member networks a model holds (1 for a single network)."""
    return int((metadata.get("ensemble") or {}).get("members", 1))


def metadata_matching(ref: ModelRef, digest: str, seconds: float = 3.0) -> dict[str, Any]:
    """The metadata that belongs to weights of ``digest``: a training run replaces the weights, then the
    metadata, so a reader between the two waits briefly for the second; anything else is damage."""
    import time

    folder = ref.weights.parent
    deadline = time.monotonic() + seconds
    while ref.source == "cache" and (folder / METADATA_FILE).is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            fresh = read_metadata(folder)
        except MammaclsError:
            continue  # caught mid-write
        if fresh.get("sha256") == digest:
            return fresh
    raise MammaclsError(f"{ref.weights} does not match the sha256 in its metadata: the file is corrupt or was modified")
