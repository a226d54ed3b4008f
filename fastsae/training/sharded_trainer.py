"""Latent-sharded training (``latent_shards > 1`` in the config, under ``torchrun``).

:class:`LatentShardedSAETrainer` is :class:`~fastsae.training.trainer.SAETrainer` on a
:class:`~fastsae.training.latent_sharding.ShardedTopKTrainingSAE`: rank ``r`` of ``W``
holds latents ``[r * d_sae / W, (r + 1) * d_sae / W)`` of ``W_enc``/``b_enc``/``W_dec``
(and their Adam state); ``b_dec`` is replicated. Pure latent sharding: the world is the
shard group (``latent_shards == WORLD_SIZE``), and every rank trains on the **same**
full batch (each rank draws from its own, identically seeded, data source; there is no
data split).

* No gradient all-reduce: each shard owns its gradients, and ``b_dec``'s gradient is
  already the full one on every rank (``latent_sharding``'s backward sums its encoder
  part over ranks), so replicas stay equal.
* Clipping: :func:`~fastsae.training.latent_sharding.clip_grad_norm_sharded` (the norm
  of the unsharded gradient).
* Dead latents: firing counts and the dead mask are per shard (``[d_sae / W]``); the
  SAE's AuxK takes that local mask. Log rows: losses, MSE and explained variance are the
  same on every rank (the reconstruction is summed over ranks); L0 and the dead-feature
  count are summed over ranks.
* Evaluation (``evaluator``) runs on the gathered full SAE on every rank (every rank
  must draw the same evaluation batches to keep the data positions equal); this needs
  the full SAE's memory on each rank while it runs.
* Checkpoints: ``<checkpoint>/`` holds the gathered SAE in the ordinary SAELens format
  (written by rank 0), the replicated trainer state (``trainer_state.pt``: counters,
  schedules, RNG, with ``latent_shards``) and per rank
  ``trainer_state_rank{r}.pt`` (that shard's optimizer state and firing statistics,
  written by rank ``r``). A checkpoint resumes under the **same** world size only.
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

from fastsae.training.distributed import _collective, _world, check_same_config
from fastsae.training.latent_sharding import ShardedTopKTrainingSAE, clip_grad_norm_sharded
from fastsae.training.metrics import step_metrics
from fastsae.training.saes.base import TrainStepOutput
from fastsae.training.saes.topk import TopKTrainingSAE
from fastsae.training.trainer import (
    TRAINER_STATE_FILENAME,
    SAETrainer,
    TrainerState,
    _move_into_place,
)

RANK_STATE_FILENAME = "trainer_state_rank{rank}.pt"


class LatentShardedSAETrainer(SAETrainer):
    """:class:`SAETrainer` for a latent-sharded TopK SAE over the default process group.

    ``sae``: this rank's :class:`ShardedTopKTrainingSAE` (e.g. ``from_full(full, rank,
    world)`` of the same initial SAE on every rank). ``data_provider``: the full batches,
    the same on every rank. ``run_dir`` (metrics) and logging are rank 0's.
    """

    def __init__(
        self,
        cfg: Any,
        sae: ShardedTopKTrainingSAE,
        data_provider: Iterator[Tensor],
        *args: Any,
        **kwargs: Any,
    ):
        if not isinstance(sae, ShardedTopKTrainingSAE):
            raise TypeError(
                f"LatentShardedSAETrainer needs a ShardedTopKTrainingSAE, got {type(sae).__name__}"
            )
        self.rank, self.world_size = _world()
        if (sae.rank, sae.world_size) != (self.rank, self.world_size):
            raise ValueError(
                f"the SAE shard is rank {sae.rank} of {sae.world_size}, but this process is "
                f"rank {self.rank} of {self.world_size}: pure latent sharding shards over the "
                "whole world"
            )
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
    def _sum_(self, values: list[float], what: str) -> list[float]:
        if not self.distributed:
            return values
        buf = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        _collective(what, dist.all_reduce, buf, op=dist.ReduceOp.SUM)
        return buf.tolist()

    def _gather_local(self, t: Tensor, what: str) -> Tensor:
        """A per-shard ``[d_sae_local]`` tensor concatenated into ``[d_sae]`` (every rank)."""
        if not self.distributed:
            return t
        buf = t.to(self._comm_device).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        _collective(what, dist.all_gather, parts, buf)
        return torch.cat(parts).to(t.device)

    # ------------------------------------------------------------ the step's hooks
    def _clip_gradients(self, max_norm: float) -> None:
        clip_grad_norm_sharded(self.sae, max_norm)  # type: ignore[arg-type]

    # _after_backward: nothing (shards own their gradients, b_dec's is full everywhere)
    # _reduce_fired: the base's (local counts; every rank sees the whole batch)

    # ------------------------------------------------------------ metrics
    def _log(self, output: TrainStepOutput, pbar) -> None:
        row = step_metrics(output)  # losses/MSE/EV: equal on every rank
        l0, dead, passes = self._sum_(
            [
                row["metrics/l0"],
                float(self.dead_neurons.sum()),
                float(self.n_forward_passes_since_fired.sum()),
            ],
            "all_reduce(log metrics)",
        )
        d_sae = self.sae.cfg.d_sae
        row.update(
            {
                "metrics/l0": l0,
                "sparsity/dead_features": int(dead),
                "sparsity/mean_passes_since_fired": passes / d_sae,
                "details/current_learning_rate": self.optimizer.param_groups[0]["lr"],
                "details/n_training_samples": self.state.n_training_samples,
                **{f"details/{k}_coefficient": v for k, v in self.get_coefficients().items()},
            }
        )
        self.last_metrics = row
        self.metrics.log(row, self.state.n_training_steps)  # a no-op logger off rank 0
        pbar.set_postfix(
            {
                "L0": f"{row['metrics/l0']:.1f}",
                "MSE": f"{row['metrics/mse']:.3g}",
                "EV": f"{row['metrics/explained_variance']:.3f}",
                "dead": f"{100 * dead / d_sae:.1f}%",
            },
            refresh=False,
        )

    def _maybe_reset_sparsity(self) -> None:
        steps = self.state.n_training_steps
        if steps > 0 and steps % self.cfg.feature_sampling_window == 0:
            sparsity = self.feature_sparsity
            log_sum, below5, below6 = self._sum_(
                [
                    float(torch.log10(sparsity + 1e-10).sum()),
                    float((sparsity < 1e-5).sum()),
                    float((sparsity < 1e-6).sum()),
                ],
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
            l0, dead = self._sum_(
                [float(self.feature_sparsity.sum()), float(self.dead_neurons.sum())],
                "all_reduce(final sparsity)",
            )
            self.sae.cfg.metadata.l0 = l0
            self.sae.cfg.metadata.num_dead_features = int(dead)
        # normalize_activations is "none" for a sharded SAE: nothing to fold
        if self.cfg.save_final_checkpoint and self.cfg.checkpoint_path is not None:
            self.save_checkpoint(f"final_{self.state.n_training_samples}")
        self.metrics.plot()

    # ------------------------------------------------------------ the full SAE
    def gather_full(self) -> TopKTrainingSAE:
        """The full training SAE (every rank must call it)."""
        return self.sae.gather_full()  # type: ignore[operator]

    def gathered_log_feature_sparsity(self) -> Tensor:
        """``[d_sae]`` log10 firing frequency over all shards (every rank must call it)."""
        return self._gather_local(self.log_feature_sparsity, "all_gather(feature sparsity)")

    # ------------------------------------------------------------ checkpoints
    def _barrier(self, what: str) -> None:
        if self.distributed:
            _collective(f"barrier({what})", dist.barrier)

    def save_checkpoint(self, name: str, base_path: str | Path | None = None) -> Path:
        """Every rank calls it: rank 0 writes the gathered SAE and the replicated state,
        each rank its shard's optimizer state; the folder appears atomically."""
        base = Path(base_path if base_path is not None else self.cfg.checkpoint_path)
        final = base / name
        tmp_name = [f".{name}.tmp-{uuid.uuid4().hex[:8]}"]
        if self.distributed:
            _collective("broadcast(checkpoint name)", dist.broadcast_object_list, tmp_name, src=0)
        tmp = base / tmp_name[0]
        full = self.gather_full()
        sparsity = self.gathered_log_feature_sparsity()
        # a rank that fails here raises; the others then fail at the next collective
        # (after the process group's timeout) naming it
        if self.rank == 0:
            base.mkdir(parents=True, exist_ok=True)
            full.save_model(tmp, sparsity=sparsity)
        del full
        self._barrier("save_checkpoint: folder")
        torch.save(self._rank_state_dict(), tmp / RANK_STATE_FILENAME.format(rank=self.rank))
        self._barrier("save_checkpoint: rank states")
        if self.rank == 0:
            try:
                self._write_trainer_files(tmp)
                _move_into_place(tmp, final)
            finally:
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
            "latent_shards": self.world_size,
        }

    def _rank_state_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "latent_shards": self.world_size,
            "optimizer": self.optimizer.state_dict(),
            "act_freq_scores": self.act_freq_scores,
            "n_forward_passes_since_fired": self.n_forward_passes_since_fired,
        }

    def load_checkpoint(self, path: str | Path) -> None:
        """Every rank loads its shard of a checkpoint written with the same world size."""
        path = Path(path)
        state_file = path / TRAINER_STATE_FILENAME
        rank_file = path / RANK_STATE_FILENAME.format(rank=self.rank)
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a fastsae training checkpoint: {TRAINER_STATE_FILENAME} is missing"
            )
        device = self.sae.device  # type: ignore[attr-defined]
        state = torch.load(state_file, map_location=device, weights_only=False)
        saved = state.get("latent_shards")
        if saved != self.world_size or not rank_file.is_file():
            raise ValueError(
                f"{path} was written by a latent-sharded run over {saved} ranks "
                f"(or is not a latent-sharded checkpoint); resuming needs the same world "
                f"size, this run has {self.world_size}"
            )
        rank_state = torch.load(rank_file, map_location=device, weights_only=False)
        full = TopKTrainingSAE(self.sae.cfg)
        full.load_weights_from_checkpoint(path)
        shard = ShardedTopKTrainingSAE.from_full(full, self.rank, self.world_size)
        with torch.no_grad():
            for name, p in self.sae.named_parameters():
                p.copy_(getattr(shard, name))
        del full, shard
        self.optimizer.load_state_dict(rank_state["optimizer"])
        self.act_freq_scores = rank_state["act_freq_scores"].to(self.act_freq_scores.device)
        self.n_forward_passes_since_fired = rank_state["n_forward_passes_since_fired"].to(
            self.n_forward_passes_since_fired.device
        )
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for name, s in state["coefficient_schedulers"].items():
            self.coefficient_schedulers[name].load_state_dict(s)
        self.state = TrainerState(**state["state"])
        self.checkpoint_thresholds = list(state["checkpoint_thresholds"])
        self._load_run_files(path, state)


__all__ = ["LatentShardedSAETrainer"]
