"""Model files, read without torch: finding a model, its card, its sibling files, its integrity.

A model is a folder holding ``model.safetensors`` and ``metadata.json`` (a
:class:`~mammacls.inference.card.ModelCard`), plus sibling files the card names (history,
train/validation fingerprints, ONNX export, refusal densities). The card is also in the
safetensors header, so a lone ``.safetensors`` file still describes itself; the header is parsed
here as the JSON it is (8-byte length, then JSON), so reading it needs neither torch nor any tensor.
Model files are never unpickled. Writing weights and loading them into networks is
``mammacls.nets.weights`` (torch).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mammacls import CLASSES
from mammacls.errors import MammaclsError, param
from mammacls.inference.card import (DIGEST_KEY, MODEL_FILE, SCHEMA, ModelCard, RunGroup, parse_record,
                                    without_machine_specific)
from mammacls.store import atomic_path, atomic_write_json, cache_dir, models_dir, sha256_file

METADATA_FILE = "metadata.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
HEADER_KEY = "mammacls"
OVERLAY_FILE = "overlay.json"
INHERITED = "inherited_fingerprints"  # training_data key: what the models a model started from saw
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

def shipped_weights_dir() -> Path:
    """The ``weights/`` folder: inside the installed package, or the repo's own."""
    package = Path(__file__).resolve().parents[1]  # mammacls/
    packaged = package / "weights"
    if packaged.is_dir():
        return packaged
    return package.parents[1] / "weights"  # a source checkout: src/mammacls -> the repository


def derived_dir(card: ModelCard) -> Path:
    """Cache folder for what is derived from a read-only model, keyed by its weights' sha256."""
    return cache_dir() / "derived" / f"{card.name or 'model'}-{card.weights.sha256[:16]}"


def shipped_ref(why: str) -> ModelRef:
    shipped = shipped_model_dir()
    if shipped is None:
        raise MammaclsError("no shipped default model in this installation; run mammacls train")
    ref = folder_ref(shipped, "default", "shipped", why)
    overlay = derived_dir(ref.card) / OVERLAY_FILE
    if overlay.is_file():
        try:
            sections = json.loads(overlay.read_text(encoding="utf-8"))
            base = {k: v for k, v in ref.card.to_record().items() if k != DIGEST_KEY}  # the overlay has none
            ref.card = ModelCard.from_record({**base, **sections}, overlay)
        except (OSError, json.JSONDecodeError, MammaclsError) as exc:
            raise MammaclsError(f"cannot read {overlay} ({exc}); delete it to use the shipped files alone") from None
    return ref


def shipped_model_dir() -> Path | None:
    folder = shipped_weights_dir() / "default"
    return folder if (folder / METADATA_FILE).is_file() and (folder / MODEL_FILE).is_file() else None


@dataclass
class ModelRef:
    name: str
    weights: Path
    card: ModelCard
    source: str  # "cache", "file" or "shipped"
    why: str = ""  # how it was chosen, for the one line predict prints
    # sibling-file contents of a schema-1 model, which kept them inside its one record
    legacy_sidecars: dict[str, Any] = field(default_factory=dict)

    @property
    def read_only(self) -> bool:
        """The shipped model lives inside the installed package, which is never written to."""
        return self.source == "shipped"

    @property
    def spec(self) -> str:
        """What to pass as ``--model`` to name this model again (hints in messages)."""
        if self.source in ("shipped", "cache"):
            return "default" if self.source == "shipped" else self.name
        return str(self.weights.parent if (self.weights.parent / METADATA_FILE).is_file() else self.weights)

    @property
    def files_dir(self) -> Path:
        """Where files derived from this model (ONNX export, refitted densities) are written."""
        return derived_dir(self.card) if self.read_only else self.weights.parent

    def file(self, name: str) -> Path:
        """A file of the model: a derived copy in the cache first (read-only models), else beside the weights."""
        derived = self.files_dir / name
        return derived if self.read_only and derived.is_file() else self.weights.parent / name

    def sidecar(self, kind: str) -> Any:
        """The contents of a sibling file the card names (``history``, ``training_data``), or None."""
        if kind in self.legacy_sidecars:
            return self.legacy_sidecars[kind]
        name = self.card.sidecars.get(kind)
        path = self.weights.parent / name if name else None
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MammaclsError(f"cannot read {path}: {exc}") from None

    def update_card(self, **sections: Any) -> None:
        """Replace whole card sections (``calibration=...``, ``onnx=...``): in metadata.json beside the
        weights, or for a read-only model in its overlay in the cache, merged whenever it is opened."""
        card = self.card.replace(**sections)
        record = card.to_record()
        if self.read_only:
            target = self.files_dir / OVERLAY_FILE
            current = json.loads(target.read_text(encoding="utf-8")) if target.is_file() else {}
            atomic_write_json(target, {**current, **{name: record[name] for name in sections}})
        else:
            atomic_write_json(self.weights.parent / METADATA_FILE, record)
        self.card = card

    def describe(self) -> dict[str, Any]:
        return self.summary().to_record()

    def summary(self) -> ModelSummary:
        card = self.card
        pretrained = card.provenance.pretrained
        return ModelSummary(
            name=self.name, source=self.source, path=str(self.weights), arch=card.arch, img_size=card.img_size,
            classes=tuple(card.classes), sha256=card.weights.sha256, members=card.members,
            val_metrics=card.training.val_metrics,
            pretrained=pretrained.get("weights") if isinstance(pretrained, dict) else pretrained,
            mask_guided=card.mask_guided, schema=card.schema, finished=card.training.status == "complete",
            calibrated=card.calibration is not None, init=(card.provenance.init or {}).get("model"),
            group=card.training.group)


@dataclass(frozen=True)
class ModelSummary:
    """What a model is, in one record: a model's own (``ModelRef.summary``) or an ensemble that
    ``evaluate`` averages from cross-validation folds (``source`` "ensemble", ``member_names`` its folds).
    ``members``: how many networks the answer averages, always a count."""
    name: str
    source: str
    arch: str
    img_size: int
    members: int
    classes: tuple[str, ...] = CLASSES
    path: str | None = None
    sha256: str | None = None
    val_metrics: dict[str, Any] | None = None
    pretrained: str | None = None
    mask_guided: bool = False
    schema: str | None = None
    finished: bool = True
    calibrated: bool = False
    init: str | None = None
    group: RunGroup | None = None
    member_names: tuple[str, ...] = ()

    @property
    def is_ensemble(self) -> bool:
        return self.members > 1

    def to_record(self) -> dict[str, Any]:
        record = {"name": self.name, "source": self.source, "path": self.path, "arch": self.arch,
                  "img_size": self.img_size, "classes": list(self.classes), "sha256": self.sha256,
                  "val_metrics": self.val_metrics, "pretrained": self.pretrained, "mask_guided": self.mask_guided,
                  "members": self.members, "schema": self.schema, "finished": self.finished,
                  "calibrated": self.calibrated, "init": self.init,
                  "group": None if self.group is None else self.group.to_record()}
        if self.member_names:
            record["member_names"] = list(self.member_names)
        return record


def verify_weights(ref: ModelRef) -> None:
    """The weights file is the one the card names (its sha256), whichever backend runs the model: the ONNX
    path does not read it, but a damaged or replaced file means the card describes another model."""
    if not ref.weights.is_file():
        raise MammaclsError(f"model weights missing: {ref.weights}")
    check_weights_digest(ref, sha256_file(ref.weights))


def check_weights_digest(ref: ModelRef, digest: str) -> None:
    """``digest`` (of the weights as read) is the card's, or ``ref.card`` becomes the card written with it
    (a run between its two writes: wait for it); anything else is refused as damage."""
    expected = ref.card.weights.sha256
    if expected and digest != expected:
        ref.card = card_matching(ref, digest)


def check_finished(ref: ModelRef, allow_unfinished: bool = False) -> None:
    """Refuse a model whose training did not finish (killed, failed): it has weights but no calibration
    and no refusal gate, so its probabilities and statuses would claim what nobody fitted."""
    if ref.card.training.status == "complete" or allow_unfinished:
        return
    from mammacls.store import lock_holders

    folder = ref.weights.parent
    running = lock_holders(f"model-{ref.name}") if ref.source == "cache" else []
    if running:
        raise MammaclsError(f"model {ref.name} is still training ({'; '.join(running)}): wait for it to finish, "
                            f"or pass {param('allow_unfinished')} to use its best epoch so far (flagged)")
    how = (f"continue it with mammacls train --resume --name {ref.name}" if (folder / CHECKPOINT_FILE).is_file()
           else f"train it again (delete {folder} first)")
    raise MammaclsError(f"model {ref.name} did not finish training (no calibration, no refusal gate): {how}, "
                        f"or pass {param('allow_unfinished')} to use it as it is (flagged)")


FINGERPRINT_KEYS = ("sha256", "phash", "thumb", "name")


def seen_fingerprints(ref: ModelRef) -> dict[str, list]:
    """Fingerprints of every image ``ref`` trained or was validated on, and of those the models it was
    started from saw (``train --init``), one entry per sha256: ``sha256``, ``phash``, ``thumb`` (the
    32 x 32 thumbnail, base64) and ``name`` (``source:file``); the last two are None where a model
    older than them did not record them."""
    training_data = ref.sidecar("training_data") or {}
    merged: dict[str, tuple] = {}
    for prints in (training_data.get("train_val_fingerprints"), training_data.get(INHERITED)):
        prints = prints or {}
        count = len(prints.get("sha256", ()))
        columns = [prints.get(key) or [None] * count for key in FINGERPRINT_KEYS]
        for entry in zip(*columns):
            merged.setdefault(entry[0], entry)
    return {key: [entry[k] for entry in merged.values()] for k, key in enumerate(FINGERPRINT_KEYS)}


def list_cached_models() -> list[ModelRef]:
    root = models_dir()
    refs = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if (folder / METADATA_FILE).is_file() and (folder / MODEL_FILE).is_file():
                try:
                    refs.append(folder_ref(folder, folder.name, "cache"))
                except MammaclsError:
                    continue  # a half-written or foreign folder is not a model
    return refs


def _read_record(model_dir: Path) -> Any:
    path = Path(model_dir) / METADATA_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MammaclsError(f"cannot read model metadata {path}: {exc}") from None


def read_card(model_dir: Path) -> ModelCard:
    """The card in ``model_dir/metadata.json``, validated (schema-1 records migrated)."""
    return ModelCard.from_record(_read_record(model_dir), Path(model_dir) / METADATA_FILE)


def folder_ref(folder: Path, name: str, source: str, why: str = "") -> ModelRef:
    """The model in ``folder``; a schema-1 record's bulky parts are kept in memory as its sidecars."""
    card, legacy = parse_record(_read_record(folder), Path(folder) / METADATA_FILE)
    return ModelRef(name, Path(folder) / card.weights.file, card, source, why, legacy)


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


def header_card(path: Path) -> ModelCard:
    """The card a lone ``.safetensors`` file carries in its header."""
    header = safetensors_header(path)
    if HEADER_KEY not in header:
        raise MammaclsError(f"{path} carries no mammacls metadata (and no {METADATA_FILE} beside it)")
    try:
        record = json.loads(header[HEADER_KEY])
    except json.JSONDecodeError:
        raise MammaclsError(f"{path}: damaged mammacls metadata in the file header") from None
    return ModelCard.from_record(record, path).with_weights(file=path.name)


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
        return folder_ref(path, path.name, "file", "--model")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise MammaclsError(
                f"{path} is not a .safetensors model: mammacls only loads safetensors (it never unpickles files)"
            )
        if (path.parent / METADATA_FILE).is_file():
            ref = folder_ref(path.parent, path.stem, "file", "--model")
            if ref.weights.name == path.name:
                return ref
        return ModelRef(path.stem, path, header_card(path), "file", "--model")
    cached_dir = models_dir() / spec
    if "/" not in spec and (cached_dir / METADATA_FILE).is_file():
        return folder_ref(cached_dir, spec, "cache", "--model")
    names = [ref.name for ref in list_cached_models()]
    import difflib

    close = difflib.get_close_matches(spec, [*names, "default"], n=1)
    raise MammaclsError(f"no model named {spec!r}: not a file, folder or cached model"
                        + (f"; did you mean {close[0]}?" if close else f" (cached: {', '.join(names) or 'none'})"))


def card_matching(ref: ModelRef, digest: str, seconds: float = 3.0) -> ModelCard:
    """The card that belongs to weights of ``digest``: a training run replaces the weights, then the
    card, so a reader between the two waits briefly for the second; anything else is damage."""
    import time

    folder = ref.weights.parent
    deadline = time.monotonic() + seconds
    while ref.source == "cache" and (folder / METADATA_FILE).is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            fresh = read_card(folder)
        except MammaclsError:
            continue  # caught mid-write
        if fresh.weights.sha256 == digest:
            return fresh
    raise MammaclsError(f"{ref.weights} does not match the sha256 in its metadata: the file is corrupt or was modified")


def rewrite_header(path: Path, card: ModelCard) -> None:
    """Put ``card`` in the header of the safetensors file ``path``, keeping every tensor byte as it is
    (the header is JSON before the data; tensor offsets count from the data's start)."""
    raw = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["__metadata__"] = {HEADER_KEY: json.dumps(header_record(card))}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def header_record(card: ModelCard) -> dict[str, Any]:
    """What a weights file's header carries: the card without the file's own sha256."""
    record = card.to_record()
    record["weights"]["sha256"] = ""
    del record[DIGEST_KEY]  # metadata.json carries the card's digest; the header is covered by the file's sha256
    return record


def migrate_model_folder(folder: Path) -> ModelCard:
    """Rewrite a schema-1 model folder as schema 2: the card in ``metadata.json`` and the weights'
    header, the bulky parts in sibling files, machine-specific paths dropped. Tensors are untouched."""
    folder = Path(folder)
    record = _read_record(folder)
    card, sidecars = parse_record(record, folder / METADATA_FILE)
    if record.get("schema") == SCHEMA:
        return card  # already schema 2
    for kind, value in sidecars.items():
        if kind == "training_data":
            value = without_machine_specific(value)
        atomic_write_json(folder / card.sidecars[kind], value)
    weights = folder / card.weights.file
    rewrite_header(weights, card)
    card = card.with_weights(sha256=sha256_file(weights))
    atomic_write_json(folder / METADATA_FILE, card.to_record())
    return card
