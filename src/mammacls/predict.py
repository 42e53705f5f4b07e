"""Predict files: stream them through a ``Predictor`` batch by batch, to the caller or to a results
file, with Grad-CAM and lesion-map overlays beside them when asked (those need PyTorch)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any


from mammacls import __version__
from mammacls.choices import Backend, Device
from mammacls.errors import MammaclsError, param
from mammacls.inference.pixels import ImageReadError, InMemoryFile
from mammacls.inference.inputs import collect_inputs, in_shard
from mammacls.inference.predictor import Frame, Prediction, Predictor, cine_summary
from mammacls.inference.results_file import ResultsFile
from mammacls.overlays import OverlayFolders, Overlays
from mammacls.schemas import PREDICTIONS


def predict_paths(
    paths: Iterable[Path],
    *,
    model: str | None = None,
    device: str | Device = "auto",
    batch_size: int = 32,
    backend: str | Backend = "auto",
    calibrated: bool = True,
    explain_dir: Path | None = None,
    lesion_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    workers: int | None = None,
    shard: tuple[int, int] | None = None,
    output: Path | None = None,
    resume: bool = False,
    on_error: Callable[[dict[str, str]], None] | None = None,
    allow_unfinished: bool = False,
) -> dict[str, Any]:
    """Predict every image under ``paths``; unreadable files are reported, not fatal.

    On the CPU the model's ONNX export runs in ONNX Runtime (torch is not
    imported); ``device='cuda'``, ``explain_dir`` (Grad-CAM needs gradients) or
    a model without an export uses PyTorch. DICOM cine loops give one prediction
    per frame (``file.dcm#frame=N``) and a summary per file (in ``cine``).

    ``workers`` threads decode (default: every core). ``shard=(K, N)`` keeps a
    deterministic 1/N of the inputs. With ``output`` (.jsonl or .csv) results are
    appended batch by batch instead of returned (constant memory); ``resume``
    skips the inputs the file already answers. A model whose training did not finish is refused
    unless ``allow_unfinished``.
    """
    from mammacls.inference.model_files import check_finished, resolve_model

    if batch_size < 1:
        raise MammaclsError(f"{param('batch_size')} must be at least 1")
    if workers is not None and workers < 1:
        raise MammaclsError(f"{param('workers')} must be at least 1")
    if resume and output is None:
        raise MammaclsError(f"{param('resume')} needs {param('output')} (the results file to continue)")
    paths = list(paths)
    inputs = collect_inputs(paths)
    if not inputs.files:  # checked before the model is opened: a typo answers at once
        missing = [e["path"] for e in inputs.errors]
        raise MammaclsError(f"file not found: {', '.join(missing)}" if missing
                            else f"no images found in {', '.join(str(p) for p in paths)}")
    files = [f for f in inputs.files if in_shard(f, shard)] if shard else inputs.files
    shard_text = None if shard is None else f"{shard[0]}/{shard[1]}"
    sink = ResultsFile(Path(output), resume=resume) if output is not None else None
    try:
        already = len(files)
        if sink is not None:
            files = [f for f in files if str(f) not in sink.done]
        already -= len(files)
        ref = resolve_model(model)
        check_finished(ref, allow_unfinished)
        calibrated = calibrated and ref.card.calibration is not None  # what is claimed is what was fitted
        if sink is not None:
            sink.bind({"model": ref.name, "model_sha256": ref.card.weights.sha256, "calibrated": calibrated,
                       "shard": shard_text, "mammacls_version": __version__})
        predictor, overlays = _open(ref, device, backend, calibrated, explain_dir, lesion_dir, notice)
        missing = [e for e in inputs.errors if (not shard or in_shard(Path(e["path"]), shard))
                   and (sink is None or e["path"] not in sink.done)]
        tally = _stream(predictor, overlays, files, missing, batch_size, workers or os.cpu_count() or 1, sink,
                        progress, on_error)
    finally:
        if sink is not None:
            sink.close()
    return {"schema": PREDICTIONS, "model": predictor.describe(), "status_counts": tally.counts, "calibrated": calibrated,
            "predictions": [p.to_record() for p in tally.predictions], "cine": [c.to_record() for c in tally.cine],
            "errors": tally.errors,
            "ignored_files": inputs.ignored,
            "inputs": {"found": len(inputs.files), "in_shard": len(files) + already,
                       "already_answered": already, "shard": shard_text},
            "output": None if sink is None else {"path": str(sink.path), "format": sink.format[1:],
                                                 "records_written": sink.written}}


def _open(ref, device: str, backend: str, calibrated: bool, explain_dir, lesion_dir, notice):
    """The predictor, and the overlay writer when explanations are asked for (PyTorch)."""
    from mammacls.runtime import open_backend

    explain_dir, lesion_dir = (None if d is None else Path(d) for d in (explain_dir, lesion_dir))
    if lesion_dir is not None and not ref.card.mask_guided:
        raise MammaclsError(f"{param('lesion_dir')}: model {ref.name} was not trained with {param('mask_guided')}, "
                            "so it has no lesion decoder")
    for option, folder, why in (("explain_dir", explain_dir, "gradients"), ("lesion_dir", lesion_dir, "its decoder")):
        if folder is None:
            continue
        if backend == "onnx":
            raise MammaclsError(f"{param(option)} needs PyTorch ({why}); drop {param('backend')} onnx")
        if folder.exists() and not folder.is_dir():
            raise MammaclsError(f"{param(option)} {folder} exists and is not a folder")
        backend = "torch"
    for folder in (explain_dir, lesion_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    runner, hint = open_backend(ref, device, backend)
    if hint and notice:
        notice(hint)
    explaining = explain_dir is not None or lesion_dir is not None
    predictor = Predictor(ref, runner, calibrated=calibrated, keep_originals=explaining)
    if not explaining:
        return predictor, None
    return predictor, Overlays(predictor, explain_dir is not None, lesion_dir is not None,
                               OverlayFolders(explain_dir, lesion_dir))


@dataclass
class _Tally:
    """What a run returns: everything when kept in memory, counts only when streamed to a file."""
    keep: bool
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "uncertain": 0, "rejected": 0})
    predictions: list[Prediction] = field(default_factory=list)
    cine: list[Prediction] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    def add(self, answers: list[Prediction], summaries: list[Prediction], errors: list[dict[str, str]]) -> None:
        for answer in answers:
            self.counts[answer.status] += 1
        self.errors.extend(errors)  # errors are few and the CLI's exit code needs them
        if self.keep:
            self.predictions.extend(answers)
            self.cine.extend(summaries)


def _stream(predictor: Predictor, overlays: Overlays | None, files: list[Path], early_errors: list[dict[str, str]],
            batch_size: int, workers: int, sink: ResultsFile | None, progress, on_error) -> _Tally:
    """Decode in a thread pool, classify batch by batch, hand each batch's records on at once."""
    tally = _Tally(keep=sink is None)
    _report_errors(tally, sink, early_errors, on_error)
    classify = overlays.classify if overlays is not None else predictor.classify

    done = 0
    if progress:
        progress(0, len(files))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for decoded in _prefetched(pool, partial(decode_file, predictor), files, batch_size):
            frames = [f for _, file_frames, _ in decoded for f in file_frames]
            answers: list[Prediction] = []
            for start in range(0, len(frames), batch_size):  # a cine loop may hold many frames
                answers.extend(classify(frames[start:start + batch_size]))
            records, summaries, errors = records_in_file_order(decoded, iter(answers))
            tally.add(answers, summaries, [])
            if sink is not None:
                sink.write(records)
            _report_errors(tally, None, errors, on_error)
            done += len(decoded)
            if progress:
                progress(done, len(files))
    return tally


def decode_file(predictor: Predictor, path: Path | InMemoryFile) -> tuple[Path | InMemoryFile, list[Frame], str | None]:
    """A file's frames, or why it cannot be read (reported per file, never fatal): what
    ``records_in_file_order`` takes, for predict's files and serve's uploads alike."""
    try:
        return path, predictor.frames_of(path), None
    except ImageReadError as exc:
        return path, [], str(exc)


def records_in_file_order(decoded, answers):
    """Each file's records together, a cine loop's summary after its frames; errors in place. Returns the
    records (JSON, for a results file), the cine loops' summaries and the errors."""
    records, summaries, errors = [], [], []
    for path, file_frames, error in decoded:
        if error is not None:
            failure = {"path": str(path), "error": error}
            errors.append(failure)
            records.append({**failure, "status": "error"})
            continue
        mine = [next(answers) for _ in file_frames]
        records.extend(answer.to_record() for answer in mine)
        if file_frames and file_frames[0].frame is not None:
            summaries.append(cine_summary(str(path), mine))
            records.append(summaries[-1].to_record())
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
