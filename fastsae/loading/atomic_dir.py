"""Replacing a folder as a whole: a reader finds the old folder or the new one, each
complete, whenever the writer is killed (``kill -9``; power loss too, as everything is
fsynced before it is renamed) and whichever rename fails. SAE folders
(:func:`fastsae.loading.disk.save_sae`) and training checkpoints are written this way.

**The swap.** :func:`replace_dir` (or :func:`new_temp_dir` + :func:`commit_dir` when
several processes fill the folder) goes through these names beside ``<name>``, where
``<token>`` is ``<creation time in ns, hex>-<host tag>-<pid>-<random>``:

1. the new content is written into ``.<name>.tmp-<token>`` and fsynced;
2. ``.<name>.tmp-<token>`` is renamed ``.<name>.new-<token>``: that name means complete;
3. ``<name>``, when there is one, is renamed ``.<name>.old-<token>``;
4. ``.<name>.new-<token>`` is renamed ``<name>``;
5. ``.<name>.old-<token>`` is deleted.

A kill before step 3 leaves the old ``<name>`` untouched (the save never happened); a
kill after step 4 leaves the new one. Between steps 3 and 4 there is no ``<name>``, but
a complete old and a complete new folder.

**The recovery rule** (:func:`recover_dir`), which every reader of these folders applies
before it opens one (``SAE.load_from_disk``, ``from_pretrained`` on a local folder,
checkpoint loading, ``from_pretrained_path``) and every writer before its swap: when
``<name>`` is missing and ``.<name>.new-*`` folders exist, the newest of them is the
folder. It is renamed ``<name>`` (the swap is finished) and its ``.old-`` twin deleted;
where the rename is impossible (a read-only filesystem) the reader reads it where it is.
So after a kill at any moment a reader gets exactly the old or exactly the new folder:
the old one up to step 3, the new one from then on.

**A failed rename** at step 4 is rolled back (step 3 undone, the new folder deleted) and
raised: the old folder stays. If the rollback's own rename fails too, the recovery rule
applies, and the new folder wins.

**Leftovers** of killed writes (``.tmp-``, ``.old-`` and superseded ``.new-`` folders)
are deleted by :func:`clean_stale`, which the next :func:`commit_dir` into the same
parent folder runs (and a resume from a checkpoint, beside that checkpoint). It deletes
only what cannot belong to a live process: created before this process started (before
this module was imported: no temporary folder of this process is older) by a process of
this host that is gone, or, from another host (whose processes cannot be asked), more
than :data:`FOREIGN_STALE_AFTER_S` before. A ``.new-`` folder whose ``<name>`` is
missing is a recovery candidate: it is recovered, never deleted (nor is an ``.old-``
folder while its ``<name>`` is missing). Temporary folders of fastsae versions before
this module (``.<name>.tmp-`` and 8 hex digits for checkpoints, 12 for activation
caches) carry no owner and are deleted under the other-host rule.

**What is in the old folder** and not written anew is dropped, unless the writer asks to
carry it over (``carry_over``): the SAE writer keeps the files a user put beside an SAE
(a README, plots), linked (or copied where links are impossible) into the new folder.

A folder whose own name is a ``.tmp-`` name is private to its writer (nothing reads it
before its commit): :func:`replace_dir` writes into it in place. That is how a
checkpoint assembles its SAE.

Tests pause a writer at a step with ``FASTSAE_TEST_PAUSE_AT`` (one of
:data:`PAUSE_POINTS`): the writer then writes its pid to the file
``FASTSAE_TEST_PAUSE_MARKER`` names and waits, to be killed there (or to go on once the
test deletes that file).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import time
import zlib
from collections.abc import Callable
from pathlib import Path

PROCESS_START_NS = time.time_ns()
# a temporary folder of another host counts as abandoned once this much older than us
FOREIGN_STALE_AFTER_S = 3600.0
PAUSE_POINTS = ("before-mark", "after-mark", "between-renames", "before-delete-old")
PAUSE_ENV = "FASTSAE_TEST_PAUSE_AT"
PAUSE_MARKER_ENV = "FASTSAE_TEST_PAUSE_MARKER"

_HOST_TAG = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TOKEN = r"(?P<time>[0-9a-f]+)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<rand>[0-9a-f]{8})"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-" + _TOKEN + "$")
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?:[0-9a-f]{8}|[0-9a-f]{12})$")


# ---------------------------------------------------------------------------- names
def _token() -> str:
    return f"{time.time_ns():x}-{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"


def _sibling(final: Path, kind: str, token: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{token}"


def _parse(name: str) -> re.Match[str] | None:
    return _SIBLING.match(name)


def _token_of(match: re.Match[str]) -> str:
    return f"{match['time']}-{match['host']}-{match['pid']}-{match['rand']}"


def is_temp_dir(path: str | Path) -> bool:
    """True when ``path`` is named as a folder being written (step 1 of the swap)."""
    match = _parse(Path(path).name)
    return match is not None and match["kind"] == "tmp"


def _target(path: str | Path) -> Path:
    """The folder a swap replaces: absolute, with a symlink as the last part followed
    (the link keeps pointing at the replaced folder)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def temp_dir_for(final: str | Path) -> Path:
    """A fresh name for the folder that will become ``final`` (not created)."""
    return _sibling(_target(final), "tmp", _token())


def new_temp_dir(final: str | Path) -> Path:
    """Create (with ``final``'s parent) and return an empty folder to write ``final``'s
    new content into, for :func:`commit_dir`."""
    tmp = temp_dir_for(final)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    return tmp


# ---------------------------------------------------------------------------- durability
def _fsync_path(path: Path, directory: bool = False) -> None:
    if directory and os.name != "posix":
        return  # directories cannot be opened for fsync there
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root`` and every folder (``root`` included)."""
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            file = Path(dirpath) / filename
            if file.is_file() and not file.is_symlink():
                _fsync_path(file)
        _fsync_path(Path(dirpath), directory=True)


def _pause(point: str) -> None:
    """The test hook: at ``point``, announce it in the marker file and wait (to be
    killed) until the test deletes that file."""
    if os.environ.get(PAUSE_ENV) != point:
        return
    marker = Path(os.environ.get(PAUSE_MARKER_ENV) or "fastsae-paused")
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 600
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


# ---------------------------------------------------------------------------- recovery
def recover_dir(path: str | Path) -> Path:
    """The folder to read for ``path`` under the recovery rule (see the module docstring):
    ``path`` itself when it exists or when a swap that a kill interrupted could be
    finished, the complete new folder where it lies when it could not (read-only
    filesystem), and ``path`` when there is nothing to recover (the caller then reports
    it missing)."""
    path = Path(path)
    if path.exists():
        return path
    final = _target(path)
    try:
        names = os.listdir(final.parent)
    except OSError:
        return path
    candidates = []
    for name in names:
        match = _parse(name)
        if match is not None and match["kind"] == "new" and match["name"] == final.name:
            candidates.append((int(match["time"], 16), match["rand"], name, _token_of(match)))
    for _, _, name, token in sorted(candidates, reverse=True):
        new = final.parent / name
        try:
            os.rename(new, final)
        except FileNotFoundError:  # another reader or the writer itself finished it
            if final.exists():
                return path
            continue
        except OSError:
            if final.exists():
                return path
            return new if new.is_dir() else path
        shutil.rmtree(_sibling(final, "old", token), ignore_errors=True)
        _fsync_parent(final)
        return path
    return path


def _fsync_parent(final: Path) -> None:
    # durability of a rename is best effort where the folder cannot be synced
    with contextlib.suppress(OSError):
        _fsync_path(final.parent, directory=True)


# ---------------------------------------------------------------------------- cleaning
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # cannot ask without side effects: keep its folders
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except OSError:
        return True
    return True


def _is_stale(match: re.Match[str]) -> bool:
    created = int(match["time"], 16)
    if created >= PROCESS_START_NS:
        return False
    if match["host"] == _HOST_TAG:
        return not _pid_alive(int(match["pid"]))
    return created < PROCESS_START_NS - FOREIGN_STALE_AFTER_S * 1e9


def clean_stale(parent: str | Path) -> list[Path]:
    """Delete the leftovers of killed writes in folder ``parent`` that no live process
    can own (see the module docstring); recover, never delete, a recovery candidate.
    Returns what was deleted."""
    parent = Path(parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in names:
        entry = parent / name
        match = _parse(name)
        if match is not None:
            if not _is_stale(match):
                continue
            final = parent / match["name"]
            if match["kind"] in ("new", "old") and not final.exists():
                recover_dir(final)
                if not final.exists():
                    continue  # the only copies of that folder: never delete them
            if not entry.exists():
                continue  # recovery used it (a candidate) or removed it (an old twin)
        elif _LEGACY_TMP.match(name) and entry.is_dir():
            try:
                age_ns = PROCESS_START_NS - entry.stat().st_mtime_ns
            except OSError:
                continue
            if age_ns < FOREIGN_STALE_AFTER_S * 1e9:
                continue
        else:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # e.g. a read-only filesystem
                entry.unlink(missing_ok=True)
        if not entry.exists():
            removed.append(entry)
    return removed


# ---------------------------------------------------------------------------- writing
def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Entries of ``old`` that ``keep`` accepts and ``new`` lacks, into ``new``."""
    for name in sorted(os.listdir(old)):
        src, dst = old / name, new / name
        if not keep(name) or dst.exists() or dst.is_symlink():
            continue
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(dst))


def check_replaceable(final: str | Path) -> Path:
    """``final`` as :func:`replace_dir` would replace it, after refusing what must not be
    replaced: a file, the filesystem root, the current working directory or a folder
    that holds it (renaming it away would pull the folder from under this process)."""
    target = _target(final)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{final}: exists and is not a folder")
    if target.parent == target:
        raise ValueError(f"{final}: cannot replace the filesystem root; name a folder in it")
    cwd = Path(os.path.realpath(os.getcwd()))
    if cwd == target or target in cwd.parents:
        raise ValueError(
            f"{final}: is the current working directory or holds it, which cannot be "
            "replaced as a whole; write into a folder of its own"
        )
    return target


def commit_dir(
    tmp: str | Path, final: str | Path, *, carry_over: Callable[[str], bool] | None = None
) -> Path:
    """Swap the fully written folder ``tmp`` (from :func:`new_temp_dir`) in as ``final``
    (steps 2 to 5 of the module docstring), after recovering ``final`` and cleaning
    stale leftovers beside it. ``carry_over(name)`` picks the entries of the old
    ``final`` that the new one keeps. ``tmp`` is gone afterwards, whatever happens."""
    tmp = Path(tmp)
    target = check_replaceable(final)
    match = _parse(tmp.name)
    if match is None or match["kind"] != "tmp" or match["name"] != target.name:
        raise ValueError(f"{tmp}: not a temporary folder for {target} (see new_temp_dir)")
    if Path(os.path.realpath(tmp.parent)) != target.parent:
        raise ValueError(f"{tmp}: must lie beside {target}")
    token = _token_of(match)
    new, old = _sibling(target, "new", token), _sibling(target, "old", token)
    try:
        recover_dir(target)
        clean_stale(target.parent)
        if carry_over is not None and target.is_dir():
            _carry_over(target, tmp, carry_over)
        fsync_tree(tmp)
        _pause("before-mark")
        os.rename(tmp, new)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_parent(target)
    _pause("after-mark")
    moved_old = False
    try:
        if target.exists() or target.is_symlink():
            os.rename(target, old)
            moved_old = True
        _pause("between-renames")
        os.rename(new, target)
    except BaseException:
        if not new.exists() and target.exists():
            pass  # a reader finished this swap under the recovery rule
        else:
            _roll_back(new, old if moved_old else None, target)
            raise
    _fsync_parent(target)
    _pause("before-delete-old")
    shutil.rmtree(old, ignore_errors=True)
    return target


def _roll_back(new: Path, old: Path | None, target: Path) -> None:
    """Undo step 3 after a failed step 4; where that fails too, leave both folders to
    the recovery rule (the new one wins)."""
    if old is not None and not target.exists():
        try:
            os.rename(old, target)
        except OSError:
            return
    shutil.rmtree(new, ignore_errors=True)


def replace_dir(
    final: str | Path,
    write: Callable[[Path], None],
    *,
    carry_over: Callable[[str], bool] | None = None,
) -> Path:
    """Replace folder ``final`` as a whole by what ``write(folder)`` writes into an
    empty folder: see the module docstring. A ``final`` that is itself a ``.tmp-``
    folder is written into in place. Returns ``final``'s absolute path."""
    if is_temp_dir(final):
        folder = Path(final)
        folder.mkdir(parents=True, exist_ok=True)
        write(folder)
        return _target(folder)
    check_replaceable(final)
    tmp = new_temp_dir(final)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_dir(tmp, final, carry_over=carry_over)


__all__ = [
    "FOREIGN_STALE_AFTER_S",
    "PAUSE_ENV",
    "PAUSE_MARKER_ENV",
    "PAUSE_POINTS",
    "PROCESS_START_NS",
    "check_replaceable",
    "clean_stale",
    "commit_dir",
    "fsync_tree",
    "is_temp_dir",
    "new_temp_dir",
    "recover_dir",
    "replace_dir",
    "temp_dir_for",
]
