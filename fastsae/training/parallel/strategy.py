"""How a training run is spread over processes, chosen once per run.

:func:`choose_strategy` joins torchrun's process group (when launched so), checks the
config against the world size and returns one :class:`ParallelStrategy`:

* :class:`SingleProcessStrategy`: one process, :class:`~fastsae.training.trainer.SAETrainer`;
* :class:`DataParallelStrategy`: ``WORLD_SIZE > 1`` replicas of the full SAE, each on its
  share of the batch (:class:`~fastsae.training.parallel.data_parallel.DistributedSAETrainer`);
* :class:`LatentShardedStrategy`: ``latent_shards > 1``, a ``data_parallel x latent_shards``
  mesh whose shard groups split the latents
  (:class:`~fastsae.training.parallel.latent.trainer.LatentShardedSAETrainer`).

A strategy owns what differs between them: the training SAE it builds (or the shard),
what it makes of a given SAE, this rank's data, the trainer, the evaluation metrics,
the final SAE and its log sparsity, and which rank saves the result. The runner
(:class:`~fastsae.training.runner.SAETrainingRunner`) calls these and never asks which
strategy it holds.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from fastsae.evals import language_model_metrics, reconstruction_metrics
from fastsae.saes.registry import (
    sharded_class_for_architecture,
    training_sae_class_for_architecture,
)
from fastsae.saes.training_sae import TrainingSAE, TrainingSAEConfig
from fastsae.training.config import LanguageModelSAERunnerConfig
from fastsae.training.parallel.collectives import check_same_tensors, comm_device
from fastsae.training.parallel.data_parallel import (
    DistInfo,
    DistributedSAETrainer,
    init_distributed,
)
from fastsae.training.parallel.latent import SHARD_DIMS, ShardedTrainingSAE, shard_sae
from fastsae.training.parallel.latent.build import init_shard, load_shard_weights_
from fastsae.training.parallel.latent.evaluation import (
    sharded_language_model_metrics,
    sharded_reconstruction_metrics,
)
from fastsae.training.parallel.latent.mesh import LatentMesh, init_latent_mesh
from fastsae.training.parallel.latent.trainer import LatentShardedSAETrainer
from fastsae.training.parallel.rank_shards import RankShardedProvider
from fastsae.training.trainer import SAETrainer


class ParallelStrategy(ABC):
    """One run's parallelism: ``cfg`` (the runner config) on this process (``dist``).

    The defaults are those of a full SAE on every process: the given SAE trained as is,
    :mod:`fastsae.evals` metrics, the fitted SAE returned with the trainer's sparsity.
    """

    trainer_cls: ClassVar[type[SAETrainer]] = SAETrainer

    def __init__(self, cfg: LanguageModelSAERunnerConfig, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist

    @property
    def mesh(self) -> LatentMesh | None:
        """The ``data_parallel x latent_shards`` mesh of a latent-sharded run, else None."""
        return None

    @property
    def is_main(self) -> bool:
        """Whether this process logs to wandb and saves the result (global rank 0)."""
        return self.dist.rank == 0

    @abstractmethod
    def build_sae(self, sae_cfg: TrainingSAEConfig) -> Any:
        """A fresh training SAE (or this rank's shard) of ``sae_cfg``, with the weights of
        ``cfg.from_pretrained_path`` when that is set."""

    def prepare_sae(self, sae: Any) -> Any:
        """What the trainer trains, given the runner's SAE (built, or an ``override_sae``)."""
        return sae

    @abstractmethod
    def trainer_data(self, store: Any) -> Any:
        """This process's batches of the activation source ``store``."""

    def make_trainer(self, cfg: Any, sae: Any, data: Any, **kwargs: Any) -> SAETrainer:
        """The trainer of ``sae`` on ``data`` (``kwargs``: the trainer's keywords)."""
        return self.trainer_cls(cfg, sae, data, **kwargs)

    def reconstruction_metrics(self, sae: Any, batches: list[Tensor]) -> dict[str, Any]:
        """The evaluator's reconstruction metrics (:func:`fastsae.evals.reconstruction_metrics`)."""
        return reconstruction_metrics(sae, batches)

    def language_model_metrics(
        self, sae: Any, model: Any, tokens: Tensor, hook_name: str, *, hook_head_index: int | None
    ) -> dict[str, Any]:
        """The evaluator's model metrics (:func:`fastsae.evals.language_model_metrics`)."""
        return language_model_metrics(
            sae, model, tokens, hook_name, hook_head_index=hook_head_index
        )

    def final_sae(self, trainer: SAETrainer, fitted: Any) -> tuple[Any, Tensor | None]:
        """``(the SAE the run returns and saves, its log sparsity or None for the
        trainer's)`` once ``trainer.fit()`` returned ``fitted``. Every rank calls it."""
        return fitted, None


class SingleProcessStrategy(ParallelStrategy):
    """One process: the full training SAE on ``cfg.device``, all of the data."""

    def build_sae(self, sae_cfg: TrainingSAEConfig) -> TrainingSAE:
        sae = training_sae_class_for_architecture(sae_cfg.architecture())(sae_cfg)
        if self.cfg.from_pretrained_path is not None:
            sae.load_weights_from_checkpoint(self.cfg.from_pretrained_path)
        return sae.to(self.cfg.device)

    def trainer_data(self, store: Any) -> Any:
        return store


class DataParallelStrategy(SingleProcessStrategy):
    """``WORLD_SIZE`` replicas of the full SAE over the default process group, each
    training on its rows of every global batch (gradients averaged)."""

    trainer_cls = DistributedSAETrainer

    def trainer_data(self, store: Any) -> Any:
        return replica_data(self.cfg, store, self.dist.rank, self.dist.world_size)


class LatentShardedStrategy(ParallelStrategy):
    """``latent_shards > 1``: each rank holds ``d_sae / latent_shards`` latents (its shard
    group's share) and trains its data-parallel replica's rows; the full SAE exists only
    in rank 0's host memory at the end."""

    trainer_cls = LatentShardedSAETrainer

    def __init__(self, cfg: LanguageModelSAERunnerConfig, dist: DistInfo, mesh: LatentMesh):
        super().__init__(cfg, dist)
        self._mesh = mesh

    @property
    def mesh(self) -> LatentMesh:
        return self._mesh

    def build_sae(self, sae_cfg: TrainingSAEConfig) -> ShardedTrainingSAE:
        """This rank's shard, built without the full SAE: its latents of the full
        initialisation (the same RNG draws as one process building on the CPU makes),
        then of ``from_pretrained_path`` when given (only those latents read), in host
        memory (the trainer moves it to ``cfg.device``). Every replica of a shard must
        hold the same tensors (checked)."""
        mesh = self.mesh
        sae_cfg = dataclasses.replace(sae_cfg, device="cpu")  # the RNG draws of a CPU build
        cls = sharded_class_for_architecture(sae_cfg.architecture())
        shard = init_shard(cls, sae_cfg, mesh.shard_rank, mesh.shard_size, mesh.shard_group)
        if self.cfg.from_pretrained_path is not None:
            load_shard_weights_(shard, self.cfg.from_pretrained_path)
        device = comm_device(self.dist.device)
        check_same_tensors(shard, device, "initial SAE shard", group=mesh.dp_group)
        check_same_tensors(shard, device, "initial SAE", names=lambda n: n not in SHARD_DIMS)
        return shard

    def prepare_sae(self, sae: Any) -> ShardedTrainingSAE:
        if isinstance(sae, ShardedTrainingSAE):
            return sae
        # an override_sae: every rank holds the same full SAE (checked) and keeps
        # d_sae / latent_shards of its latents
        mesh = self.mesh
        check_same_tensors(sae, comm_device(self.dist.device), "initial SAE")
        return shard_sae(sae, mesh.shard_rank, mesh.shard_size, mesh.shard_group)

    def trainer_data(self, store: Any) -> Any:
        # the ranks of a shard group draw the same rows
        return replica_data(self.cfg, store, self.mesh.dp_rank, self.mesh.dp_size)

    def make_trainer(self, cfg: Any, sae: Any, data: Any, **kwargs: Any) -> SAETrainer:
        return self.trainer_cls(cfg, sae, data, mesh=self.mesh, **kwargs)

    # the metrics computed on the shards, nothing gathered
    def reconstruction_metrics(self, sae: Any, batches: list[Tensor]) -> dict[str, Any]:
        return sharded_reconstruction_metrics(sae, batches)

    def language_model_metrics(
        self, sae: Any, model: Any, tokens: Tensor, hook_name: str, *, hook_head_index: int | None
    ) -> dict[str, Any]:
        return sharded_language_model_metrics(
            sae, model, tokens, hook_name, hook_head_index=hook_head_index
        )

    def final_sae(self, trainer: SAETrainer, fitted: Any) -> tuple[Any, Tensor | None]:
        """Rank 0 gathers the full training SAE in host memory (``cpu``: it may not fit
        one device) with its sparsity; the other ranks return their shard."""
        assert isinstance(trainer, LatentShardedSAETrainer)
        full, sparsity = trainer.gather_to_rank0()
        return (full if self.is_main else trainer.sae), sparsity


def choose_strategy(cfg: LanguageModelSAERunnerConfig) -> ParallelStrategy:
    """The strategy for ``cfg`` on this process: joins torchrun's process group when
    launched under it (``WORLD_SIZE > 1``), checks that ``cfg`` fits the world size, and
    on CUDA moves ``cfg``'s devices to this rank's GPU.

    Under torchrun: data parallel over the default process group, or a
    ``data_parallel x latent_shards`` mesh when ``cfg.latent_shards > 1``.
    """
    latent = cfg.latent_shards > 1
    if latent:
        sharded_class_for_architecture(cfg.sae.architecture())  # raises for the others
    dist = init_distributed()
    world = dist.world_size
    if latent and world % cfg.latent_shards:
        raise ValueError(
            f"latent_shards={cfg.latent_shards} must divide the number of processes "
            f"(WORLD_SIZE={world}): launch with torchrun --nproc_per_node a multiple of "
            f"{cfg.latent_shards} (the ranks form a data_parallel x latent_shards mesh)"
        )
    data_parallel = world // cfg.latent_shards
    if cfg.train_batch_size_tokens % data_parallel:
        raise ValueError(
            f"train_batch_size_tokens={cfg.train_batch_size_tokens} must be divisible by "
            f"the number of data-parallel replicas ({data_parallel} = WORLD_SIZE {world} "
            f"/ latent_shards {cfg.latent_shards})"
        )
    if world > 1 and str(cfg.device).startswith("cuda"):
        cfg.device = cfg.llm_device = cfg.act_store_device = str(dist.device)
        cfg.sae.device = str(dist.device)
    if latent:
        return LatentShardedStrategy(cfg, dist, init_latent_mesh(cfg.latent_shards))
    if world > 1:
        return DataParallelStrategy(cfg, dist)
    return SingleProcessStrategy(cfg, dist)


def replica_data(
    cfg: LanguageModelSAERunnerConfig, store: Any, replica: int, n_replicas: int
) -> Any:
    """Data-parallel replica ``replica``'s (of ``n_replicas``) batches of ``store`` (see
    ``cfg.data_parallel_mode``)."""
    if n_replicas == 1:
        return store
    mode = cfg.data_parallel_mode
    if mode is None:
        mode = "split" if cfg.use_cached_activations else "shard"
    if mode == "shard":
        # this replica tokenizes its own documents and runs the model on their rows
        store.shard_for_data_parallel(replica, n_replicas)
        return store
    # every replica draws the same global batch and keeps its rows: the data
    # position is then the same everywhere and resumes at any world size
    return RankShardedProvider(store, replica, n_replicas, mode="split")


__all__ = [
    "DataParallelStrategy",
    "LatentShardedStrategy",
    "ParallelStrategy",
    "SingleProcessStrategy",
    "choose_strategy",
    "replica_data",
]
