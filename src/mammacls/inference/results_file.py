"""Streaming prediction results to a JSON Lines or CSV file that survives a crash.

Every batch's records are appended (and flushed) as soon as the batch is done, so
memory stays flat however many images there are, and a run killed at image 90,000
keeps the first 89,999. A file is *answered* once its file-level record is written:
the prediction of an image, the error of an unreadable file, or the summary that
follows a cine loop's frame records (written together, summary last). ``resume``
drops what a crash left half-written (a cut last line, a cine loop without its
summary) and reports which inputs are already answered.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from mammacls import CLASSES
from mammacls.errors import MammaclsError, param

FORMATS = (".jsonl", ".csv")
CSV_COLUMNS = ("path", "file", "frame", "frames", "label", "status", "reason",
               *(f"p_{c}" for c in CLASSES), "ood_distance", "error",
               "explanation", "lesion_map", "lesion_area_fraction")


def answered_file(record: dict[str, Any]) -> str | None:
    """The input file a record answers, or None for a frame record (its cine summary answers it)."""
    if record.get("frame") not in (None, ""):
        return None
    return record.get("path")


class ResultsFile:
    """Appends records to ``path`` (.jsonl or .csv); ``done`` holds the inputs it answered when opened."""

    def __init__(self, path: Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.format = self.path.suffix.lower()
        if self.format not in FORMATS:
            raise MammaclsError(f"{param('output')} {self.path}: name a .jsonl or .csv file")
        if self.path.is_dir():
            raise MammaclsError(f"{param('output')} {self.path} is a folder")
        if not self.path.parent.is_dir():
            raise MammaclsError(f"{param('output')} {self.path}: folder {self.path.parent} does not exist")
        self.done: set[str] = set()
        self.resuming = self.path.exists()
        if self.resuming:
            if not resume:
                raise MammaclsError(f"{param('output')} {self.path} exists: add {param('resume')} to continue it, "
                                    "or name a new file")
            self._recover()
        self._handle = open(self.path, "a", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._handle, CSV_COLUMNS, extrasaction="ignore") if self.format == ".csv" else None
        if self._csv is not None and self._handle.tell() == 0:
            self._csv.writeheader()
            self._handle.flush()
        self.written = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` in one write, then flush: a kill leaves at most a cut last line."""
        if not records:
            return
        try:
            self._handle.write(self._serialise(records, header=False))
            self._handle.flush()
        except OSError as exc:  # a full disk: one line, and what was written stays usable
            raise MammaclsError(f"cannot write {self.path}: {exc.strerror or exc}; the records written before "
                                f"are kept: free some space and run the same command with {param('resume')}") from None
        self.written += len(records)  # ``done`` is what the file held at the start: memory stays flat

    def close(self) -> None:
        try:
            self._handle.close()
        except OSError:
            pass  # its flush failed already, and was reported

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def provenance_path(self) -> Path:
        return self.path.with_name(self.path.name + ".meta.json")

    def bind(self, provenance: dict[str, Any]) -> None:
        """Record which model, settings and shard write this file (``NAME.meta.json`` beside it), or on
        resume check that they are the ones that began it: one file never mixes two models' answers."""
        from mammacls.store import atomic_path

        sidecar = self.provenance_path
        if self.resuming and sidecar.is_file():  # a new results file overwrites a stale sidecar
            try:
                before = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                before = {}
            for key in ("model_sha256", "calibrated", "shard"):
                if key in before and before[key] != provenance.get(key):
                    raise MammaclsError(f"{param('resume')}: {self.path} was begun with {key.replace('_', ' ')} "
                                        f"{before[key]!r}, this run has {provenance.get(key)!r}; "
                                        f"use the same settings, or a new {param('output')}")
            return
        with atomic_path(sidecar) as tmp:
            tmp.write_text(json.dumps(provenance, indent=2), encoding="utf-8")

    def _serialise(self, records: list[dict[str, Any]], *, header: bool) -> str:
        buffer = io.StringIO()
        if self.format == ".jsonl":
            buffer.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        else:
            writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore")
            if header:
                writer.writeheader()
            writer.writerows(flatten(r) for r in records)
        return buffer.getvalue()

    def _recover(self) -> None:
        """Keep the complete records of answered files; rewrite the file (atomically) if anything goes."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MammaclsError(f"{param('resume')}: cannot read {self.path} ({exc})") from None
        complete = text[:text.rfind("\n") + 1]  # whatever follows the last newline was cut by a kill
        records = self._parse(complete)
        self.done = {f for f in map(answered_file, records) if f is not None}
        kept = [r for r in records if answered_file(r) is not None or r.get("file") in self.done]
        if len(kept) != len(records) or complete != text:
            temporary = self.path.with_name(f".{self.path.name}.resume-tmp")
            temporary.write_text(self._serialise(kept, header=True), encoding="utf-8")
            os.replace(temporary, self.path)

    def _parse(self, text: str) -> list[dict[str, Any]]:
        if self.format == ".jsonl":
            records = []
            for number, line in enumerate(text.splitlines(), start=1):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise MammaclsError(f"{param('resume')}: {self.path} line {number} is not JSON; "
                                        "is this a mammacls results file?") from None
            return records
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        if tuple(rows[0]) != CSV_COLUMNS:
            raise MammaclsError(f"{param('resume')}: {self.path} does not have mammacls's columns "
                                f"({', '.join(CSV_COLUMNS[:4])}, …)")
        return [dict(zip(CSV_COLUMNS, row)) for row in rows[1:] if len(row) == len(CSV_COLUMNS)]


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """A record as one CSV row: probabilities as p_<class> columns."""
    row = {k: v for k, v in record.items() if k != "probabilities"}
    for name, value in (record.get("probabilities") or {}).items():
        row[f"p_{name}"] = value
    return row
