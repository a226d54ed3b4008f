"""Latent-sharded training (``latent_shards > 1`` in the config, under ``torchrun``),
alone or combined with data parallelism on a 2-D mesh.

:class:`LatentShardedSAETrainer` is :class:`~fastsae.training.trainer.SAETrainer` on a
:class:`~fastsae.training.parallel.latent.ShardedTrainingSAE` (TopK, BatchTopK,
standard or JumpReLU). The ranks form a ``data_parallel x latent_shards`` mesh
(:mod:`fastsae.training.parallel.latent.mesh`): the ``latent_shards`` ranks of a shard
group hold ``d_sae / latent_shards`` latents each (and their Adam state) and train on
the same rows; the ``data_parallel`` shard groups train on disjoint rows of each global
batch (the caller gives each rank its replica's rows, e.g. a
:class:`~fastsae.training.parallel.rank_shards.RankShardedProvider` over ``dp_rank`` /
``dp_size``).

* Gradients: inside a shard group nothing to reduce (each shard owns its gradients and
  ``b_dec``'s is already full, see ``latent_sharding.base``); across the data-parallel
  group every gradient is averaged (one flat all_reduce per dtype).
* Clipping: :func:`~fastsae.training.parallel.latent.clip_grad_norm_sharded` (the norm
  of the unsharded, data-averaged gradient).
* Dead latents: firing counts are per shard (``[d_sae / latent_shards]``), summed over
  the data-parallel group; the SAE's losses take that local mask. Log rows: losses, MSE
  and explained variance averaged over the data-parallel group; L0 and the dead count
  summed over the shards.
* Evaluation (``evaluator``) gets this rank's shard (every rank of a shard group calls
  it with the same batches): the runner's evaluator computes its metrics on the shards
  (:mod:`fastsae.training.parallel.latent.evaluation`), nothing is gathered.
* Memory: no rank holds the full SAE, on its device or in host memory, while training:
  a checkpoint streams the shards into rank 0's file a block at a time
  (:mod:`~fastsae.training.parallel.latent.save`), and resuming reads only the rank's
  latents of it (and of the optimizer state: the overlapping shard files). The end of
  the run gathers the full SAE into rank 0's host memory (``gather_to_rank0``: the
  runner saves and returns it).
* Checkpoints: ``<checkpoint>/`` holds the full SAE in the ordinary SAELens format
  (streamed from the shards into rank 0's file), the replicated trainer state
  (``trainer_state.pt``) and per shard ``trainer_state_shard{s}.pt`` (that shard's
  optimizer state by parameter name and firing statistics, written by the shard's rank
  of the first data-parallel replica). A checkpoint resumes under **any** layout: another number of shards or
  data-parallel replicas, and single-process checkpoints load into a sharded run (and
  :class:`~fastsae.training.trainer.SAETrainer` resumes a sharded checkpoint), see
  :mod:`fastsae.training.parallel.latent.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastsae.saes.training_sae import TrainingSAE, TrainStepOutput
from fastsae.training.checkpoints import (
    TRAINER_STATE_FILENAME,
    load_torch_file,
    recover_checkpoint,
)
from fastsae.training.metrics import step_metrics
from fastsae.training.parallel.collectives import (
    all_reduce_sum_,
    average_buffers_,
    average_gradients,
    collective,
    comm_device,
    main_rank_outputs,
    rank_and_world,
    save_checkpoint_together,
    sum_fired_counts,
)
from fastsae.training.parallel.data_parallel import check_same_config
from fastsae.training.parallel.latent import ShardedTrainingSAE, clip_grad_norm_sharded
from fastsae.training.parallel.latent.build import full_parameter_names, load_shard_weights_
from fastsae.training.parallel.latent.checkpoint import (
    FIRING_KEYS,
    SHARD_STATE_FILENAME,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    read_latent_range,
)
from fastsae.training.parallel.latent.mesh import LatentMesh
from fastsae.training.parallel.latent.save import save_sharded_sae
from fastsae.training.trainer import SAETrainer


class LatentShardedSAETrainer(SAETrainer):
    """:class:`SAETrainer` for a latent-sharded SAE on a ``data_parallel x latent_shards``
    mesh.

    ``sae``: this rank's shard (``latent_sharding.build.init_shard`` builds it without
    the full SAE; ``shard_sae(full, mesh.shard_rank, mesh.shard_size, mesh.shard_group)``
    cuts it from a full SAE that every rank holds). ``mesh``: where this rank
    sits (default: pure latent sharding over the SAE's group, no data parallelism).
    ``data_provider``: this data-parallel replica's rows (the same on every rank of a
    shard group). ``run_dir`` (metrics) and logging are rank 0's.
    """

    def __init__(
        self,
        cfg: Any,
        sae: ShardedTrainingSAE,
        data_provider: Iterator[Tensor],
        *args: Any,
        mesh: LatentMesh | None = None,
        **kwargs: Any,
    ):
        if not isinstance(sae, ShardedTrainingSAE):
            raise TypeError(
                f"LatentShardedSAETrainer needs a ShardedTrainingSAE, got {type(sae).__name__}"
            )
        self.rank, self.world_size = rank_and_world()
        if mesh is None:
            mesh = LatentMesh(shard_size=sae.world_size, shard_rank=sae.rank, shard_group=sae.group)
        if (sae.rank, sae.world_size) != (mesh.shard_rank, mesh.shard_size):
            raise ValueError(
                f"the SAE shard is shard {sae.rank} of {sae.world_size}, but this process is "
                f"shard {mesh.shard_rank} of {mesh.shard_size} in the mesh"
            )
        if mesh.world_size != self.world_size:
            raise ValueError(
                f"the mesh ({mesh.dp_size} data-parallel x {mesh.shard_size} shards) does not "
                f"cover the {self.world_size} processes"
            )
        self.mesh = mesh
        super().__init__(cfg, sae, data_provider, *args, **main_rank_outputs(kwargs, self.rank))
        # firing statistics are per shard
        n_local, device = sae.d_sae_local, torch.device(cfg.device)
        self.act_freq_scores = torch.zeros(n_local, device=device)
        self.n_forward_passes_since_fired = torch.zeros(n_local, device=device)
        self._comm_device = comm_device(cfg.device)
        check_same_config(cfg, self._comm_device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------ collectives
    def _reduce_(
        self, values: list[float], over: str, what: str, mean: bool = False
    ) -> list[float]:
        """Sum (or average) ``values`` over the ``"dp"`` or the ``"shard"`` group."""
        m = self.mesh
        group, size = (m.dp_group, m.dp_size) if over == "dp" else (m.shard_group, m.shard_size)
        if size == 1:
            return values
        buf = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        collective(what, dist.all_reduce, buf, op=dist.ReduceOp.SUM, group=group)
        return (buf / size if mean else buf).tolist()

    def _gather_local(self, t: Tensor, what: str) -> Tensor:
        """A per-shard ``[d_sae_local]`` tensor concatenated into ``[d_sae]`` (every rank
        of the shard group must call it)."""
        if self.mesh.shard_size == 1:
            return t
        buf = t.to(self._comm_device).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.mesh.shard_size)]
        collective(what, dist.all_gather, parts, buf, group=self.mesh.shard_group)
        return torch.cat(parts).to(t.device)

    # ------------------------------------------------------------ the step's hooks
    def _after_backward(self) -> None:
        if self.mesh.dp_size > 1:
            average_gradients(
                self.sae.parameters(), self.mesh.dp_group, self.mesh.dp_size, self._comm_device
            )

    def _reduce_fired(self, fired: Tensor, n_tokens: int) -> tuple[Tensor, int]:
        """Firing counts and token count summed over the data-parallel replicas."""
        if self.mesh.dp_size == 1:
            return fired, n_tokens
        return sum_fired_counts(fired, n_tokens, self._comm_device, self.mesh.dp_group)

    def _clip_gradients(self, max_norm: float) -> Tensor:
        return clip_grad_norm_sharded(self.sae, max_norm)  # type: ignore[arg-type]

    def _sum_over_ranks(self, values: Tensor, what: str) -> Tensor:
        """Summed over every rank of the mesh (shards and replicas stop or skip a
        non-finite step together)."""
        if not self.distributed:
            return values
        return all_reduce_sum_(values, self._comm_device, what)

    def _after_optimizer_step(self) -> None:
        """Keep float buffers (BatchTopK's threshold EMA, equal within a shard group)
        equal across the data-parallel replicas: their mean."""
        if self.mesh.dp_size > 1:
            average_buffers_(self.sae, self.mesh.dp_size, self._comm_device, self.mesh.dp_group)

    # ------------------------------------------------------------ metrics
    def _log_row(self, output: TrainStepOutput) -> dict[str, Any]:
        """Token means averaged over the data-parallel replicas; per-shard quantities
        (L0, dead latents, passes since fired) summed over the shards."""
        row = step_metrics(output)
        row.update(
            {
                "sparsity/dead_features": float(self.dead_neurons.sum()),
                "sparsity/mean_passes_since_fired": float(self.n_forward_passes_since_fired.sum()),
            }
        )
        keys = sorted(k for k, v in row.items() if isinstance(v, (int, float)))
        values = self._reduce_([float(row[k]) for k in keys], "dp", "all_reduce(log metrics)", True)
        row.update(zip(keys, values, strict=True))
        summed = ("metrics/l0", "sparsity/dead_features", "sparsity/mean_passes_since_fired")
        totals = self._reduce_([row[k] for k in summed], "shard", "all_reduce(shard metrics)")
        row.update(zip(summed, totals, strict=True))
        row.update(
            {
                "sparsity/dead_features": int(round(row["sparsity/dead_features"])),
                "sparsity/mean_passes_since_fired": row["sparsity/mean_passes_since_fired"]
                / self.sae.cfg.d_sae,
                **self._details_metrics(),
            }
        )
        return row

    def _maybe_reset_sparsity(self) -> None:
        steps = self.state.n_training_steps
        if steps > 0 and steps % self.cfg.feature_sampling_window == 0:
            sparsity = self.feature_sparsity
            log_sum, below5, below6 = self._reduce_(
                [
                    float(torch.log10(sparsity + 1e-10).sum()),
                    float((sparsity < 1e-5).sum()),
                    float((sparsity < 1e-6).sum()),
                ],
                "shard",
                "all_reduce(sparsity metrics)",
            )
            self.metrics.log(
                {
                    "metrics/mean_log10_feature_sparsity": log_sum / self.sae.cfg.d_sae,
                    "sparsity/below_1e-5": int(below5),
                    "sparsity/below_1e-6": int(below6),
                },
                steps,
            )
            self.act_freq_scores.zero_()
            self.state.n_frac_active_samples = 0

    def _maybe_evaluate(self) -> None:
        every = self.cfg.logger.wandb_log_frequency * self.cfg.logger.eval_every_n_wandb_logs
        if self.evaluator is None or self.state.n_training_steps % every != 0:
            return
        with torch.no_grad():
            results = self.evaluator(self.sae)
        self.metrics.log(results, self.state.n_training_steps)

    def _finish(self) -> None:
        if self.state.n_frac_active_samples > 0:
            l0, dead = self._reduce_(
                [float(self.feature_sparsity.sum()), float(self.dead_neurons.sum())],
                "shard",
                "all_reduce(final sparsity)",
            )
            self.sae.cfg.metadata.l0 = l0
            self.sae.cfg.metadata.num_dead_features = int(dead)
        self.check_weights_finite("the final SAE")
        # normalize_activations is "none" for a sharded SAE: nothing to fold
        if self.cfg.save_final_checkpoint and self.cfg.checkpoint_path is not None:
            self.save_checkpoint(f"final_{self.state.n_training_samples}")
        self.metrics.plot()

    # ------------------------------------------------------------ the full SAE
    def gather_to_rank0(self) -> tuple[TrainingSAE | None, Tensor | None]:
        """``(full training SAE, [d_sae] log10 feature sparsity)`` in rank 0's host
        memory, ``(None, None)`` on the other ranks. Every rank calls it; the first
        data-parallel replica's shard group gathers (one shard at a time)."""
        if self.mesh.dp_rank != 0:
            return None, None
        full = self.sae.gather_full(device="cpu", dst=0)  # type: ignore[operator]
        sparsity = self._gather_local(self.log_feature_sparsity, "all_gather(feature sparsity)")
        return (full, sparsity.cpu()) if full is not None else (None, None)

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, name: str, base_path: str | Path | None = None) -> Path:
        """Every rank calls it: rank 0 writes the full SAE (streamed from the first
        replica's shards) and the replicated state, the first replica's ranks their
        shard's state; the folder appears atomically."""
        base = Path(base_path if base_path is not None else self.cfg.checkpoint_path)
        writer = self.mesh.dp_rank == 0  # the first replica's shard group writes

        def prepare(tmp: Path) -> None:
            if not writer:
                return
            # the first replica's shard group streams the SAE into rank 0's file, a block
            # at a time: no rank holds the full SAE
            sparsity = self._gather_local(self.log_feature_sparsity, "all_gather(sparsity)")
            save_sharded_sae(  # rank 0 creates tmp (and base) as it writes
                self.sae,  # type: ignore[arg-type]
                tmp,
                sparsity=sparsity.cpu() if self.rank == 0 else None,
                dst=0,
            )

        def write_parts(tmp: Path) -> None:
            if writer:
                file = tmp / SHARD_STATE_FILENAME.format(shard=self.mesh.shard_rank)
                torch.save(self._shard_state_dict(), file)
            if self.mesh.shard_rank == 0:  # one rank per data replica writes its position
                self._write_data_replica_state(tmp)

        def commit(tmp: Path) -> None:
            # with data parallelism an interrupted step's batch is rank 0's rows only: not
            # saved (the resumed run skips that global batch)
            with self._pending_batch_dropped(self.mesh.dp_size > 1):
                self._write_trainer_files(tmp)

        return save_checkpoint_together(base, name, prepare, write_parts, commit)

    def _state_dict(self) -> dict[str, Any]:
        """The replicated part of the trainer state: the base's without what is per
        shard (optimizer, firing statistics; in the shard files) or in the gathered SAE
        (buffers), with the layout."""
        state = super()._state_dict()
        for key in ("optimizer", "act_freq_scores", "n_forward_passes_since_fired", "sae_buffers"):
            del state[key]
        state.update(latent_shards=self.mesh.shard_size, data_parallel=self.mesh.dp_size)
        return state

    def _shard_state_dict(self) -> dict[str, Any]:
        optimizer, groups = optimizer_state_by_name(
            self.optimizer, list(self.sae.named_parameters())
        )
        return {
            "shard": self.mesh.shard_rank,
            "latent_shards": self.mesh.shard_size,
            "optimizer": optimizer,
            "param_groups": groups,
            "act_freq_scores": self.act_freq_scores,
            "n_forward_passes_since_fired": self.n_forward_passes_since_fired,
        }

    def load_checkpoint(self, path: str | Path) -> None:
        """Every rank loads its latents of a checkpoint written under any layout (a
        latent-sharded run with any number of shards and replicas, or one process)."""
        path = recover_checkpoint(path)
        sae: ShardedTrainingSAE = self.sae  # type: ignore[assignment]
        self.check_checkpoint_sae_config(path)
        state = load_torch_file(path / TRAINER_STATE_FILENAME, "trainer state")
        load_shard_weights_(sae, path)  # this shard's latents only
        names = full_parameter_names(sae)
        local = read_latent_range(path, state, names, sae.cfg.d_sae, sae.lo, sae.hi)
        load_optimizer_state_by_name(
            self.optimizer, list(sae.named_parameters()), local["optimizer"], local["param_groups"]
        )
        self._load_progress({**state, **{k: local[k] for k in FIRING_KEYS}})
        self._load_run_files(path, state)
        if self._pending_batch is not None and self.mesh.dp_size > 1:
            # a whole global batch (saved without data parallelism): this replica's rows
            rows = self._pending_batch.shape[0] // self.mesh.dp_size
            self._pending_batch = self._pending_batch[
                self.mesh.dp_rank * rows : (self.mesh.dp_rank + 1) * rows
            ]


__all__ = ["LatentShardedSAETrainer"]
