"""Data-parallel training on ``torch.distributed`` (launched with ``torchrun``).

* :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), starts a process group (gloo on
  CPU, nccl on CUDA) with a timeout, so a dead rank ends in an error that names the
  collective instead of a hang. Without torchrun it returns a single-process result.
* :class:`RankShardedProvider` gives each rank a disjoint share of the data.
* :class:`DistributedSAETrainer` is :class:`~fastsae.training.trainer.SAETrainer` with
  gradients averaged over ranks (one flat ``all_reduce`` after backward, before
  clipping and Adam), dead-latent firing counts summed (every rank has the same dead
  mask), ``n_training_samples`` counting the global batch, metrics averaged over ranks,
  and only rank 0 writing ``metrics.jsonl``/the PNG/checkpoints.

Batch sizes: ``cfg.train_batch_size_tokens`` is the **global** batch. Each rank trains
on ``train_batch_size_tokens / world_size`` rows, so the step count, the LR schedule and
every counter in a checkpoint are the same whatever the world size.

Resume: the model is replicated, so the checkpoint is rank 0's. The data position is
the wrapped provider's own state, which is the same on every rank (see
:class:`RankShardedProvider`), so a checkpoint resumes under any world size. In
``"split"`` mode the global batches do not depend on the world size and a resumed run
continues with exactly the losses of the uninterrupted run (up to fp32 reduction
order); in ``"stride"`` mode the stream resumes at the same position (no row repeated
or skipped) but rows are grouped into global batches differently.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastsae.saes.training_sae import TrainingSAE, TrainStepOutput
from fastsae.training.parallel.collectives import (
    all_reduce_sum_,
    average_buffers_,
    average_gradients,
    broadcast_from_rank0,
    collective,
    comm_device,
    main_rank_outputs,
    rank_and_world,
    save_checkpoint_together,
    sum_fired_counts,
)
from fastsae.training.parallel.rank_shards import RankShardedProvider
from fastsae.training.trainer import SAETrainer

DEFAULT_TIMEOUT_S = 600.0
# per-rank fields: excluded from the "all ranks run the same config" check
_PER_RANK_CFG_KEYS = frozenset({"device", "llm_device", "act_store_device"})


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join torchrun's process group (or report a single process when not launched so).

    ``backend``: ``None`` picks nccl when CUDA is available, else gloo. ``timeout_s``
    bounds every collective: a rank that dies or stalls makes the others raise after
    that long. On CUDA the device is ``cuda:<LOCAL_RANK>`` (and is made current).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, _device_for(dist.get_backend(), local))
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        local = int(env.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(0, 1, local, device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(
            f"distributed launch is missing {', '.join(missing)} (launch with torchrun)"
        )
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_RANK", rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = _device_for(backend, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistInfo(rank, world, local, device)


def _device_for(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl" or (backend != "gloo" and torch.cuda.is_available()):
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


# --------------------------------------------------------------------------- data
def config_hash(cfg: Any) -> int:
    """A 63-bit hash of ``cfg.to_dict()`` without its per-rank device fields."""
    to_dict = getattr(cfg, "to_dict", None)
    data = _strip_per_rank(to_dict() if callable(to_dict) else vars(cfg))
    text = json.dumps(data, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _strip_per_rank(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_per_rank(v) for k, v in value.items() if k not in _PER_RANK_CFG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_strip_per_rank(v) for v in value]
    return value


def check_same_config(cfg: Any, device: torch.device | str = "cpu") -> None:
    """Raise on every rank when the ranks' configs differ (naming which ranks differ)."""
    rank, world = rank_and_world()
    if world == 1:
        return
    mine = torch.tensor([config_hash(cfg)], dtype=torch.int64, device=device)
    hashes = [torch.zeros_like(mine) for _ in range(world)]
    collective("all_gather(config hash)", dist.all_gather, hashes, mine)
    values = [int(h.item()) for h in hashes]
    if len(set(values)) > 1:
        groups: dict[int, list[int]] = {}
        for r, h in enumerate(values):
            groups.setdefault(h, []).append(r)
        reference = values[0]
        differing = [r for r, h in enumerate(values) if h != reference]
        desc = "; ".join(f"ranks {g} share config {h:016x}" for h, g in groups.items())
        raise ValueError(
            f"ranks disagree on the training config: ranks {differing} differ from rank 0 "
            f"({desc}); every rank must be launched with the same config"
        )


# --------------------------------------------------------------------------- trainer
class DistributedSAETrainer(SAETrainer):
    """:class:`SAETrainer` whose step is data-parallel over the default process group.

    Give it this rank's data (e.g. a :class:`RankShardedProvider`), a replica of the
    same initial SAE on every rank (same seed), and the same config everywhere (checked
    at construction). ``run_dir`` and checkpoints are written by rank 0 only; every rank
    reads a checkpoint in :meth:`load_checkpoint` (a filesystem all ranks see).
    """

    def __init__(
        self, cfg: Any, sae: TrainingSAE, data_provider: Iterator[Tensor], *args, **kwargs
    ):
        self.rank, self.world_size = rank_and_world()
        super().__init__(cfg, sae, data_provider, *args, **main_rank_outputs(kwargs, self.rank))
        self._comm_device = comm_device(cfg.device)
        check_same_config(cfg, self._comm_device)
        # start from rank 0's weights and buffers (replicas stay equal thereafter)
        broadcast_from_rank0(self.sae, self._comm_device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------ collectives
    def _all_reduce_(self, tensor: Tensor, what: str) -> Tensor:
        """Sum ``tensor`` over ranks in place (through the comm device)."""
        return all_reduce_sum_(tensor, self._comm_device, what)

    def _sum_over_ranks(self, values: Tensor, what: str) -> Tensor:
        """Summed over the ranks (every rank stops or skips a non-finite step alike)."""
        if not self.distributed:
            return values
        return self._all_reduce_(values, what)

    def _reduce_gradients(self) -> None:
        """Average every parameter's gradient over ranks: one flat all_reduce per dtype."""
        average_gradients(self.sae.parameters(), None, self.world_size, self._comm_device)

    # ------------------------------------------------------------ the step's hooks
    def _after_backward(self) -> None:
        if self.distributed:
            self._reduce_gradients()

    def _reduce_fired(self, fired: Tensor, n_tokens: int) -> tuple[Tensor, int]:
        """Firing counts and token count summed over ranks (one all_reduce), so every
        rank has the same dead mask and counts the global batch."""
        if not self.distributed:
            return fired, n_tokens
        return sum_fired_counts(fired, n_tokens, self._comm_device)

    def _after_optimizer_step(self) -> None:
        if self.distributed:
            average_buffers_(self.sae, self.world_size, self._comm_device)

    # ------------------------------------------------------------ normalisation
    def _init_from_data(self) -> None:
        """Each rank initialises from its own rows; then every replica takes rank 0's
        weights, so they start equal."""
        starting = self.state.n_training_steps == 0
        super()._init_from_data()
        if not (self.distributed and starting and self.init_rows_needed() > 0):
            return
        for name, param in self.sae.named_parameters():
            buf = param.data.to(self._comm_device).clone()
            collective(f"broadcast({name} after initialising from data)", dist.broadcast,
                       buf, src=0)  # fmt: skip
            param.data.copy_(buf.to(param.device))

    def _estimate_normalisation(self) -> None:
        had_factor = self.scaler.scaling_factor is not None
        had_whitening = self.scaler.whitening
        super()._estimate_normalisation()
        if not self.distributed:
            return
        if self.scaler.scaling_factor is not None and not had_factor:
            # factor = sqrt(d_in) / mean norm: average the per-rank mean norms (equal shares)
            d_in = self.sae.cfg.d_in
            norm = torch.tensor(
                [d_in**0.5 / self.scaler.scaling_factor],
                dtype=torch.float64,
                device=self._comm_device,
            )
            self._all_reduce_(norm, "all_reduce(activation norm)")
            self.scaler.scaling_factor = float(d_in**0.5 / (norm.item() / self.world_size))
        if self.scaler.whitening and not had_whitening:
            # rank 0's estimate for all (consistent replicas; estimated on its share)
            for attr in ("mean", "matrix", "inverse_matrix"):
                t = getattr(self.scaler, attr, None)
                if isinstance(t, Tensor):
                    buf = t.to(self._comm_device).clone()
                    collective(f"broadcast(whitening {attr})", dist.broadcast, buf, src=0)
                    setattr(self.scaler, attr, buf.to(t.device))

    # ------------------------------------------------------------ metrics
    def _reduce_row(self, row: dict[str, Any]) -> dict[str, Any]:
        keys = sorted(k for k, v in row.items() if isinstance(v, (int, float)))
        if not self.distributed or not keys:
            return row
        vals = torch.tensor(
            [float(row[k]) for k in keys], dtype=torch.float64, device=self._comm_device
        )
        self._all_reduce_(vals, "all_reduce(metrics)")
        vals /= self.world_size
        return {**row, **{k: float(v) for k, v in zip(keys, vals.tolist(), strict=True)}}

    def _log_row(self, output: TrainStepOutput) -> dict[str, Any]:
        """The base's log row, with every numeric value averaged over ranks."""
        return self._reduce_row(super()._log_row(output))

    def _maybe_evaluate(self) -> None:
        # every rank evaluates (an evaluator may draw from the data, whose position must
        # stay the same on every rank); only rank 0's MetricsLogger has a file to write
        super()._maybe_evaluate()

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, name: str, base_path: str | Path | None = None) -> Path:
        """Rank 0 writes the (replicated) state; every rank waits for it and gets the path.
        When each rank draws its own token rows, every rank adds its data position
        (``data_state_replica{rank}.pt``) before the folder appears.

        A batch drawn but not trained on (an interrupted step) is not saved: it is only
        this rank's share, so the resumed run skips that global batch.
        """
        base = Path(base_path if base_path is not None else self.cfg.checkpoint_path)
        if self._data_replica()[1] == 1:
            path = base / name
            if self.rank == 0:
                with self._pending_batch_dropped(True):
                    path = super().save_checkpoint(name, base_path)
            if self.distributed:
                collective("barrier(save_checkpoint)", dist.barrier)
            return path

        def prepare(tmp: Path) -> None:
            if self.rank == 0:
                tmp.mkdir(parents=True, exist_ok=True)

        def commit(tmp: Path) -> None:
            with self._pending_batch_dropped(True):
                self.sae.save_model(tmp, sparsity=self.log_feature_sparsity)
                self._write_trainer_files(tmp)

        return save_checkpoint_together(base, name, prepare, self._write_data_replica_state, commit)

    def load_checkpoint(self, path: str | Path) -> None:
        """Every rank loads the same checkpoint (saved under any world size)."""
        super().load_checkpoint(path)
        self._pending_batch = None if self.distributed else self._pending_batch


__all__ = [
    "DistInfo",
    "DistributedSAETrainer",
    "RankShardedProvider",
    "check_same_config",
    "config_hash",
    "init_distributed",
]
