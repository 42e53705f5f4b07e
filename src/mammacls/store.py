"""Where mammacls keeps its state, and how it writes files safely.

Everything lives under one cache directory (platformdirs' user cache dir for
``mammacls``, or ``$MAMMACLS_CACHE_DIR``): prepared datasets under
``datasets/``, trained models under ``models/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CACHE_ENV = "MAMMACLS_CACHE_DIR"
_LATEST_DATASET = "latest_dataset.txt"


def cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mammacls", appauthor=False))


def datasets_dir() -> Path:
    return cache_dir() / "datasets"


def models_dir() -> Path:
    return cache_dir() / "models"


def check_model_name(name: str) -> str:
    """A model's name becomes a folder under ``models/``: one plain path component, not ``default``."""
    from mammacls.errors import MammaclsError, param

    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise MammaclsError(f"{param('name')} {name!r}: a model name is a plain folder name "
                            "(no '/', not starting with '.')")
    if name == "default":
        raise MammaclsError(f"{param('name')} default is the shipped model's name: choose another")
    return name


def record_latest_dataset(prepared_dir: Path) -> None:
    atomic_write_text(cache_dir() / _LATEST_DATASET, str(prepared_dir.resolve()) + "\n")


def latest_dataset() -> Path | None:
    pointer = cache_dir() / _LATEST_DATASET
    if not pointer.is_file():
        return None
    return Path(pointer.read_text(encoding="utf-8").strip())


_CHOSEN_MODEL = "chosen_model.txt"


def chosen_model() -> str | None:
    """The model ``mammacls use NAME`` chose for predict (None: the shipped one)."""
    pointer = cache_dir() / _CHOSEN_MODEL
    if not pointer.is_file():
        return None
    return pointer.read_text(encoding="utf-8").strip() or None


def record_chosen_model(spec: str | None) -> None:
    pointer = cache_dir() / _CHOSEN_MODEL
    if spec is None:
        pointer.unlink(missing_ok=True)
    else:
        atomic_write_text(pointer, spec + "\n")


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 (and writers may recreate it): the usual mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a library's own error for a failed write (safetensors reports a full disk as
    ``SafetensorError: ... Os { code: 28 ... }``) into the ``OSError`` it is, naming ``path``."""
    import errno
    import re

    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        found = re.search(r"code:\s*(\d+)", str(exc))
        if found is None and "No space left" not in str(exc):
            raise
        code = int(found.group(1)) if found else errno.ENOSPC
        raise OSError(code, os.strerror(code), str(path)) from None


def current_umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: Path, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ locks ---

@contextlib.contextmanager
def cache_lock(key: str, what: str, exclusive: bool = True) -> Iterator[None]:
    """Hold ``key`` (e.g. ``model-NAME``, ``dataset-NAME``) while ``what`` runs, or refuse at once.

    An exclusive holder (training a model, writing a dataset) shuts everyone else out; shared
    holders (reading a dataset) only shut out an exclusive one. The kernel drops a lock when its
    process dies, so a killed run never leaves the cache locked. The refusal names the other process.
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked rather than not at all
        yield
        return
    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    safe = _lock_stem(key)
    handle = open(folder / f"{safe}.lock", "a+")
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            from mammacls.errors import MammaclsError

            holders = _lock_holders(folder, safe) or ["another mammacls process"]
            raise MammaclsError(f"{key.replace('-', ' ', 1)} is in use by {'; '.join(holders)}: wait for it to "
                                "finish, or stop it") from None
        _sweep_dead_holders(folder)
        note = folder / f"{safe}.{os.getpid()}.holder"
        note.write_text(f"process {os.getpid()} ({what})", encoding="utf-8")
        try:
            yield
        finally:
            note.unlink(missing_ok=True)
    finally:
        handle.close()


def lock_holders(key: str) -> list[str]:
    """Who holds ``key`` now (``process PID (what)``), without taking it; empty when nobody does."""
    folder = cache_dir() / "locks"
    return _lock_holders(folder, _lock_stem(key)) if folder.is_dir() else []


def _lock_stem(key: str) -> str:
    """A lock key as a file name (its lock file and its holders' notes start with it)."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)


def _lock_holders(folder: Path, safe: str) -> list[str]:
    holders = []
    for note in sorted(folder.glob(f"{safe}.*.holder")):
        pid = note.name.rsplit(".", 2)[-2]
        if pid.isdigit() and _alive(int(pid)):
            holders.append(note.read_text(encoding="utf-8", errors="replace").strip())
        else:
            note.unlink(missing_ok=True)  # left by a process that died
    return holders


def _sweep_dead_holders(folder: Path) -> None:
    """Holder notes of processes that died (``kill -9``) would pile up: each lock taken removes them."""
    for note in folder.glob("*.holder"):
        pid = note.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            note.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
