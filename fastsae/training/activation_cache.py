"""Activations cached on disk: write them once, train on them many times.

Layout of a cache directory::

    cache_info.json            # d_in, dtype, n_tokens, hook_name, context_size, shards, ...
    shard_00000.safetensors    # key "activations": [n_rows, d_in]
    shard_00001.safetensors
    ...

``cache_activations`` writes one from an ``ActivationsStore`` (into a temporary sibling
directory renamed into place at the end, so a cache directory is always complete).
``CachedActivationsStore`` reads one back as ``[train_batch_size_tokens, d_in]`` batches.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from fastsae.saes.config import dtype_to_str, str_to_dtype
from fastsae.training.activations_store import ActivationsStore

CACHE_INFO_FILENAME = "cache_info.json"
CACHE_FORMAT = "fastsae-activation-cache"
CACHE_FORMAT_VERSION = 1
SHARD_KEY = "activations"
_INFO_KEYS = ("d_in", "dtype", "n_tokens", "shards")
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"cache path {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"cache directory {target} is not empty; pass overwrite=True to replace it"
        )


@torch.no_grad()
def cache_activations(
    store: ActivationsStore,
    path: str | os.PathLike,
    n_tokens: int,
    *,
    shard_size_tokens: int | None = None,
    shard_size_bytes: int = 2**28,
    dtype: str | torch.dtype | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``n_tokens`` activations of ``store`` to a cache directory at ``path``.

    Activations come in dataset order (``store.get_filtered_llm_batch``: no shuffle
    buffer; special/padding tokens already dropped), each shard ``[rows, d_in]`` on CPU.

    Args:
        store: the activations store to draw from (its token stream advances).
        path: the cache directory; it must not exist or be empty unless ``overwrite``.
        n_tokens: activation rows to write.
        shard_size_tokens: rows per shard; when None, as many as fit ``shard_size_bytes``.
        dtype: dtype on disk; default the store's dtype.
        metadata: a JSON-serialisable dict kept in ``cache_info.json``.
        overwrite: replace a non-empty ``path``.

    Returns:
        the cache directory.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if shard_size_tokens is not None and (
        isinstance(shard_size_tokens, bool)
        or not isinstance(shard_size_tokens, int)
        or shard_size_tokens <= 0
    ):
        raise ValueError(
            f"shard_size_tokens must be a positive int or None, got {shard_size_tokens!r}"
        )
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes!r}")
    try:
        json.dumps(metadata or {})
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from None
    out_dtype = store.dtype if dtype is None else str_to_dtype(dtype)
    d_in = store.d_in
    itemsize = torch.empty(0, dtype=out_dtype).element_size()
    rows_per_shard = shard_size_tokens or max(1, shard_size_bytes // (d_in * itemsize))
    target = Path(path)
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        shards: list[dict[str, Any]] = []
        pending: list[Tensor] = []
        n_pending = 0

        def flush(n_rows: int) -> None:
            nonlocal pending, n_pending
            block = torch.cat(pending)
            name = _shard_name(len(shards))
            save_file({SHARD_KEY: block[:n_rows].contiguous()}, str(tmp / name))
            shards.append({"file": name, "n_rows": n_rows})
            pending = [block[n_rows:]] if n_rows < block.shape[0] else []
            n_pending = block.shape[0] - n_rows

        written = 0  # rows taken from the store so far
        with tqdm(total=n_tokens, desc="Caching activations", unit="tok") as bar:
            while written < n_tokens:
                acts = store.get_filtered_llm_batch()[: n_tokens - written]
                pending.append(acts.to(device="cpu", dtype=out_dtype))
                n_pending += acts.shape[0]
                written += acts.shape[0]
                bar.update(acts.shape[0])
                while n_pending >= rows_per_shard:
                    flush(rows_per_shard)
        if n_pending:
            flush(n_pending)
        from fastsae import __version__

        info = {
            "format": CACHE_FORMAT,
            "format_version": CACHE_FORMAT_VERSION,
            "fastsae_version": __version__,
            "d_in": d_in,
            "dtype": dtype_to_str(out_dtype),
            "n_tokens": n_tokens,
            "hook_name": store.hook_name,
            "hook_head_index": store.hook_head_index,
            "context_size": store.context_size,
            "seqpos_slice": list(store.seqpos_slice),
            "prepend_bos": store.prepend_bos,
            "shards": shards,
            "metadata": metadata or {},
        }
        (tmp / CACHE_INFO_FILENAME).write_text(json.dumps(info, indent=2))
        _check_target(target, overwrite)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def cache_activations_from_config(
    cfg: Any,
    model: Any = None,
    dataset: Any = None,
    *,
    model_loader: Callable[[Any], Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Cache ``cfg.training_tokens`` activations to ``cfg.cached_activations_path``.

    The store is ``ActivationsStore.from_config(model, cfg, dataset)``. The caller owns
    model loading: pass ``model``, or ``model_loader(cfg) -> model``.
    """
    if model is None:
        if model_loader is None:
            raise ValueError("cache_activations_from_config needs model= or model_loader=")
        model = model_loader(cfg)
    path = getattr(cfg, "cached_activations_path", None)
    if not path:
        raise ValueError("cfg.cached_activations_path is not set: nowhere to write the cache")
    store = ActivationsStore.from_config(model, cfg, override_dataset=dataset)
    metadata = {
        k: v
        for k in ("model_name", "model_class_name", "dataset_path")
        if isinstance(v := getattr(cfg, k, None), (str, int, float, bool)) and v != ""
    }
    return cache_activations(
        store, path, int(cfg.training_tokens), metadata=metadata, overwrite=overwrite
    )


# ----------------------------------------------------------------------------------------
# Reading a cache
# ----------------------------------------------------------------------------------------


def read_cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``cache_info.json`` of a cache directory, its keys checked."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"activation cache directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"activation cache path {root} is not a directory")
    info_file = root / CACHE_INFO_FILENAME
    if not info_file.exists():
        raise FileNotFoundError(
            f"{info_file} is missing: {root} is not a cache written by cache_activations"
        )
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{info_file} is corrupt (not valid JSON): {e}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_file} is corrupt: expected a JSON object")
    missing = [k for k in _INFO_KEYS if k not in info]
    if missing:
        raise ValueError(f"{info_file} is corrupt: missing keys {missing}")
    shards = info["shards"]
    if (
        not isinstance(shards, list)
        or not shards
        or not all(isinstance(s, dict) and "file" in s and "n_rows" in s for s in shards)
    ):
        raise ValueError(f"{info_file} is corrupt: 'shards' must list {{file, n_rows}} entries")
    if sum(int(s["n_rows"]) for s in shards) != int(info["n_tokens"]):
        raise ValueError(f"{info_file} is corrupt: shard rows do not add up to n_tokens")
    str_to_dtype(info["dtype"])
    return info


def _check_shard(file: Path, n_rows: int, d_in: int, dtype: str) -> None:
    """Check a shard's safetensors header and length without reading its data."""
    if not file.exists():
        raise FileNotFoundError(f"activation cache shard {file} is missing")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 0 or 8 + header_len > size:
            raise ValueError(f"activation cache shard {file} is truncated (no complete header)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"activation cache shard {file} is corrupt (bad header)") from None
    entry = header.get(SHARD_KEY) if isinstance(header, dict) else None
    if not isinstance(entry, dict):
        raise ValueError(f"activation cache shard {file} has no {SHARD_KEY!r} tensor")
    shape = entry.get("shape", [])
    if len(shape) != 2 or shape[1] != d_in:
        raise ValueError(
            f"activation cache shard {file} holds shape {shape}; cache_info says d_in={d_in}"
        )
    if shape[0] != n_rows:
        raise ValueError(
            f"activation cache shard {file} has {shape[0]} rows; cache_info says {n_rows}"
        )
    if entry.get("dtype") != _SAFETENSORS_DTYPES[dtype]:
        raise ValueError(
            f"activation cache shard {file} has dtype {entry.get('dtype')}; cache_info says {dtype}"
        )
    data_end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    if 8 + header_len + data_end > size:
        raise ValueError(
            f"activation cache shard {file} is truncated: {size} bytes, expected "
            f"{8 + header_len + data_end}"
        )


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch, group): distinct tuples give distinct streams."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + p + 1) % (2**63 - 1)
    return value


class CachedActivationsStore:
    """``[train_batch_size_tokens, d_in]`` batches from a cache directory, epoch after epoch.

    With ``shuffle``, every epoch visits the shards in a fresh random order, in groups
    of ``n_shards_in_buffer``; the rows of a group are loaded together and permuted.
    Without it, rows come in the order they were written, read through memory-mapped
    slices. Batches may span two groups or two epochs. Both orders are functions of
    (seed, epoch, position), so ``state_dict`` is just the position and resumes exactly.

    Args:
        path: a directory written by ``cache_activations``.
        train_batch_size_tokens: rows per batch.
        shuffle: shuffle shards and rows (seeded by ``seed``).
        device, dtype: where and in what dtype batches are returned (default: the
            cache's dtype).
        n_shards_in_buffer: shards loaded and mixed together when shuffling.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        train_batch_size_tokens: int,
        shuffle: bool = True,
        seed: int = 42,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        n_shards_in_buffer: int = 4,
    ):
        for name, value in (
            ("train_batch_size_tokens", train_batch_size_tokens),
            ("n_shards_in_buffer", n_shards_in_buffer),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be a bool, got {shuffle!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.path = Path(path)
        self.info = read_cache_info(self.path)
        self.d_in = int(self.info["d_in"])
        self.n_tokens = int(self.info["n_tokens"])
        self.hook_name = self.info.get("hook_name")
        self.cache_dtype = str_to_dtype(self.info["dtype"])
        self.dtype = self.cache_dtype if dtype is None else str_to_dtype(dtype)
        self.device = torch.device(device)
        self.train_batch_size_tokens = train_batch_size_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.n_shards_in_buffer = n_shards_in_buffer
        self._files = [self.path / s["file"] for s in self.info["shards"]]
        self._rows = [int(s["n_rows"]) for s in self.info["shards"]]
        for file, n_rows in zip(self._files, self._rows, strict=True):
            _check_shard(file, n_rows, self.d_in, dtype_to_str(self.cache_dtype))
        self.epoch = 0
        self._offset = 0  # rows of this epoch already served
        self._layout: tuple[int, list[list[int]], list[int]] | None = None
        self._group: tuple[int, int, Tensor] | None = None  # (epoch, group, rows)

    @classmethod
    def from_config(cls, cfg: Any) -> CachedActivationsStore:
        """From a runner config: cached_activations_path, train_batch_size_tokens, seed,
        act_store_device (or device) and dtype, read by name."""
        device = getattr(cfg, "act_store_device", None) or getattr(cfg, "device", "cpu")
        return cls(
            cfg.cached_activations_path,
            train_batch_size_tokens=getattr(cfg, "train_batch_size_tokens", 4096),
            seed=getattr(cfg, "seed", 42),
            device="cpu" if device == "with_model" else device,
            dtype=getattr(cfg, "dtype", None),
        )

    # -- the order of one epoch --------------------------------------------------------------
    def _epoch_layout(self) -> tuple[list[list[int]], list[int]]:
        """Shard groups of the current epoch and the epoch offset each group starts at."""
        if self._layout is None or self._layout[0] != self.epoch:
            n = len(self._files)
            if self.shuffle:
                gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
                order = torch.randperm(n, generator=gen).tolist()
            else:
                order = list(range(n))
            # unshuffled reads go shard by shard: nothing is gained by grouping
            size = self.n_shards_in_buffer if self.shuffle else 1
            groups = [order[i : i + size] for i in range(0, n, size)]
            starts = [0]
            for g in groups[:-1]:
                starts.append(starts[-1] + sum(self._rows[i] for i in g))
            self._layout = (self.epoch, groups, starts)
        return self._layout[1], self._layout[2]

    def _group_rows(self, index: int, shards: list[int]) -> Tensor:
        """All rows of a shuffled group, permuted: ``[rows, d_in]`` in the cache dtype."""
        if self._group is not None and self._group[:2] == (self.epoch, index):
            return self._group[2]
        parts = []
        for i in shards:
            with safe_open(str(self._files[i]), framework="pt") as f:
                parts.append(f.get_tensor(SHARD_KEY))
        rows = torch.cat(parts)
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, index))
        rows = rows[torch.randperm(rows.shape[0], generator=gen)]
        self._group = (self.epoch, index, rows)
        return rows

    def _read(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the current epoch, within one group."""
        groups, starts = self._epoch_layout()
        index = max(i for i, s in enumerate(starts) if s <= start)
        base = starts[index]
        if self.shuffle:
            return self._group_rows(index, groups[index])[start - base : stop - base]
        with safe_open(str(self._files[groups[index][0]]), framework="pt") as f:
            return f.get_slice(SHARD_KEY)[start - base : stop - base]

    def _group_end(self, offset: int) -> int:
        groups, starts = self._epoch_layout()
        ends = starts[1:] + [self.n_tokens]
        return min(e for e in ends if e > offset)

    # -- batches -----------------------------------------------------------------------------
    def next_batch(self) -> Tensor:
        """The next batch ``[train_batch_size_tokens, d_in]`` on ``device`` in ``dtype``."""
        pieces = []
        need = self.train_batch_size_tokens
        while need:
            if self._offset == self.n_tokens:
                self.epoch += 1
                self._offset = 0
            stop = min(self._offset + need, self._group_end(self._offset))
            pieces.append(self._read(self._offset, stop))
            need -= stop - self._offset
            self._offset = stop
        batch = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return batch.to(device=self.device, dtype=self.dtype)

    def __next__(self) -> Tensor:
        return self.next_batch()

    def __iter__(self) -> Iterator[Tensor]:
        return self

    # -- exact resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """The position (epoch, rows served in it) and what defines the order."""
        return {
            "epoch": torch.tensor(self.epoch),
            "offset": torch.tensor(self._offset),
            "seed": torch.tensor(self.seed),
            "shuffle": torch.tensor(self.shuffle),
            "n_shards_in_buffer": torch.tensor(self.n_shards_in_buffer),
            "n_tokens": torch.tensor(self.n_tokens),
            "d_in": torch.tensor(self.d_in),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from ``state_dict()`` of a store over the same cache, built the same way."""
        missing = [k for k in self.state_dict() if k not in state]
        if missing:
            raise ValueError(f"cached activations store state is missing {missing}")
        for key in ("seed", "shuffle", "n_shards_in_buffer", "n_tokens", "d_in"):
            mine = getattr(self, key)
            if type(mine)(state[key].item()) != mine:
                raise ValueError(
                    f"state has {key}={state[key].item()}, this cached store has {mine}"
                )
        offset = int(state["offset"])
        if not 0 <= offset <= self.n_tokens:
            raise ValueError(f"state offset {offset} is outside this cache of {self.n_tokens}")
        self.epoch = int(state["epoch"])
        self._offset = offset
        self._group = None
