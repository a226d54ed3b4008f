"""Atomic, durable file writes: the new content goes to a temporary file beside the
target, is fsynced, and replaces the target with ``os.replace``; then the folder is
fsynced. A reader sees the old file or the new one, never half of one, and a crash
leaves no partial file under the target's name. (Whole SAE folders:
:mod:`fastsae.loading.atomic_dir`.)"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """fsync the folder ``path`` (its entries: a rename in it), where the filesystem
    allows it."""
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see the module docstring),
    creating its parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would hide the file from other users
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, indent: int = 1) -> None:
    """``obj`` as JSON (and a final newline) written with :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


__all__ = ["atomic_write_json", "atomic_write_text", "fsync_dir"]
