"""Latent-sharded training SAEs on ``torch.distributed``: the per-latent parameters
(``W_enc`` columns, ``b_enc``, ``W_dec`` rows, JumpReLU's ``threshold``) and so their
Adam state split over the ranks of a shard group along ``d_sae``; ``b_dec`` replicated.

* :mod:`.base`: layout, collectives and their autograd rules, ``from_full`` /
  ``gather_full``, :func:`clip_grad_norm_sharded`;
* :mod:`.topk`: TopK with an exact distributed top-k (:func:`global_topk`) and AuxK;
* :mod:`.batchtopk`: BatchTopK (the batch-wide top ``k * batch``, threshold EMA);
* :mod:`.dense`: standard (ReLU + Lp) and JumpReLU, which need no selection step;
* :mod:`.evaluation`: the trainer's evaluation metrics computed on the shards;
* :mod:`.build`: a shard built without the full SAE (its latents of the full
  initialisation, or read from a saved SAE); :mod:`.save`: the full SAE's directory
  written from the shards, a block at a time;
* :mod:`.checkpoint` / :mod:`.mesh`: per-shard training state on disk; the 2-D mesh.

:func:`shard_sae` picks the class for a full training SAE.
"""

from __future__ import annotations

from fastsae.training.latent_sharding.base import (
    SHARD_DIMS,
    ShardedTrainingSAE,
    clip_grad_norm_sharded,
    shard_range,
    shard_tensor,
)
from fastsae.training.latent_sharding.batchtopk import ShardedBatchTopKTrainingSAE
from fastsae.training.latent_sharding.dense import (
    ShardedJumpReLUTrainingSAE,
    ShardedStandardTrainingSAE,
)
from fastsae.training.latent_sharding.topk import ShardedTopKTrainingSAE, global_topk
from fastsae.training.saes.base import TrainingSAE

SHARDED_CLASSES: dict[str, type[ShardedTrainingSAE]] = {
    "topk": ShardedTopKTrainingSAE,
    "batchtopk": ShardedBatchTopKTrainingSAE,
    "standard": ShardedStandardTrainingSAE,
    "jumprelu": ShardedJumpReLUTrainingSAE,
}


def sharded_class_for_architecture(architecture: str) -> type[ShardedTrainingSAE]:
    """The sharded class of a training architecture (``topk``, ``batchtopk``,
    ``standard``, ``jumprelu``)."""
    try:
        return SHARDED_CLASSES[architecture]
    except KeyError:
        raise NotImplementedError(
            f"latent sharding supports architectures {sorted(SHARDED_CLASSES)}, not "
            f"{architecture!r}"
        ) from None


def shard_sae(full_sae: TrainingSAE, rank: int, world_size: int, group=None) -> ShardedTrainingSAE:
    """Rank ``rank``'s shard (of ``world_size`` in ``group``) of ``full_sae`` (copied)."""
    cls = sharded_class_for_architecture(full_sae.cfg.architecture())
    return cls.from_full(full_sae, rank, world_size, group)


__all__ = [
    "SHARDED_CLASSES",
    "SHARD_DIMS",
    "ShardedBatchTopKTrainingSAE",
    "ShardedJumpReLUTrainingSAE",
    "ShardedStandardTrainingSAE",
    "ShardedTopKTrainingSAE",
    "ShardedTrainingSAE",
    "clip_grad_norm_sharded",
    "global_topk",
    "shard_range",
    "shard_sae",
    "shard_tensor",
    "sharded_class_for_architecture",
]
