"""Measured path choice for ``fastsae.ops`` with ``impl="auto"``, and its on-disk cache.

The first ``impl="auto"`` call of an op on a CUDA device for a key (device name, op,
dtype, shape bucket) times every candidate path on that call's own tensors, keeps the
fastest and remembers the decision, in memory and in a JSON file, so later calls (and
later processes) of the same bucket take the decision without timing again.

Keys: rows and the weight dimensions are rounded up to powers of two (a batch of 3000
rows and one of 4096 share a decision); ``k`` is kept exact (it changes the selection's
cost, and models use few distinct values). Timing: ``triton.testing.do_bench`` (median
after warm-up, L2 flushed between calls) when Triton is importable, else CUDA events
(median of a few calls after warm-ups). Candidates run on detached tensors under
``torch.no_grad``, so tuning changes neither the results nor autograd; no timing happens
while a CUDA graph is being captured or ``torch.compile`` traces (the default is taken and
nothing is cached). A candidate that raises (say, out of memory at this shape) is skipped.

The file is ``$FASTSAE_CACHE_DIR/dispatch.json`` (default ``$XDG_CACHE_HOME/fastsae``,
else ``~/.cache/fastsae``). It records the torch, triton and fastsae versions; a file
written under other versions is ignored (and replaced by the next write), since a new
kernel or cuBLAS can change which path wins. Writes go to a temporary file moved into
place with ``os.replace`` (a reader never sees half a file), after merging in what
another process wrote meanwhile under an advisory lock where the OS has one; a corrupt
or unwritable file gives one warning, after which decisions live in memory only.

``FASTSAE_TUNE=0`` turns timing off; the ops then take their conservative defaults (see
``fastsae.ops``): the cuBLAS-based paths for the encoders, whose speed is cuBLAS's and
thus never far from SAELens's, rather than the fused Triton encoders, which no GPU has
timed yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import fastsae

try:
    import fcntl  # POSIX only: the cache file's advisory lock
except ImportError:
    fcntl = None  # type: ignore[assignment]

TUNE_ENV = "FASTSAE_TUNE"
CACHE_DIR_ENV = "FASTSAE_CACHE_DIR"
CACHE_FILENAME = "dispatch.json"
FORMAT = 1

# CUDA-event fallback timer (no Triton): calls before timing, then timed calls
EVENT_WARMUP, EVENT_REPEATS = 3, 10

Timer = Callable[[str, Callable[[], Any]], float]
"""``timer(path_name, fn) -> milliseconds`` of one call of ``fn`` (a robust estimate)."""


def tuning_enabled() -> bool:
    """``FASTSAE_TUNE`` is unset, empty or anything but "0" / "false" / "off" / "no"."""
    return os.environ.get(TUNE_ENV, "").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    """``$FASTSAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastsae``, else ``~/.cache/fastsae``."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fastsae"


def versions() -> dict[str, str | None]:
    """The versions a decision depends on: a change in any invalidates the file."""
    try:
        import triton  # optional dependency: triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "fastsae": fastsae.__version__}


def dtype_tag(*dtypes: torch.dtype) -> str:
    """The dtypes of a call (distinct, in order), plus the CUDA autocast dtype when autocast
    is on: it decides which kernels cuBLAS runs, so it is part of the key."""
    names = list(dict.fromkeys(str(d).removeprefix("torch.") for d in dtypes))
    tag = "/".join(names)
    if torch.is_autocast_enabled("cuda"):
        tag += "+autocast-" + str(torch.get_autocast_dtype("cuda")).removeprefix("torch.")
    return tag


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 and 1 stay themselves)."""
    return n if n <= 1 else 1 << math.ceil(math.log2(n))


@dataclasses.dataclass(frozen=True)
class TuneKey:
    """What a decision is valid for: device name, op (with its variant), dtype, and the
    shape bucket (rows and weight dimensions as powers of two, ``k`` exact)."""

    device: str
    op: str
    dtype: str
    rows: int
    dims: tuple[int, ...]
    k: int | None = None

    @classmethod
    def make(
        cls,
        device: str,
        op: str,
        dtype: str,
        rows: int,
        dims: tuple[int, ...],
        k: int | None = None,
    ) -> TuneKey:
        """The key with ``rows`` and ``dims`` bucketed (``k`` as given)."""
        return cls(device, op, dtype, bucket(rows), tuple(bucket(d) for d in dims), k)

    def as_str(self) -> str:
        dims = "x".join(str(d) for d in self.dims)
        k = f"|k={self.k}" if self.k is not None else ""
        return f"{self.device}|{self.op}|{self.dtype}|rows={self.rows}|dims={dims}{k}"


# ------------------------------------------------------------------------------ the file
class DecisionCache:
    """Decisions in memory, backed by a JSON file (``path=None``: memory only).

    File layout: ``{"format": 1, "versions": {...}, "decisions": {key: {"path": name,
    "ms": {name: ms}}}}``. Any problem with the file warns once and turns the file off.
    """

    def __init__(self, path: Path | None, versions_: Mapping[str, str | None] | None = None):
        self.path = path
        self.versions = dict(versions() if versions_ is None else versions_)
        self.memory: dict[str, dict[str, Any]] = {}
        self._loaded = False
        self._file_ok = path is not None

    def _disable_file(self, why: str) -> None:
        if self._file_ok:
            warnings.warn(
                f"fastsae tuning cache {self.path}: {why}; keeping dispatch decisions in "
                f"memory only (set {CACHE_DIR_ENV} to another folder, or {TUNE_ENV}=0)",
                RuntimeWarning,
                stacklevel=4,
            )
        self._file_ok = False

    def _read_file(self) -> dict[str, dict[str, Any]]:
        """The file's decisions under the current versions ({} when absent or stale)."""
        assert self.path is not None
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._disable_file(f"cannot be read ({e})")
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("decisions"), dict):
                raise ValueError("no 'decisions' object")
            decisions = {
                k: v
                for k, v in data["decisions"].items()
                if isinstance(v, dict) and isinstance(v.get("path"), str)
            }
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            self._disable_file(f"is not a valid cache file ({e})")
            return {}
        if data.get("format") != FORMAT or data.get("versions") != self.versions:
            return {}  # written by other versions: decisions may not hold any more
        return decisions

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._file_ok:
            for key, entry in self._read_file().items():
                self.memory.setdefault(key, entry)

    def peek(self, key: str) -> str | None:
        """The decision for ``key`` if it is in memory (the file is not read)."""
        entry = self.memory.get(key)
        return entry["path"] if entry else None

    def get(self, key: str) -> str | None:
        """The cached path name for ``key``, or None."""
        self._load()
        entry = self.memory.get(key)
        return entry["path"] if entry else None

    def put(self, key: str, path: str, ms: Mapping[str, float] | None = None) -> None:
        """Remember a decision; write it (merged with the file's current contents)."""
        self._load()
        self.memory[key] = {"path": path, "ms": dict(ms or {})}
        if self._file_ok:
            self._write()

    def _write(self) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                # merge: another process may have added decisions since we loaded
                merged = self._read_file()
                if not self._file_ok:
                    return
                merged.update(self.memory)
                data = {"format": FORMAT, "versions": self.versions, "decisions": merged}
                fd, tmp = tempfile.mkstemp(
                    dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp"
                )
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            self.memory.update(merged)
        except OSError as e:
            self._disable_file(f"cannot be written ({e})")


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``); elsewhere none, where the merge plus
    ``os.replace`` can at worst lose one concurrent fresh entry, never corrupt the file."""
    if fcntl is None:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ timing
def cuda_timer(name: str, fn: Callable[[], Any]) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA device (median)."""
    try:
        import triton.testing  # optional dependency: triton
    except ImportError:
        triton = None  # type: ignore[assignment]
    if triton is not None:
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    for _ in range(EVENT_WARMUP):
        fn()
    samples = []
    for _ in range(EVENT_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def cuda_device_name(tensors: tuple[Tensor | None, ...]) -> str | None:
    """The CUDA device name shared by ``tensors``; None when any is not on CUDA."""
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):
        return None
    if not torch.cuda.is_available():  # a stand-in tensor (tests): its device's name
        return str(present[0].device)
    return _device_name(present[0].device.index)


@functools.cache
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def tracing() -> bool:
    """Inside a CUDA graph capture or a ``torch.compile`` trace: no timing there."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ------------------------------------------------------------------------------ tuner
class Tuner:
    """Chooses among candidate paths by measurement, remembering each decision.

    ``timer`` times one candidate (``cuda_timer`` by default); ``device_name`` says which
    tensors are on a tunable device and names it (``cuda_device_name`` by default). Both
    are injectable, so the mechanism and the ops integration are testable without a GPU.
    """

    def __init__(
        self,
        cache: DecisionCache | None = None,
        timer: Timer = cuda_timer,
        device_name: Callable[[tuple[Tensor | None, ...]], str | None] = cuda_device_name,
    ) -> None:
        self._cache = cache
        self.timer = timer
        self.device_name = device_name

    @property
    def cache(self) -> DecisionCache:
        if self._cache is None:  # resolved on first use: the env may change before that
            self._cache = DecisionCache(cache_dir() / CACHE_FILENAME)
        return self._cache

    def cached(self, key: TuneKey) -> str | None:
        """The remembered decision for ``key`` (None when not tuned yet)."""
        return self.cache.get(key.as_str())

    def choose(
        self, key: TuneKey, candidates: Mapping[str, Callable[[], Any]], default: str
    ) -> str:
        """The path name to run for ``key``: the cached decision, else (tuning on, not
        tracing, more than one candidate) the fastest candidate, timed now and cached;
        else ``default``. Candidates are no-argument callables on detached tensors."""
        if default not in candidates:
            raise ValueError(f"tuning {key.op}: default {default!r} not in {list(candidates)}")
        if len(candidates) == 1 or not tuning_enabled():
            return default
        if tracing():  # a decision already in memory, else the default; no file, no timing
            hit = self.cache.peek(key.as_str())
            return hit if hit in candidates else default
        hit = self.cached(key)
        if hit in candidates:
            return hit
        return self.tune(key, candidates, default)

    def tune(self, key: TuneKey, candidates: Mapping[str, Callable[[], Any]], default: str) -> str:
        """Time every candidate now, cache and return the fastest (``default`` when every
        candidate fails)."""
        times: dict[str, float] = {}
        with torch.no_grad():
            for name, fn in candidates.items():
                try:
                    times[name] = float(self.timer(name, fn))
                except Exception as e:  # e.g. out of memory at this shape: not a candidate
                    warnings.warn(
                        f"fastsae tuning {key.as_str()}: path {name!r} failed while timed "
                        f"({type(e).__name__}: {e}); not considered",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
        finite = {n: t for n, t in times.items() if math.isfinite(t)}
        best = min(finite, key=finite.__getitem__) if finite else default
        self.cache.put(key.as_str(), best, finite)
        return best


_tuner: Tuner | None = None


def active_tuner() -> Tuner:
    """The tuner ``fastsae.ops`` consults (created on first use)."""
    global _tuner
    if _tuner is None:
        _tuner = Tuner()
    return _tuner


@contextlib.contextmanager
def use_tuner(tuner: Tuner) -> Iterator[Tuner]:
    """Make ``tuner`` the one ``fastsae.ops`` consults inside the block (tests, the CLI)."""
    global _tuner
    old, _tuner = _tuner, tuner
    try:
        yield tuner
    finally:
        _tuner = old


# ------------------------------------------------------------------------------ path log
_path_logs: list[dict[str, set[str]]] = []


def note_path(op: str, path: str) -> None:
    """Called by ``fastsae.ops`` with the path each call took (kept only while recorded)."""
    for log in _path_logs:
        log.setdefault(op, set()).add(path)


@contextlib.contextmanager
def record_paths() -> Iterator[dict[str, set[str]]]:
    """Collect ``{op: {path, ...}}`` of every ``fastsae.ops`` call inside the block."""
    log: dict[str, set[str]] = {}
    _path_logs.append(log)
    try:
        yield log
    finally:
        _path_logs.remove(log)


def describe_paths(log: Mapping[str, set[str]]) -> str:
    """``"op=path,path; op=path"``, sorted (``"-"`` when empty)."""
    parts = [f"{op}={'/'.join(sorted(paths))}" for op, paths in sorted(log.items())]
    return "; ".join(parts) or "-"
