"""Atomic file writes: every output of vmc-fast either appears whole or not at all.

A temporary file is locked (flock) by its writer for as long as it exists, so a process killed mid-write (SIGKILL
runs no cleanup) leaves one that nobody holds: `remove_stale_temporaries` tells it from one being written now,
by any process, and removes only those.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success fsync it, give it normal permissions and rename it onto
    `path`. On an exception the temporary file is removed and `path` is untouched. Missing parent folders are
    created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is renamed or removed: it is being written
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs should read like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(fd)


TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\.\w+)?|\.probe[a-z0-9_]{8}")
"""Names `atomic_path` gives its temporary files (``.<stem>.<8 random>.tmp<suffix>``), and the write probe of
`vmc_fast.runs.library.prepare_out_dir`."""


def remove_stale_temporaries(folder: str | Path, depth: int = 2) -> list[Path]:
    """Remove the temporary files of `atomic_path` (and write probes) under `folder`, down to `depth` levels of
    subfolders, that no process holds: leftovers of a writer that was killed. A file being written now, by any
    process on any machine whose file system honours flock, is locked and kept. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink() and depth > 0:
            removed += remove_stale_temporaries(entry, depth - 1)
        elif entry.is_file() and TEMPORARY_NAME.fullmatch(entry.name) and _unheld(entry):
            removed.append(entry)
    return removed


def _unheld(path: Path) -> bool:
    """Remove `path` if no process holds a lock on it; True when removed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # gone meanwhile (its writer renamed it): nothing to do
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _same_file(fd, path):
            return False  # its writer renamed it into place meanwhile
        os.unlink(path)
        return True
    except OSError:
        return False  # its writer is alive (or it is gone)
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """safetensors save that either fully succeeds or leaves no file at `path`."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def strict_json(obj) -> str:
    """JSON that every parser reads: NaN and inf floats become null (Python's json would write bare NaN)."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, sort_keys=True)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------- locks


class LockHeld(Exception):
    """A lock file is held by another process; `holder` is what it wrote there (pid, host, since when)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


@contextmanager
def held_lock(path: str | Path, shared: bool = False, remove: bool = True, record: bool = True) -> Iterator[None]:
    """Hold an flock on `path` (created if missing) without waiting: LockHeld when another process holds it (an
    exclusive lock, or with `shared` False any lock). The kernel releases it when its holder exits, however it
    exits (SIGKILL included), so a dead process's lock file never blocks. An exclusive holder writes
    "pid N on HOST since TIME" into the file (unless `record` is False: a check that it is free), and with `remove` deletes the file on release; a process that
    opened the file just before it was deleted notices (another inode) and takes the new one.
    """
    import datetime as _dt
    import socket

    path = Path(path)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(path, holder) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # deleted by its last holder while we opened it: lock the file now at `path`
    try:
        if record and not shared:
            since = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield
    finally:
        if remove and not shared and _same_file(fd, path):
            os.unlink(path)
        os.close(fd)
