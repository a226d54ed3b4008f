"""The 2-D device mesh of a latent-sharded run: ``data_parallel x latent_shards``.

``WORLD_SIZE = data_parallel * latent_shards``; global rank ``r`` is at mesh position
``(r // latent_shards, r % latent_shards)``, so a shard group is ``latent_shards``
consecutive ranks (one node's GPUs when ``latent_shards`` is the node size: the
per-step reconstruction all-reduce stays on NVLink) and data-parallel gradients are
averaged across nodes. Built with ``torch.distributed.device_mesh.init_device_mesh``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


@dataclass(frozen=True)
class LatentMesh:
    """Where this rank sits: ``shard_rank`` of ``shard_size`` in its shard group (which
    splits the latents), ``dp_rank`` of ``dp_size`` in its data-parallel group (which
    splits the batch). Groups are ``None`` on one process."""

    dp_size: int = 1
    shard_size: int = 1
    dp_rank: int = 0
    shard_rank: int = 0
    dp_group: Any = None
    shard_group: Any = None

    @property
    def world_size(self) -> int:
        return self.dp_size * self.shard_size


def init_latent_mesh(latent_shards: int) -> LatentMesh:
    """The mesh for ``latent_shards`` over the default process group (already joined)."""
    if not (dist.is_available() and dist.is_initialized()):
        if latent_shards != 1:
            raise ValueError(
                f"latent_shards={latent_shards} needs a process group of a multiple of "
                f"{latent_shards} ranks (launch with torchrun); this is one process"
            )
        return LatentMesh()
    world = dist.get_world_size()
    if latent_shards < 1 or world % latent_shards:
        raise ValueError(
            f"latent_shards={latent_shards} must divide the number of processes "
            f"(WORLD_SIZE={world}): the ranks form a data_parallel x latent_shards mesh"
        )
    dp = world // latent_shards
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dp, latent_shards), mesh_dim_names=("dp", "latent"))
    return LatentMesh(
        dp_size=dp,
        shard_size=latent_shards,
        dp_rank=mesh.get_local_rank("dp"),
        shard_rank=mesh.get_local_rank("latent"),
        dp_group=mesh.get_group("dp"),
        shard_group=mesh.get_group("latent"),
    )
