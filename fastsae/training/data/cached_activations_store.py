"""Reading an activation cache written by
:func:`fastsae.training.data.activation_cache.cache_activations`: the format's constants,
``read_cache_info`` (the checked ``cache_info.json``), shard header checks that read no
data, and :class:`CachedActivationsStore`, which serves ``[train_batch_size_tokens,
d_in]`` batches from the shards, epoch after epoch, resumable exactly.

The store also reads SAELens's cache layout (what ``sae_lens.CacheActivationsRunner`` and
:class:`fastsae.cache_activations_runner.CacheActivationsRunner` write: a ``datasets``
folder whose rows hold ``[context_size, d_in]`` activations of a hook): the layout is
told by the folder's files (:func:`detect_cache_layout`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from fastsae.loading.atomic_dir import recover_dir
from fastsae.saes.config import dtype_to_str, str_to_dtype

CACHE_INFO_FILENAME = "cache_info.json"
CACHE_FORMAT = "fastsae-activation-cache"
CACHE_FORMAT_VERSION = 1
SHARD_KEY = "activations"
_INFO_KEYS = ("d_in", "dtype", "n_tokens", "shards")
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
# the files of a `datasets` folder (Dataset.save_to_disk): SAELens's cache layout
HF_STATE_FILENAME = "state.json"
HF_INFO_FILENAME = "dataset_info.json"
FASTSAE_LAYOUT, SAE_LENS_LAYOUT = "fastsae", "sae_lens"
# activations per virtual shard of a SAELens cache (as fastsae's own shards hold)
_SAE_LENS_SHARD_BYTES = 2**28


def cache_dir_to_read(path: str | os.PathLike) -> Path:
    """The folder to read for cache ``path``: ``path``, after finishing a swap that a
    killed :func:`~fastsae.training.data.activation_cache.cache_activations` left between its
    two renames (the recovery rule of :mod:`fastsae.loading.atomic_dir`), or the complete
    new cache where it lies when that swap cannot be finished (a read-only filesystem)."""
    return recover_dir(Path(path))


def detect_cache_layout(path: str | os.PathLike) -> str:
    """``"fastsae"`` for a folder with ``cache_info.json`` (``fastsae cache``),
    ``"sae_lens"`` for a ``datasets`` folder (``state.json`` + ``dataset_info.json``, as
    SAELens's ``CacheActivationsRunner`` writes); an error naming both otherwise."""
    root = cache_dir_to_read(path)
    if not root.exists():
        raise FileNotFoundError(f"activation cache directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"activation cache path {root} is not a directory")
    if (root / CACHE_INFO_FILENAME).exists():
        return FASTSAE_LAYOUT
    if (root / HF_STATE_FILENAME).exists() and (root / HF_INFO_FILENAME).exists():
        return SAE_LENS_LAYOUT
    raise FileNotFoundError(
        f"{root / CACHE_INFO_FILENAME} is missing: {root} is not a cache written by "
        f"cache_activations, nor a SAELens activation cache (a datasets folder with "
        f"{HF_STATE_FILENAME} and {HF_INFO_FILENAME}); its files are "
        f"{sorted(p.name for p in root.iterdir())[:10]}"
    )


def read_cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``cache_info.json`` of a cache directory, its keys checked (the
    directory as :func:`cache_dir_to_read` finds it)."""
    root = cache_dir_to_read(path)
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


class _SafetensorsShards:
    """The shards of a fastsae cache (``cache_info.json``'s list), their headers and
    lengths checked at construction without reading data."""

    def __init__(self, root: Path, info: dict[str, Any], d_in: int, dtype: str):
        self.files = [root / s["file"] for s in info["shards"]]
        self.rows = [int(s["n_rows"]) for s in info["shards"]]
        for file, n_rows in zip(self.files, self.rows, strict=True):
            _check_shard(file, n_rows, d_in, dtype)

    def read(self, index: int, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of shard ``index`` (a memory-mapped slice)."""
        with safe_open(str(self.files[index]), framework="pt") as f:
            return f.get_slice(SHARD_KEY)[start:stop]

    def read_all(self, index: int) -> Tensor:
        with safe_open(str(self.files[index]), framework="pt") as f:
            return f.get_tensor(SHARD_KEY)


class _SaeLensShards:
    """A SAELens activation cache (a ``datasets`` folder, one ``[context_size, d_in]``
    row per sequence in the hook's column) as shards of whole sequences: shard ``i``
    holds the token rows of sequences ``[i * S, (i + 1) * S)``, ``S`` sequences being
    about as many bytes as a fastsae shard. Rows are read memory-mapped."""

    def __init__(self, root: Path, hook_name: str | None):
        import datasets

        try:
            ds = datasets.load_from_disk(str(root))
        except Exception as e:  # noqa: BLE001 - datasets/pyarrow/json raise many kinds
            raise ValueError(
                f"SAELens activation cache {root} cannot be read as a datasets folder: "
                f"{type(e).__name__}: {e}"
            ) from e
        if not isinstance(ds, datasets.Dataset):
            raise ValueError(
                f"{root} holds a DatasetDict (splits {list(ds)}), not a SAELens activation cache"
            )
        columns = list(ds.features)
        arrays = [c for c in columns if isinstance(ds.features[c], datasets.Array2D)]
        if hook_name is not None:
            if hook_name not in columns:
                raise ValueError(
                    f"SAELens activation cache {root} has no activations of hook "
                    f"{hook_name!r}; its columns are {columns}"
                )
            column = hook_name
        elif len(arrays) == 1:
            column = arrays[0]
        else:
            what = f"activations of the hooks {arrays}" if arrays else "no activations column"
            raise ValueError(
                f"SAELens activation cache {root} holds {what} (an Array2D column "
                f"[context_size, d_in]); its columns are {columns}"
                + ("; pass hook_name= to pick one" if arrays else "")
            )
        feature = ds.features[column]
        if not isinstance(feature, datasets.Array2D):
            raise ValueError(
                f"column {column!r} of SAELens activation cache {root} is "
                f"{type(feature).__name__}, not activations (Array2D [context_size, d_in])"
            )
        self.column = column
        self.context_size, self.d_in = (int(n) for n in feature.shape)
        try:
            self.dtype = dtype_to_str(feature.dtype)
        except (ValueError, KeyError):
            raise ValueError(
                f"column {column!r} of SAELens activation cache {root} holds {feature.dtype} "
                "values, not floating-point activations"
            ) from None
        self.n_sequences = len(ds)
        if self.n_sequences == 0:
            raise ValueError(f"SAELens activation cache {root} has no rows")
        self.has_token_ids = "token_ids" in columns
        # arrow, not numpy: datasets' numpy formatter returns float16 arrays as float32
        self._ds = ds.with_format("arrow", columns=[column])
        row_bytes = self.context_size * self.d_in * str_to_dtype(self.dtype).itemsize
        self._seqs_per_shard = max(1, _SAE_LENS_SHARD_BYTES // row_bytes)
        starts = range(0, self.n_sequences, self._seqs_per_shard)
        self.rows = [
            (min(s + self._seqs_per_shard, self.n_sequences) - s) * self.context_size
            for s in starts
        ]

    def read(self, index: int, start: int, stop: int) -> Tensor:
        """Token rows ``[start, stop)`` of shard ``index``: ``[stop - start, d_in]``."""
        ctx = self.context_size
        first, last = start // ctx, -(-stop // ctx)  # the sequences holding those rows
        base = index * self._seqs_per_shard
        chunks = self._ds[base + first : base + last][self.column].chunks
        block = np.concatenate([c.to_numpy(zero_copy_only=False) for c in chunks])
        rows = torch.from_numpy(np.ascontiguousarray(block)).reshape(-1, self.d_in)
        return rows[start - first * ctx : stop - first * ctx]

    def read_all(self, index: int) -> Tensor:
        return self.read(index, 0, self.rows[index])


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
        path: a directory written by ``cache_activations`` (fastsae's layout) or by a
            ``CacheActivationsRunner`` (SAELens's layout: its activations are served
            row after row of each sequence; its ``token_ids`` are not read).
        train_batch_size_tokens: rows per batch.
        shuffle: shuffle shards and rows (seeded by ``seed``).
        device, dtype: where and in what dtype batches are returned (default: the
            cache's dtype).
        n_shards_in_buffer: shards loaded and mixed together when shuffling.
        hook_name: the hook whose activations to read: picks the column of a SAELens
            cache that holds several (needed only then), and must be the hook of a
            fastsae cache that records one.
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
        hook_name: str | None = None,
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
        if hook_name is not None and (not isinstance(hook_name, str) or not hook_name):
            raise ValueError(f"hook_name must be a non-empty str or None, got {hook_name!r}")
        self.path = cache_dir_to_read(path)
        self.layout = detect_cache_layout(self.path)
        self._shards: _SafetensorsShards | _SaeLensShards
        if self.layout == FASTSAE_LAYOUT:
            self.info = read_cache_info(self.path)
            cached_hook = self.info.get("hook_name")
            if hook_name is not None and cached_hook is not None and cached_hook != hook_name:
                raise ValueError(
                    f"activation cache {self.path} holds activations of hook {cached_hook!r}, "
                    f"not {hook_name!r}"
                )
            dtype_name = dtype_to_str(str_to_dtype(self.info["dtype"]))
            self._shards = _SafetensorsShards(
                self.path, self.info, int(self.info["d_in"]), dtype_name
            )
        else:
            shards = _SaeLensShards(self.path, hook_name)
            self._shards = shards
            self.info = {
                "format": SAE_LENS_LAYOUT,
                "d_in": shards.d_in,
                "dtype": shards.dtype,
                "n_tokens": sum(shards.rows),
                "hook_name": shards.column,
                "context_size": shards.context_size,
                "n_sequences": shards.n_sequences,
                "has_token_ids": shards.has_token_ids,
            }
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
        self._rows = self._shards.rows
        self.epoch = 0
        self._offset = 0  # rows of this epoch already served
        self._layout: tuple[int, list[list[int]], list[int]] | None = None
        self._group: tuple[int, int, Tensor] | None = None  # (epoch, group, rows)

    @classmethod
    def from_config(cls, cfg: Any) -> CachedActivationsStore:
        """From a runner config: cached_activations_path, train_batch_size_tokens, seed,
        act_store_device (or device), dtype and hook_name, read by name."""
        device = getattr(cfg, "act_store_device", None) or getattr(cfg, "device", "cpu")
        return cls(
            cfg.cached_activations_path,
            train_batch_size_tokens=getattr(cfg, "train_batch_size_tokens", 4096),
            seed=getattr(cfg, "seed", 42),
            device="cpu" if device == "with_model" else device,
            dtype=getattr(cfg, "dtype", None),
            hook_name=getattr(cfg, "hook_name", None) or None,
        )

    # -- the order of one epoch --------------------------------------------------------------
    def _epoch_layout(self) -> tuple[list[list[int]], list[int]]:
        """Shard groups of the current epoch and the epoch offset each group starts at."""
        if self._layout is None or self._layout[0] != self.epoch:
            n = len(self._rows)
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
        rows = torch.cat([self._shards.read_all(i) for i in shards])
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
        return self._shards.read(groups[index][0], start - base, stop - base)

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
