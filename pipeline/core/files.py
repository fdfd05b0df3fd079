"""Files that many jobs share: atomic writes (a reader never sees a half-written result, even
after a SIGKILL) and exclusive locks (concurrent jobs build a shared cache entry once).

Every file the pipeline writes gets the permissions an ordinary `open` would give it (0666 less
the umask), so teammates can read results and caches on a shared filesystem: atomic writes
change mkstemp's 0600, and `follow_umask` does the same for files written by libraries that
create them 0600 (safetensors' `save_file`, hence `save_pretrained`'s weights).

A model's files are identified cheaply (`files_identity`) and their absence is one error
(`ModelNotAvailableError`), here below both the model loader (`models`) and the GGUF
conversion (`gguf`), which share them."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, _file_mode())  # mkstemp creates 0600
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            hasher.update(block)
    return hasher.hexdigest()


def current_umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def follow_umask(path: str | Path) -> Path:
    """Give `path` (a file, or every file under a directory) the mode `open` would have given
    it; for files a library wrote 0600 before they are renamed into place."""
    path, mode = Path(path), _file_mode()
    for member in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if member.is_file():
            os.chmod(member, mode)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, default=_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock so concurrent jobs build a shared cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class LockHeld(RuntimeError):
    """Another process holds a lock taken with `try_lock`."""


@contextlib.contextmanager
def try_lock(path: Path):
    """An exclusive lock held for the block, or `LockHeld` at once if another process has it.

    The kernel releases it when the holder dies (kill -9 included), so a stale lock file never
    blocks a rerun.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(f"{path} is locked by another process") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sealed(entry: dict[str, Any]) -> dict[str, Any]:
    """`entry` with the sha256 of its canonical JSON under "sha256", for a cache whose entries
    are JSON (unedited scores, z, templates): `intact` finds any changed byte or number."""
    return {**entry, "sha256": _digest(entry)}


def intact(entry: Any) -> bool:
    """Whether `entry` carries the checksum `sealed` gave it (an entry without one fails)."""
    if not isinstance(entry, dict) or "sha256" not in entry:
        return False
    return entry["sha256"] == _digest({k: v for k, v in entry.items() if k != "sha256"})


def _digest(entry: dict[str, Any]) -> str:
    # json round-trips floats exactly (repr), so a row read back hashes as it was written.
    text = json.dumps(entry, sort_keys=True, default=_default)
    return hashlib.sha256(text.encode()).hexdigest()


class ModelNotAvailableError(RuntimeError):
    """A model's files are not here (a path, a package's GGUF, a hub download offline)."""


def files_identity(*paths: str | Path) -> dict[str, Any]:
    """Each file's resolved path, size and modification time (for a directory: every file in
    it). Cheap, and it changes whenever a file is replaced or rewritten in place; a byte flipped
    without touching the mtime is caught by the converted model's checksum, not by this."""
    entries = []
    for path in paths:
        path = Path(path).resolve()
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for member in members:
            stat = member.stat()
            entries.append([str(member), stat.st_size, stat.st_mtime_ns])
    return {"files": entries}
