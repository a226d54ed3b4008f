"""Latent-sharded training (``latent_shards > 1`` in the config, under ``torchrun``),
alone or combined with data parallelism on a 2-D mesh.

:class:`LatentShardedSAETrainer` is :class:`~fastsae.training.trainer.SAETrainer` on a
:class:`~fastsae.training.latent_sharding.ShardedTrainingSAE` (TopK, BatchTopK,
standard or JumpReLU). The ranks form a ``data_parallel x latent_shards`` mesh
(:mod:`fastsae.training.latent_sharding.mesh`): the ``latent_shards`` ranks of a shard
group hold ``d_sae / latent_shards`` latents each (and their Adam state) and train on
the same rows; the ``data_parallel`` shard groups train on disjoint rows of each global
batch (the caller gives each rank its replica's rows, e.g. a
:class:`~fastsae.training.sharded_data.RankShardedProvider` over ``dp_rank`` /
``dp_size``).

* Gradients: inside a shard group nothing to reduce (each shard owns its gradients and
  ``b_dec``'s is already full, see ``latent_sharding.base``); across the data-parallel
  group every gradient is averaged (one flat all_reduce per dtype).
* Clipping: :func:`~fastsae.training.latent_sharding.clip_grad_norm_sharded` (the norm
  of the unsharded, data-averaged gradient).
* Dead latents: firing counts are per shard (``[d_sae / latent_shards]``), summed over
  the data-parallel group; the SAE's losses take that local mask. Log rows: losses, MSE
  and explained variance averaged over the data-parallel group; L0 and the dead count
  summed over the shards.
* Evaluation (``evaluator``) runs on the gathered full SAE on every rank (this needs the
  full SAE's memory on each rank while it runs).
* Checkpoints: ``<checkpoint>/`` holds the gathered SAE in the ordinary SAELens format
  (written by rank 0), the replicated trainer state (``trainer_state.pt``) and per
  shard ``trainer_state_shard{s}.pt`` (that shard's optimizer state by parameter name
  and firing statistics, written by the shard's rank of the first data-parallel
  replica). A checkpoint resumes under **any** layout: another number of shards or
  data-parallel replicas, and single-process checkpoints load into a sharded run (and
  :class:`~fastsae.training.trainer.SAETrainer` resumes a sharded checkpoint), see
  :mod:`fastsae.training.latent_sharding.checkpoint`.
"""

from __future__ import annotations

import random
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastsae.training.checkpoints import TRAINER_STATE_FILENAME, TrainerState, _move_into_place
from fastsae.training.distributed import _collective, _world, average_gradients, check_same_config
from fastsae.training.latent_sharding import ShardedTrainingSAE, clip_grad_norm_sharded
from fastsae.training.latent_sharding.checkpoint import (
    SHARD_STATE_FILENAME,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    read_latent_range,
)
from fastsae.training.latent_sharding.mesh import LatentMesh
from fastsae.training.metrics import step_metrics
from fastsae.training.saes.base import TrainingSAE, TrainStepOutput
from fastsae.training.trainer import SAETrainer


class LatentShardedSAETrainer(SAETrainer):
    """:class:`SAETrainer` for a latent-sharded SAE on a ``data_parallel x latent_shards``
    mesh.

    ``sae``: this rank's shard (e.g. ``shard_sae(full, mesh.shard_rank, mesh.shard_size,
    mesh.shard_group)`` of the same initial SAE on every rank). ``mesh``: where this rank
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
        self.rank, self.world_size = _world()
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
        if self.rank != 0:
            kwargs["run_dir"] = None
            kwargs["wandb_run"] = None
            kwargs["show_progress"] = False
        super().__init__(cfg, sae, data_provider, *args, **kwargs)
        # firing statistics are per shard
        n_local, device = sae.d_sae_local, torch.device(cfg.device)
        self.act_freq_scores = torch.zeros(n_local, device=device)
        self.n_forward_passes_since_fired = torch.zeros(n_local, device=device)
        self._comm_device = torch.device(cfg.device)
        if dist.is_initialized() and dist.get_backend() == "gloo":
            self._comm_device = torch.device("cpu")
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
        _collective(what, dist.all_reduce, buf, op=dist.ReduceOp.SUM, group=group)
        return (buf / size if mean else buf).tolist()

    def _gather_local(self, t: Tensor, what: str) -> Tensor:
        """A per-shard ``[d_sae_local]`` tensor concatenated into ``[d_sae]`` (every rank
        of the shard group must call it)."""
        if self.mesh.shard_size == 1:
            return t
        buf = t.to(self._comm_device).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.mesh.shard_size)]
        _collective(what, dist.all_gather, parts, buf, group=self.mesh.shard_group)
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
        buf = torch.cat([fired.float(), fired.new_tensor([float(n_tokens)], dtype=torch.float32)])
        buf = buf.to(self._comm_device)
        _collective("all_reduce(fired counts)", dist.all_reduce, buf, op=dist.ReduceOp.SUM,
                    group=self.mesh.dp_group)  # fmt: skip
        return buf[:-1].to(fired.device), int(buf[-1].item())

    def _clip_gradients(self, max_norm: float) -> None:
        clip_grad_norm_sharded(self.sae, max_norm)  # type: ignore[arg-type]

    def _after_optimizer_step(self) -> None:
        """Keep float buffers (BatchTopK's threshold EMA, equal within a shard group)
        equal across the data-parallel replicas: their mean."""
        if self.mesh.dp_size == 1:
            return
        with torch.no_grad():
            for name, b in self.sae.named_buffers():
                if b.is_floating_point() and b.numel() > 0:
                    buf = b.detach().to(self._comm_device).clone()
                    _collective(f"all_reduce(buffer {name})", dist.all_reduce, buf,
                                op=dist.ReduceOp.SUM, group=self.mesh.dp_group)  # fmt: skip
                    b.copy_(buf / self.mesh.dp_size)

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
                "details/current_learning_rate": self.optimizer.param_groups[0]["lr"],
                "details/n_training_samples": self.state.n_training_samples,
                **{f"details/{k}_coefficient": v for k, v in self.get_coefficients().items()},
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
        full = self.gather_full()
        full.eval()
        with torch.no_grad():
            results = self.evaluator(full)
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
        # normalize_activations is "none" for a sharded SAE: nothing to fold
        if self.cfg.save_final_checkpoint and self.cfg.checkpoint_path is not None:
            self.save_checkpoint(f"final_{self.state.n_training_samples}")
        self.metrics.plot()

    # ------------------------------------------------------------ the full SAE
    def gather_full(self) -> TrainingSAE:
        """The full training SAE (every rank of the shard group must call it)."""
        return self.sae.gather_full()  # type: ignore[operator]

    def gathered_log_feature_sparsity(self) -> Tensor:
        """``[d_sae]`` log10 firing frequency over all shards (every rank of the shard
        group must call it)."""
        return self._gather_local(self.log_feature_sparsity, "all_gather(feature sparsity)")

    # ------------------------------------------------------------ checkpoints
    def _barrier(self, what: str) -> None:
        if self.distributed:
            _collective(f"barrier({what})", dist.barrier)

    def save_checkpoint(self, name: str, base_path: str | Path | None = None) -> Path:
        """Every rank calls it: rank 0 writes the gathered SAE and the replicated state,
        the first replica's ranks their shard's state; the folder appears atomically."""
        base = Path(base_path if base_path is not None else self.cfg.checkpoint_path)
        final = base / name
        tmp_name = [f".{name}.tmp-{uuid.uuid4().hex[:8]}"]
        if self.distributed:
            _collective("broadcast(checkpoint name)", dist.broadcast_object_list, tmp_name, src=0)
        tmp = base / tmp_name[0]
        writer = self.mesh.dp_rank == 0  # the first replica's shard group writes
        if writer:
            full = self.gather_full()
            sparsity = self.gathered_log_feature_sparsity()
            # a rank that fails here raises; the others then fail at the next collective
            # (after the process group's timeout) naming it
            if self.rank == 0:
                base.mkdir(parents=True, exist_ok=True)
                full.save_model(tmp, sparsity=sparsity)
            del full
        self._barrier("save_checkpoint: folder")
        if writer:
            file = tmp / SHARD_STATE_FILENAME.format(shard=self.mesh.shard_rank)
            torch.save(self._shard_state_dict(), file)
        if self.mesh.shard_rank == 0:  # one rank per data replica writes its position
            self._write_data_replica_state(tmp)
        self._barrier("save_checkpoint: shard states")
        if self.rank == 0:
            # with data parallelism an interrupted step's batch is rank 0's rows only: not
            # saved (the resumed run skips that global batch)
            pending = self._pending_batch
            if self.mesh.dp_size > 1:
                self._pending_batch = None
            try:
                self._write_trainer_files(tmp)
                _move_into_place(tmp, final)
            finally:
                self._pending_batch = pending
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        self._barrier("save_checkpoint: commit")
        return final

    def _state_dict(self) -> dict[str, Any]:
        return {
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "coefficient_schedulers": {
                k: s.state_dict() for k, s in self.coefficient_schedulers.items()
            },
            "state": asdict(self.state),
            "checkpoint_thresholds": list(self.checkpoint_thresholds),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "latent_shards": self.mesh.shard_size,
            "data_parallel": self.mesh.dp_size,
            "data_replicas": self._data_replica()[1],
        }

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
        path = Path(path)
        state_file = path / TRAINER_STATE_FILENAME
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a fastsae training checkpoint: {TRAINER_STATE_FILENAME} is missing"
            )
        sae: ShardedTrainingSAE = self.sae  # type: ignore[assignment]
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - name the file whatever torch raised
            raise ValueError(f"{state_file}: unreadable trainer state ({e})") from e
        full = sae.full_class(sae.cfg)
        full.load_weights_from_checkpoint(path)
        names = [n for n, _ in full.named_parameters()]
        shard = type(sae).from_full(full, sae.rank, sae.world_size)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(getattr(shard, name))
            for name, b in sae.named_buffers():
                b.copy_(getattr(shard, name))
        del full, shard
        local = read_latent_range(path, state, names, sae.cfg.d_sae, sae.lo, sae.hi)
        load_optimizer_state_by_name(
            self.optimizer, list(sae.named_parameters()), local["optimizer"], local["param_groups"]
        )
        self.act_freq_scores = local["act_freq_scores"].to(self.act_freq_scores.device)
        self.n_forward_passes_since_fired = local["n_forward_passes_since_fired"].to(
            self.n_forward_passes_since_fired.device
        )
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for name, s in state["coefficient_schedulers"].items():
            self.coefficient_schedulers[name].load_state_dict(s)
        self.state = TrainerState(**state["state"])
        self.checkpoint_thresholds = list(state["checkpoint_thresholds"])
        self._load_run_files(path, state)
        if self._pending_batch is not None and self.mesh.dp_size > 1:
            # a whole global batch (saved without data parallelism): this replica's rows
            rows = self._pending_batch.shape[0] // self.mesh.dp_size
            self._pending_batch = self._pending_batch[
                self.mesh.dp_rank * rows : (self.mesh.dp_rank + 1) * rows
            ]


__all__ = ["LatentShardedSAETrainer"]
