"""Saving a latent-sharded SAE as one ordinary SAELens directory without the full SAE
in any process's memory: the shards travel to the writing rank a block at a time and
go straight into ``sae_weights.safetensors``.

Every rank of the shard group calls :func:`save_sharded_sae` (the same collectives in
the same order); rank ``dst`` of the group writes. The file is the one
``gather_full(...).save_model(...)`` would write (same tensors, dtypes, ``cfg.json``),
and is written like every SAELens directory here: a complete folder swapped in as a
whole (:mod:`fastsae.loading.atomic_dir`), or straight into a checkpoint's temporary
folder.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from fastsae.loading.disk import write_sae_dir
from fastsae.loading.safetensors_stream import write_safetensors_blocks
from fastsae.training.parallel.latent.base import (
    SHARD_DIMS,
    ShardedTrainingSAE,
    broadcast_shard,
    meta_full,
)

SAVE_BLOCK_BYTES = 1 << 26  # at most this much of one tensor travels at a time


def full_state_specs(shard: ShardedTrainingSAE) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, full shape)`` of the full SAE's state dict, in its order: names
    and shapes from a build on the meta device, dtypes the shard's (fp32 JumpReLU
    threshold, float64 BatchTopK threshold)."""
    own = shard.state_dict()
    full = meta_full(shard.full_class, shard.cfg)
    return [(name, own[name].dtype, tuple(t.shape)) for name, t in full.state_dict().items()]


def _rows_per_block(row_elements: int, dtype: torch.dtype, block_bytes: int) -> int:
    row_bytes = max(1, row_elements * torch.empty((), dtype=dtype).element_size())
    return max(1, block_bytes // row_bytes)


@torch.no_grad()
def full_blocks(
    shard: ShardedTrainingSAE, dst: int, block_bytes: int = SAVE_BLOCK_BYTES
) -> Iterator[tuple[str, Tensor | None]]:
    """The full SAE's state, tensor by tensor in :func:`full_state_specs` order, as
    ``(name, block)`` pairs of row-major blocks of at most ~``block_bytes``; the block
    is None on every rank but ``dst``. Every rank of the shard group must consume it
    entirely (each block is one broadcast per shard)."""
    own = dict(shard.state_dict())
    keep = shard.rank == dst
    n_local = shard.d_sae_local
    for name, dtype, shape in full_state_specs(shard):
        t = own[name].detach()
        dim = SHARD_DIMS.get(name)
        if dim is None:  # replicated: dst's own copy
            yield name, (t if keep else None)
        elif dim == 0:  # [d_sae, ...]: shard s holds a run of whole rows
            rows = _rows_per_block(t[0].numel() if t.ndim > 1 else 1, dtype, block_bytes)
            for s in range(shard.world_size):
                for a in range(0, n_local, rows):
                    b = min(n_local, a + rows)
                    part = broadcast_shard(t[a:b], s, shard.group, f"save {name}")
                    yield name, (part if keep else None)
        else:  # [rows, d_sae]: each full row is the shards' pieces side by side
            rows = _rows_per_block(shard.cfg.d_sae, dtype, block_bytes)
            for a in range(0, shape[0], rows):
                b = min(shape[0], a + rows)
                pieces = [
                    broadcast_shard(t[a:b], s, shard.group, f"save {name}")
                    for s in range(shard.world_size)
                ]
                yield name, (torch.cat(pieces, dim=1) if keep else None)


def save_sharded_sae(
    shard: ShardedTrainingSAE,
    path: str | Path,
    *,
    sparsity: Tensor | None = None,
    dst: int = 0,
    block_bytes: int = SAVE_BLOCK_BYTES,
) -> Path | None:
    """Write the full SAE of which ``shard`` is one shard to ``path`` (SAELens format,
    ``sparsity [d_sae]`` beside it when given), from rank ``dst`` of the shard group,
    which returns ``path``; the other ranks return None. Every rank of the group calls
    it. A rank holds its shard plus one block besides, never the full SAE."""
    blocks = full_blocks(shard, dst, block_bytes)
    if shard.rank != dst:
        deque(blocks, maxlen=0)  # take part in every broadcast, keep nothing
        return None
    cfg = copy.deepcopy(shard.cfg)
    cfg.device = "cpu"  # as a full SAE gathered into host memory records it
    specs = full_state_specs(shard)
    try:
        write_sae_dir(
            path,
            lambda file: write_safetensors_blocks(file, specs, blocks),  # type: ignore[arg-type]
            cfg.to_dict(),
            d_sae=cfg.d_sae,
            sparsity=sparsity,
        )
    except Exception:
        # take part in the broadcasts the write did not reach, so that the other ranks
        # return (and this rank's error surfaces) instead of waiting for a timeout
        deque(blocks, maxlen=0)
        raise
    return Path(path)


__all__ = ["SAVE_BLOCK_BYTES", "full_blocks", "full_state_specs", "save_sharded_sae"]
