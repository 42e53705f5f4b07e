"""Predict: classify image files with a trained (or the shipped) model."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mammacls import CLASSES, __version__
from mammacls.errors import MammaclsError
from mammacls.images import ImageReadError, is_dicom, is_image_name, is_mask_name, load_grayscale, resize_square
from mammacls.results_file import ResultsFile


@dataclass
class Inputs:
    files: list[Path] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    ignored: int = 0  # non-image files and BUSI masks met while walking folders


def collect_inputs(paths: Iterable[Path]) -> Inputs:
    """Expand files and folders (recursively, not following links into loops).

    In folders: images by extension, and DICOM files by extension or, without one
    of the image extensions, by their DICM preamble (archives often have no suffix).
    """
    found = Inputs()
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.files.append(path)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):  # followlinks=False
                dirnames.sort()
                for name in sorted(filenames):
                    candidate = Path(dirpath) / name
                    if (is_image_name(candidate) and not is_mask_name(candidate)) or is_dicom(candidate):
                        add(candidate)
                    else:
                        found.ignored += 1
        elif path.exists():
            add(path)
        else:
            found.errors.append({"path": str(path), "error": "file not found"})
    return found


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` (1 <= K <= N) -> (K, N)."""
    index, sep, count = str(text).partition("/")
    try:
        k, n = int(index), int(count)
    except ValueError:
        k = n = 0
    if not sep or n < 1 or not 1 <= k <= n:
        raise MammaclsError(f"shard {text!r}: use K/N with 1 <= K <= N, e.g. 3/8")
    return k, n


def in_shard(path: Path, shard: tuple[int, int]) -> bool:
    """Deterministic 1/N of the inputs by a hash of the path as given: the same on every machine
    and stable when files are added (an index in a listing would shift)."""
    k, n = shard
    return zlib.crc32(str(path).encode("utf-8", "surrogateescape")) % n == k - 1


@dataclass
class _Frame:
    """One image to classify: a file, or one frame of a cine loop (``frame`` counts from 1)."""
    path: Path
    resized: np.ndarray
    reason: str | None
    frame: int | None = None
    frames: int = 1
    original: np.ndarray | None = None  # full size, kept only for explanations

    @property
    def key(self) -> str:
        return str(self.path) if self.frame is None else f"{self.path}#frame={self.frame}"


@dataclass
class _Run:
    """A model opened for prediction, with its calibration and refusal gate."""
    ref: Any
    runner: Any
    temperature: float
    min_confidence: float | None
    density: Any
    ood_record: dict | None
    explain_dir: Path | None
    lesion_dir: Path | None
    written: set[str] = field(default_factory=set)

    @property
    def keep_originals(self) -> bool:
        return self.explain_dir is not None or self.lesion_dir is not None

    def decode(self, path: Path) -> tuple[Path, list[_Frame], str | None]:
        """Every frame of one file, resized for the model and checked by the image gate."""
        size = int(self.ref.metadata["img_size"])
        frames: list[_Frame] = []
        try:
            if is_dicom(path):
                from mammacls.dicom import iter_frames, open_dicom

                dicom = open_dicom(path)
                stats: dict = {}
                for index, gray in enumerate(iter_frames(dicom, stats), start=1):
                    frames.append(self._frame(path, gray, size, stats.get("colour_fraction"),
                                              index if dicom.frames > 1 else None, dicom.frames))
            else:
                stats = {}
                frames.append(self._frame(path, load_grayscale(path, stats), size, stats.get("colour_fraction")))
        except ImageReadError as exc:
            return path, [], str(exc)
        return path, frames, None

    def _frame(self, path: Path, gray: np.ndarray, size: int, colour: float | None,
               frame: int | None = None, frames: int = 1) -> _Frame:
        from mammacls.ood import image_check

        resized = resize_square(gray, size)
        reason = image_check(gray, resized, colour, self.density, self.ood_record)
        return _Frame(path, resized, reason, frame, frames, gray if self.keep_originals else None)

    def classify(self, frames: list[_Frame]) -> list[dict[str, Any]]:
        """One entry per frame, in order."""
        from mammacls.metrics import softmax
        from mammacls.ood import distances

        stacked = np.stack([f.resized for f in frames])
        features = cams = lesion_maps = None
        if self.explain_dir is not None:
            logits, cams, features = self.runner.explain(stacked, self.ref.metadata["arch"])
        if self.lesion_dir is not None:  # one pass gives the classes, lesion maps and features
            logits, lesion_maps, features = self.runner.lesion_maps(stacked)
        if not self.keep_originals:
            if self.density is not None:
                logits, features = self.runner.logits_and_features(stacked)
            else:
                logits = self.runner.logits(stacked)
        far = distances(self.density, features) if self.density is not None and features is not None else None
        entries = []
        for k, (item, probs) in enumerate(zip(frames, softmax(logits, self.temperature))):
            entry = self._entry(item, probs, None if far is None else float(far[k]))
            if cams is not None:
                entry["explanation"] = str(self._overlay(item, "gradcam", cams[k], entry))
            if lesion_maps is not None:
                self._add_lesion(entry, item, lesion_maps[k])
            entries.append(entry)
        return entries

    def _entry(self, item: _Frame, probs: np.ndarray, far: float | None) -> dict[str, Any]:
        from mammacls.ood import status_of

        status, reason = status_of(item.reason, far, self.ood_record["threshold"] if self.ood_record else None,
                                   float(probs.max()), self.min_confidence)
        entry: dict[str, Any] = {"path": item.key}
        if item.frame is not None:
            entry.update(file=str(item.path), frame=item.frame)
        entry.update(label=CLASSES[int(probs.argmax())], status=status, reason=reason,
                     probabilities={c: round(float(p), 6) for c, p in zip(CLASSES, probs)})
        if far is not None:
            entry["ood_distance"] = round(far, 3)
        return entry

    def _add_lesion(self, entry: dict[str, Any], item: _Frame, lesion: np.ndarray) -> None:
        """A lesion is drawn only where the model sees one."""
        if entry["label"] == "normal":
            lesion, area = np.zeros_like(lesion), None
        else:
            area = round(float((lesion >= 0.5).mean()), 4)
        entry["lesion_area_fraction"] = area
        entry["lesion_map"] = str(self._overlay(item, "lesion", lesion, entry))

    def _overlay(self, item: _Frame, kind: str, heat: np.ndarray, entry: dict[str, Any]) -> Path:
        caption = f"{entry['label']} {max(entry['probabilities'].values()):.2f}"
        if kind == "lesion" and entry["label"] == "normal":
            caption += ": no lesion drawn"
        folder = self.explain_dir if kind == "gradcam" else self.lesion_dir
        stem = item.path.stem if item.frame is None else f"{item.path.stem}.frame{item.frame}"
        return _write_overlay(folder, stem, kind, item.original, heat, caption, self.written)


def cine_summary(path: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for a cine loop: the mean probabilities of its frames that were not rejected."""
    accepted = [e for e in entries if e["status"] != "rejected"]
    statuses = {s: sum(e["status"] == s for e in entries) for s in ("ok", "uncertain", "rejected")}
    summary: dict[str, Any] = {"path": str(path), "frames": len(entries)}
    if not accepted:
        return {**summary, "label": None, "status": "rejected", "reason": "every frame was rejected",
                "probabilities": None, "frame_status": statuses}
    mean = {c: round(float(np.mean([e["probabilities"][c] for e in accepted])), 6) for c in CLASSES}
    label = max(mean, key=mean.get)
    status = "ok" if statuses["ok"] else "uncertain"
    votes = {c: sum(e["label"] == c for e in accepted) for c in CLASSES}
    return {**summary, "label": label, "status": status,
            "reason": None if status == "ok" else "no frame was confidently classified",
            "probabilities": mean, "frame_status": statuses, "frame_votes": votes}


def _open_run(ref, device: str, backend: str, calibrated: bool, explain_dir: Path | None,
              lesion_dir: Path | None, notice) -> _Run:
    from mammacls.ood import model_density
    from mammacls.runtime import open_backend

    if lesion_dir is not None and not ref.metadata.get("mask_guided"):
        raise MammaclsError(f"--lesion-map: model {ref.name} was not trained with --mask-guided, "
                            "so it has no lesion decoder")
    for option, folder, why in (("--explain", explain_dir, "gradients"), ("--lesion-map", lesion_dir, "its decoder")):
        if folder is None:
            continue
        if backend == "onnx":
            raise MammaclsError(f"{option} needs PyTorch ({why}); drop --backend onnx")
        if folder.exists() and not folder.is_dir():
            raise MammaclsError(f"{option} {folder} exists and is not a folder")
        backend = "torch"
    for folder in (explain_dir, lesion_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    runner, hint = open_backend(ref, device, backend)
    if hint and notice:
        notice(hint)
    ood_record = ref.metadata.get("ood")
    return _Run(ref, runner, float(ref.metadata.get("temperature") or 1.0) if calibrated else 1.0,
                ref.metadata.get("min_confidence") if calibrated else None, model_density(ref), ood_record,
                explain_dir, lesion_dir)


def predict_paths(
    paths: Iterable[Path],
    model: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    backend: str = "auto",
    calibrated: bool = True,
    explain_dir: Path | None = None,
    lesion_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    *,
    workers: int | None = None,
    shard: tuple[int, int] | None = None,
    output: Path | None = None,
    resume: bool = False,
    on_error: Callable[[dict[str, str]], None] | None = None,
) -> dict[str, Any]:
    """Predict every image under ``paths``; unreadable files are reported, not fatal.

    On the CPU the model's ONNX export runs in ONNX Runtime (torch is not
    imported); ``device='cuda'``, ``explain_dir`` (Grad-CAM needs gradients) or
    a model without an export uses PyTorch. DICOM cine loops give one prediction
    per frame (``file.dcm#frame=N``) and a summary per file (in ``cine``).

    ``workers`` threads decode (default: every core). ``shard=(K, N)`` keeps a
    deterministic 1/N of the inputs. With ``output`` (.jsonl or .csv) results are
    appended batch by batch instead of returned (constant memory); ``resume``
    skips the inputs the file already answers.
    """
    from mammacls.weights import resolve_model

    if batch_size < 1:
        raise MammaclsError("--batch-size must be at least 1")
    if workers is not None and workers < 1:
        raise MammaclsError("--workers must be at least 1")
    if resume and output is None:
        raise MammaclsError("--resume needs --output (the results file to continue)")
    paths = list(paths)
    inputs = collect_inputs(paths)
    if not inputs.files:  # checked before the model is opened: a typo answers at once
        missing = [e["path"] for e in inputs.errors]
        raise MammaclsError(f"file not found: {', '.join(missing)}" if missing
                            else f"no images found in {', '.join(str(p) for p in paths)}")
    files = [f for f in inputs.files if in_shard(f, shard)] if shard else inputs.files
    sink = ResultsFile(Path(output), resume=resume) if output is not None else None
    try:
        already = len(files)
        if sink is not None:
            files = [f for f in files if str(f) not in sink.done]
        already -= len(files)
        ref = resolve_model(model)
        if sink is not None:
            sink.bind({"model": ref.name, "model_sha256": ref.metadata.get("sha256"), "calibrated": calibrated,
                       "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
                       "mammacls_version": __version__})
        run = _open_run(ref, device, backend, calibrated, *(None if d is None else Path(d)
                                                            for d in (explain_dir, lesion_dir)), notice)
        missing = [e for e in inputs.errors if (not shard or in_shard(Path(e["path"]), shard))
                   and (sink is None or e["path"] not in sink.done)]
        tally = _stream(run, files, missing, batch_size,
                        workers or os.cpu_count() or 1, sink, progress, on_error)
    finally:
        if sink is not None:
            sink.close()
    return {"model": {**ref.describe(), "chosen_by": ref.why, "backend": run.runner.name,
                      "temperature": run.temperature, "min_confidence": run.min_confidence,
                      "ood_threshold": run.ood_record["threshold"] if run.ood_record else None},
            "status_counts": tally.counts, "calibrated": calibrated,
            "predictions": tally.predictions, "cine": tally.cine, "errors": tally.errors,
            "ignored_files": inputs.ignored,
            "inputs": {"found": len(inputs.files), "in_shard": len(files) + already,
                       "already_answered": already, "shard": None if shard is None else f"{shard[0]}/{shard[1]}"},
            "output": None if sink is None else {"path": str(sink.path), "format": sink.format[1:],
                                                 "records_written": sink.written}}


@dataclass
class _Tally:
    """What a run returns: everything when kept in memory, counts only when streamed to a file."""
    keep: bool
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "uncertain": 0, "rejected": 0})
    predictions: list[dict[str, Any]] = field(default_factory=list)
    cine: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    def add(self, entries: list[dict[str, Any]], summaries: list[dict[str, Any]], errors: list[dict[str, str]]) -> None:
        for entry in entries:
            self.counts[entry["status"]] += 1
        self.errors.extend(errors)  # errors are few and the CLI's exit code needs them
        if self.keep:
            self.predictions.extend(entries)
            self.cine.extend(summaries)


def _stream(run: _Run, files: list[Path], early_errors: list[dict[str, str]], batch_size: int, workers: int,
            sink: ResultsFile | None, progress, on_error) -> _Tally:
    """Decode in a thread pool, classify batch by batch, hand each batch's records on at once."""
    tally = _Tally(keep=sink is None)
    for error in early_errors:
        _report_errors(tally, sink, [error], on_error)
    done = 0
    if progress:
        progress(0, len(files))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for decoded in _prefetched(pool, run.decode, files, batch_size):
            frames = [f for _, file_frames, _ in decoded for f in file_frames]
            entries: list[dict[str, Any]] = []
            for start in range(0, len(frames), batch_size):  # a cine loop may hold many frames
                entries.extend(run.classify(frames[start:start + batch_size]))
            records, summaries, errors = _records_in_file_order(decoded, iter(entries))
            tally.add(entries, summaries, [])
            if sink is not None:
                sink.write(records)
            _report_errors(tally, None, errors, on_error)
            done += len(decoded)
            if progress:
                progress(done, len(files))
    return tally


def _records_in_file_order(decoded, entries):
    """Each file's records together, a cine loop's summary after its frames; errors in place."""
    records, summaries, errors = [], [], []
    for path, file_frames, error in decoded:
        if error is not None:
            failure = {"path": str(path), "error": error}
            errors.append(failure)
            records.append({**failure, "status": "error"})
            continue
        mine = [next(entries) for _ in file_frames]
        records.extend(mine)
        if file_frames and file_frames[0].frame is not None:
            summaries.append(cine_summary(path, mine))
            records.append(summaries[-1])
    return records, summaries, errors


def _report_errors(tally: _Tally, sink: ResultsFile | None, errors: list[dict[str, str]], on_error) -> None:
    tally.add([], [], errors)
    if sink is not None:
        sink.write([{**e, "status": "error"} for e in errors])
    for error in errors:
        if on_error:
            on_error(error)


def _prefetched(pool, decode, files: list[Path], batch_size: int):
    """Yield decoded batches while the pool decodes the next one (at most two batches in flight)."""
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    pending = [pool.submit(decode, f) for f in batches[0]] if batches else []
    for index in range(len(batches)):
        upcoming = [pool.submit(decode, f) for f in batches[index + 1]] if index + 1 < len(batches) else []
        yield [future.result() for future in pending]
        pending = upcoming


def _write_overlay(folder: Path, stem: str, kind: str, gray: np.ndarray, heat: np.ndarray, caption: str,
                   written: set[str]) -> Path:
    """Grad-CAM heatmap (kind 'gradcam') or predicted lesion map ('lesion') beside the scan."""
    from mammacls.explain import lesion_overlay_png, overlay_png

    name, k = f"{stem}.{kind}.png", 2
    while str(folder / name) in written:  # same file name from two folders
        name, k = f"{stem}.{kind}-{k}.png", k + 1
    written.add(str(folder / name))
    write = overlay_png if kind == "gradcam" else lesion_overlay_png
    return write(gray, heat, folder / name, caption)
