"""Activations cached on disk: write them once, train on them many times.

Layout of a cache directory::

    cache_info.json            # d_in, dtype, n_tokens, hook_name, context_size, shards, ...
    shard_00000.safetensors    # key "activations": [n_rows, d_in]
    shard_00001.safetensors
    ...

``cache_activations`` writes one from an ``ActivationsStore`` into a temporary sibling
folder swapped in as a whole at the end (:mod:`fastsae.loading.atomic_dir`), so a reader
finds the old cache or the new one, each complete, whenever the writer is killed.
``CachedActivationsStore`` (:mod:`fastsae.training.data.cached_activations_store`) reads one
back as ``[train_batch_size_tokens, d_in]`` batches.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from fastsae import __version__
from fastsae.loading.atomic_dir import check_replaceable, commit_dir, new_temp_dir, recover_dir
from fastsae.saes.config import dtype_to_str, str_to_dtype
from fastsae.training.data.activations_store import ActivationsStore
from fastsae.training.data.cached_activations_store import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    CACHE_INFO_FILENAME,
    SHARD_KEY,
)


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def check_cache_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a cache target that :func:`cache_activations` would refuse, before any work
    (loading a model, computing activations): a file, a non-empty folder unless
    ``overwrite``, the current folder or one that holds it. A swap that a kill interrupted
    is finished first, so its cache counts as there. Returns ``path`` as a ``Path``."""
    target = Path(path)
    if not str(path).strip():
        raise ValueError("cache path is empty; give a folder (use '.' for the current one)")
    recover_dir(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"cache path {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"cache directory {target} is not empty; pass overwrite=True to replace it"
        )
    check_replaceable(target)
    return target


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
    target = check_cache_target(path, overwrite)
    tmp = new_temp_dir(target)
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
        check_cache_target(target, overwrite)  # a cache may have appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the old cache stays complete until the new one is: never rmtree before the rename
    commit_dir(tmp, target)
    return target


def cache_activations_from_config(
    cfg: Any,
    model: Any = None,
    dataset: Any = None,
    *,
    model_loader: Callable[[Any], Any] | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Cache ``cfg.training_tokens`` activations to ``cfg.cached_activations_path``.

    The store is ``ActivationsStore.from_config(model, cfg, dataset, tokenizer=tokenizer)``.
    The caller owns model loading: pass ``model`` (with ``tokenizer`` for a ``transformers``
    model), or ``model_loader(cfg) -> model`` (the model alone, not
    :func:`fastsae.training.runner.load_model`'s ``(model, tokenizer)`` pair).
    """
    path = getattr(cfg, "cached_activations_path", None)
    if not path:
        raise ValueError("cfg.cached_activations_path is not set: nowhere to write the cache")
    # a taken target fails here, not after a model load that can take minutes
    check_cache_target(path, overwrite)
    if model is None:
        if model_loader is None:
            raise ValueError("cache_activations_from_config needs model= or model_loader=")
        model = model_loader(cfg)
    store = ActivationsStore.from_config(model, cfg, override_dataset=dataset, tokenizer=tokenizer)
    metadata = {
        k: v
        for k in ("model_name", "model_class_name", "dataset_path")
        if isinstance(v := getattr(cfg, k, None), (str, int, float, bool)) and v != ""
    }
    return cache_activations(
        store, path, int(cfg.training_tokens), metadata=metadata, overwrite=overwrite
    )


# ----------------------------------------------------------------------------------------
