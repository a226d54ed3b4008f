"""Checkpoints of a training run: what :class:`~fastsae.training.trainer.SAETrainer`
writes and reads so that a resumed run continues with exactly the losses of an
uninterrupted one.

A checkpoint folder (written under a temporary name and renamed into place, so it is
never half there) holds the SAE in the SAELens format, ``trainer_state.pt`` (optimizer,
schedules, counters, firing statistics, RNG states), the data position
(``data_state.pt``, or one ``data_state_replica{i}.pt`` per data-parallel replica when
each replica draws its own token rows), the activation normalisation, an interrupted
step's pending batch and the run config. The data-parallel and latent-sharded trainers
override parts of it (:mod:`fastsae.training.distributed`,
:mod:`fastsae.training.sharded_trainer`).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastsae.training.sharded_data import (
    RankShardedProvider,
    bare_provider_state,
    is_rank_sharded_state,
)

TRAINER_STATE_FILENAME = "trainer_state.pt"
DATA_STATE_FILENAME = "data_state.pt"
DATA_REPLICA_FILENAME = "data_state_replica{replica}.pt"
PENDING_BATCH_FILENAME = "pending_batch.safetensors"
RUNNER_CFG_FILENAME = "runner_cfg.json"


@dataclass
class TrainerState:
    """Counters of a run (the tensors of dead-latent tracking live beside it)."""

    n_training_steps: int = 0
    n_training_samples: int = 0
    n_frac_active_samples: int = 0


class CheckpointingMixin:
    """Saving and resuming, for :class:`~fastsae.training.trainer.SAETrainer` (which
    provides ``cfg``, ``sae``, ``optimizer``, the schedulers, ``state``, the firing
    statistics, ``scaler``, ``metrics``, ``data_provider`` and ``_pending_batch``)."""

    cfg: Any
    sae: Any
    optimizer: Any
    lr_scheduler: Any
    coefficient_schedulers: dict[str, Any]
    state: Any
    scaler: Any
    metrics: Any
    data_provider: Any
    act_freq_scores: torch.Tensor
    n_forward_passes_since_fired: torch.Tensor
    checkpoint_thresholds: list[int]
    _pending_batch: torch.Tensor | None
    log_feature_sparsity: torch.Tensor

    def save_checkpoint(self, name: str, base_path: str | Path | None = None) -> Path:
        """Write ``<checkpoint_path>/<name>/`` atomically: the SAE (SAELens format,
        training config), the trainer state, the data position and the run config."""
        base = Path(base_path if base_path is not None else self.cfg.checkpoint_path)
        final = base / name
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.sae.save_model(tmp, sparsity=self.log_feature_sparsity)
            self._write_trainer_files(tmp)
            _move_into_place(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    @contextlib.contextmanager
    def _pending_batch_dropped(self, drop: bool) -> Iterator[None]:
        """While active (when ``drop``), the pending batch is not part of what is saved:
        under data parallelism it is only this rank's rows."""
        pending = self._pending_batch
        if drop:
            self._pending_batch = None
        try:
            yield
        finally:
            self._pending_batch = pending

    def _write_trainer_files(self, folder: Path) -> None:
        """Everything of a checkpoint but the SAE: trainer state, data position,
        normalisation, an interrupted step's pending batch, the run config."""
        torch.save(self._state_dict(), folder / TRAINER_STATE_FILENAME)
        data_state = getattr(self.data_provider, "state_dict", None)
        if callable(data_state):
            torch.save(data_state(), folder / DATA_STATE_FILENAME)
        self.scaler.save(folder)
        if self._pending_batch is not None:
            save_file({"batch": self._pending_batch.detach().cpu().contiguous()},
                      str(folder / PENDING_BATCH_FILENAME))  # fmt: skip
        to_dict = getattr(self.cfg, "to_dict", None)
        if callable(to_dict):
            (folder / RUNNER_CFG_FILENAME).write_text(json.dumps(to_dict(), indent=2))

    def _state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "coefficient_schedulers": {
                k: s.state_dict() for k, s in self.coefficient_schedulers.items()
            },
            "state": asdict(self.state),
            "act_freq_scores": self.act_freq_scores,
            "n_forward_passes_since_fired": self.n_forward_passes_since_fired,
            "checkpoint_thresholds": list(self.checkpoint_thresholds),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "sae_buffers": {k: v for k, v in self.sae.named_buffers()},
            "data_replicas": self._data_replica()[1],
        }

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore SAE weights, optimizer, schedules, counters and data position from a
        checkpoint directory written by :meth:`save_checkpoint`."""
        path = Path(path)
        state_file = path / TRAINER_STATE_FILENAME
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a fastsae training checkpoint: {TRAINER_STATE_FILENAME} is missing"
            )
        self.sae.load_weights_from_checkpoint(path)
        try:
            state = torch.load(state_file, map_location=self.sae.device, weights_only=False)
        except Exception as e:  # noqa: BLE001 - name the file whatever torch raised
            raise ValueError(f"{state_file}: unreadable trainer state ({e})") from e
        if state.get("latent_shards"):
            # written by a latent-sharded run: its shards' optimizer states, concatenated
            from fastsae.training.latent_sharding.checkpoint import (
                FIRING_KEYS,
                load_optimizer_state_by_name,
                read_latent_range,
            )

            named = list(self.sae.named_parameters())
            d_sae = self.sae.cfg.d_sae
            whole = read_latent_range(path, state, [n for n, _ in named], d_sae, 0, d_sae)
            load_optimizer_state_by_name(
                self.optimizer, named, whole["optimizer"], whole["param_groups"]
            )
            state = {**state, **{k: whole[k] for k in FIRING_KEYS}}
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self._load_progress(state)
        for name, value in state.get("sae_buffers", {}).items():
            owner, _, attr = name.rpartition(".")
            module = self.sae.get_submodule(owner) if owner else self.sae
            setattr(module, attr, value.to(self.sae.device))
        self._load_run_files(path, state)

    def _load_progress(self, state: dict[str, Any]) -> None:
        """Schedules, counters, checkpoint thresholds and the firing statistics
        (``[d_sae]``, or this shard's) of a loaded trainer state."""
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for name, s in state["coefficient_schedulers"].items():
            self.coefficient_schedulers[name].load_state_dict(s)
        self.state = TrainerState(**state["state"])
        self.act_freq_scores = state["act_freq_scores"].to(self.act_freq_scores.device)
        self.n_forward_passes_since_fired = state["n_forward_passes_since_fired"].to(
            self.n_forward_passes_since_fired.device
        )
        self.checkpoint_thresholds = list(state["checkpoint_thresholds"])

    def _load_run_files(self, path: Path, state: dict[str, Any]) -> None:
        """The part of a resume every trainer shares: RNG states, normalisation, an
        interrupted step's pending batch, the data position, the metrics file."""
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.scaler.load(path)
        pending = path / PENDING_BATCH_FILENAME
        self._pending_batch = load_file(str(pending))["batch"] if pending.is_file() else None
        self._load_data_state(path, state)
        self.metrics.truncate_after(self.state.n_training_steps)

    def _data_replica(self) -> tuple[int, int]:
        """``(index, count)``: which of the run's data replicas this rank's provider
        draws (``count > 1`` when each data-parallel rank runs the model on its own
        token rows, see ``ActivationsStore.shard_for_data_parallel``)."""
        shard = getattr(self.data_provider, "row_shard", (0, 1))
        return int(shard[0]), int(shard[1])

    def _write_data_replica_state(self, folder: Path) -> None:
        """This replica's data position (when the replicas draw their own rows)."""
        index, count = self._data_replica()
        if count > 1:
            torch.save(
                self.data_provider.state_dict(),  # type: ignore[attr-defined]
                folder / DATA_REPLICA_FILENAME.format(replica=index),
            )

    def _load_data_state(self, path: Path, state: dict[str, Any]) -> None:
        """Restore the data position: the replica's own file when the checkpoint has
        the same number of data replicas, else the furthest saved position (warning
        with the number of buffered activations skipped)."""
        load = getattr(self.data_provider, "load_state_dict", None)
        if not callable(load):
            return
        saved = int(state.get("data_replicas", 1))
        index, count = self._data_replica()
        if saved == 1 and count == 1:
            data_file = path / DATA_STATE_FILENAME
            if not data_file.is_file():
                raise FileNotFoundError(
                    f"{data_file} is missing: the checkpoint has no data position to resume from"
                )
            data_state = torch.load(data_file, map_location="cpu", weights_only=False)
            if is_rank_sharded_state(data_state) and not isinstance(
                self.data_provider, RankShardedProvider
            ):  # written by a data-parallel run, resumed without one
                data_state = bare_provider_state(data_state)
            load(data_state)
            return
        if saved > 1:
            files = [path / DATA_REPLICA_FILENAME.format(replica=i) for i in range(saved)]
        else:
            files = [path / DATA_STATE_FILENAME]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"the checkpoint's data positions are missing: {missing}")
        if saved == count:
            load(torch.load(files[index], map_location="cpu", weights_only=False))
            return
        from fastsae.training.activations_store import furthest_position

        states = []
        for f in files:
            st = torch.load(f, map_location="cpu", weights_only=False)
            states.append(bare_provider_state(st) if is_rank_sharded_state(st) else st)
        merged, dropped = furthest_position(states, (index, count))
        if getattr(self, "rank", 0) == 0:  # once per run, not once per rank
            warnings.warn(
                f"{path} was written with {saved} data replicas, this run has {count}: "
                f"the data continues from the furthest saved position; {dropped} "
                "activations that were in the saved shuffling buffers are not trained on",
                stacklevel=2,
            )
        load(merged)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the fully written folder ``tmp`` (a rename: never half there)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
