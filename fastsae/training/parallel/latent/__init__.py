"""Latent sharding on ``torch.distributed``: the per-latent parameters (``W_enc``
columns, ``b_enc``, ``W_dec`` rows, JumpReLU's ``threshold``) and so their Adam state
split over the ranks of a shard group along ``d_sae``; ``b_dec`` replicated.

* :mod:`.base`: layout, collectives and their autograd rules, ``from_full`` /
  ``gather_full``, :func:`clip_grad_norm_sharded`;
* :mod:`.selection`: the exact top-k over sharded latents (:func:`global_topk`);
* :mod:`.dense`: the step of architectures without a selection (standard, JumpReLU);
* :mod:`.evaluation`: the trainer's evaluation metrics computed on the shards;
* :mod:`.build`: a shard built without the full SAE (its latents of the full
  initialisation, or read from a saved SAE); :mod:`.save`: the full SAE's directory
  written from the shards, a block at a time;
* :mod:`.checkpoint` / :mod:`.mesh`: per-shard training state on disk; the 2-D mesh;
* :mod:`.trainer`: the trainer; :mod:`.communication`: bytes sent per step.

Each architecture's sharded class lives in its own module (``ShardedTopKTrainingSAE``
in :mod:`fastsae.saes.topk`, ...) and is registered there as ``sharded=``;
:func:`shard_sae` finds it through the registry.
"""

from __future__ import annotations

from fastsae.saes.registry import RegistryView, sharded_class_for_architecture
from fastsae.saes.training_sae import TrainingSAE
from fastsae.training.parallel.latent.base import (
    SHARD_DIMS,
    ShardedTrainingSAE,
    clip_grad_norm_sharded,
    shard_range,
    shard_tensor,
)
from fastsae.training.parallel.latent.selection import global_topk

SHARDED_CLASSES = RegistryView("sharded")


def shard_sae(full_sae: TrainingSAE, rank: int, world_size: int, group=None) -> ShardedTrainingSAE:
    """Rank ``rank``'s shard (of ``world_size`` in ``group``) of ``full_sae`` (copied)."""
    cls = sharded_class_for_architecture(full_sae.cfg.architecture())
    return cls.from_full(full_sae, rank, world_size, group)


__all__ = [
    "SHARDED_CLASSES",
    "SHARD_DIMS",
    "ShardedTrainingSAE",
    "clip_grad_norm_sharded",
    "global_topk",
    "shard_range",
    "shard_sae",
    "shard_tensor",
    "sharded_class_for_architecture",
]
