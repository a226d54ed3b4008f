"""The trainer's evaluations on a latent-sharded SAE, without gathering it.

Every rank of a shard group runs the shards' forward on the same batches
(:meth:`~fastsae.training.parallel.latent.base.ShardedTrainingSAE.reconstruct`): the
reconstruction is the full one on every rank, so the reconstruction metrics (explained
variance, MSE, cosine similarity, L2 ratio) and the model's CE loss / KL with the SAE
spliced in come out the same everywhere; what is per latent (L0, latents that never
fired) is counted on each shard and summed over the group. The values equal those of
:func:`fastsae.evals.reconstruction_metrics` and
:func:`fastsae.evals.language_model_metrics` on the gathered SAE, and no rank holds
more than its shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastsae.evals import language_model_metrics
from fastsae.evals.run import reconstruction_stats, reconstruction_summary
from fastsae.training.parallel.latent.base import ShardedTrainingSAE, all_reduce


@torch.no_grad()
def sharded_reconstruction_metrics(
    shard: ShardedTrainingSAE, batches: Iterable[Tensor]
) -> dict[str, float]:
    """:func:`fastsae.evals.reconstruction_metrics` of the unsharded SAE, computed on the
    shards (``batches``: ``[batch, d_in]``, the same on every rank of the group)."""
    stats, d_out = reconstruction_stats(shard.reconstruct, shard.d_sae_local, shard.device, batches)
    totals = torch.tensor(
        [stats.sums["l0"], float((stats.feature_acts == 0).sum())],
        dtype=torch.float64,
        device=shard.device,
    )
    l0_sum, dead = all_reduce(totals, shard.group, "eval L0 / dead latents all_reduce").tolist()
    return reconstruction_summary(stats, d_out, l0_sum / stats.n_tokens, int(round(dead)))


@torch.no_grad()
def sharded_language_model_metrics(
    shard: ShardedTrainingSAE,
    model: Any,
    tokens: Tensor,
    hook_name: str,
    *,
    hook_head_index: int | None = None,
) -> dict[str, float]:
    """:func:`fastsae.evals.language_model_metrics` with the shards' reconstruction
    spliced into the model (``tokens`` the same on every rank of the group)."""

    def predict(x: Tensor) -> Tensor:
        return shard.reconstruct(x.to(shard.device))[0]

    return language_model_metrics(
        shard, model, tokens, hook_name, hook_head_index=hook_head_index, predict=predict
    )


__all__ = ["sharded_language_model_metrics", "sharded_reconstruction_metrics"]
