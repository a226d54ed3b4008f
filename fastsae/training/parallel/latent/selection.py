"""The exact top-k over latents split across the ranks of a shard group: each rank's
local top-k candidates are all-gathered and every rank keeps the same global top-k.
A latent in the global top-k has fewer than k larger values anywhere, so it is in its
own shard's local top-k: the set equals the single-device ``torch.topk`` set (ties at
the k-th value: which is chosen is unspecified, as for ``torch.topk``)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae.training.parallel.latent.base import (
    all_gather,
    group_rank_and_world,
)


def global_topk(
    h_local: Tensor,
    k: int,
    offset: int,
    group=None,
    what: str = "topk candidates",
    d_sae: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact global top-k of a row-sharded ``[B, n_local]`` score matrix (no grad).

    Returns ``(local_positions [B, k'], selected [B, k'] bool, global_ids [B, k])`` where
    ``k' = min(k, n_local)`` are this rank's candidate columns and ``selected`` marks those
    in the global top-k. ``global_ids`` (sorted by value, descending) is the global
    selection, the same on every rank. Every rank must call it (it all-gathers).
    """
    k_local = min(k, h_local.shape[-1])
    vals, pos = torch.topk(h_local, k_local, dim=-1, sorted=False)
    selected, global_ids = merge_candidates(vals, pos, k, offset, group, what, d_sae)
    return pos, selected, global_ids


def merge_candidates(
    vals: Tensor,
    pos: Tensor,
    k: int,
    offset: int,
    group=None,
    what: str = "topk candidates",
    d_sae: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The global top-k of every rank's local candidates ``vals``/``pos [B, k']``
    (``k' <= k``; ``pos`` local columns, ``offset`` this rank's first latent).

    Returns ``(selected [B, k'] bool, global_ids [B, k])``: which of this rank's
    candidates are chosen, and the chosen global ids (descending by value, the same on
    every rank). Every rank must call it (it all-gathers ``[B, k]`` values and ids; the
    ids as int32 when the global width ``d_sae`` is given and below 2^31).
    """
    batch, k_local = vals.shape
    # int32 ids halve the id traffic; int64 only past 2^31 latents (the same on every rank)
    id_dtype = torch.int32 if d_sae is not None and d_sae < 2**31 else torch.int64
    cand_vals = vals.new_full((batch, k), float("-inf"))
    cand_ids = torch.full((batch, k), -1, dtype=id_dtype, device=vals.device)
    cand_vals[:, :k_local] = vals
    cand_ids[:, :k_local] = pos + offset
    all_vals = torch.cat(all_gather(cand_vals, group, what + " (values)"), dim=-1)
    all_ids = torch.cat(all_gather(cand_ids, group, what + " (ids)"), dim=-1).long()
    _, top_pos = torch.topk(all_vals, k, dim=-1, sorted=True)
    global_ids = all_ids.gather(-1, top_pos)
    rank = group_rank_and_world(group)[0]
    mine = top_pos[:, :, None] == (rank * k + torch.arange(k_local, device=vals.device))
    selected = mine.any(dim=1)  # [B, k_local]: candidate j of this rank was chosen
    return selected, global_ids
