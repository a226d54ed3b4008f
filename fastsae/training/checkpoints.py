"""Checkpoints of a training run: what :class:`~fastsae.training.trainer.SAETrainer`
writes and reads so that a resumed run continues with exactly the losses of an
uninterrupted one.

A checkpoint folder (written complete beside its place and swapped in as a whole, so a
kill or a failed rename at any moment leaves the old checkpoint or the new one: see
:mod:`fastsae.loading.atomic_dir`, whose recovery rule loading applies) holds the SAE
in the SAELens format, ``trainer_state.pt`` (optimizer, schedules, counters, firing
statistics, RNG states), the data position (``data_state.pt``, or one
``data_state_replica{i}.pt`` per data-parallel replica when each replica draws its own
token rows), the activation normalisation, an interrupted step's pending batch and the
run config. The data-parallel and latent-sharded trainers
override parts of it (:mod:`fastsae.training.distributed`,
:mod:`fastsae.training.sharded_trainer`).
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastsae.loading.atomic_dir import clean_stale, recover_dir, replace_dir
from fastsae.loading.disk import read_json
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
# SAE config fields a resume may change: where it runs, and what is only recorded
_CFG_KEYS_FREE_ON_RESUME = frozenset({"device", "metadata"})
# runner config fields that change what a run trains (a resume warns when they differ)
_RUNNER_KEYS_OF_THE_RUN = (
    "model_name", "hook_name", "hook_head_index", "dataset_path", "context_size",
    "prepend_bos", "seqpos_slice", "train_batch_size_tokens", "training_tokens", "lr",
    "adam_beta1", "adam_beta2", "lr_scheduler_name", "lr_warm_up_steps", "lr_end",
    "lr_decay_steps", "n_restart_cycles", "max_grad_norm", "dead_feature_window",
    "feature_sampling_window", "seed", "autocast",
)  # fmt: skip


@dataclass
class TrainerState:
    """Counters of a run (the tensors of dead-latent tracking live beside it)."""

    n_training_steps: int = 0
    n_training_samples: int = 0
    n_frac_active_samples: int = 0
    n_skipped_batches: int = 0  # non-finite batches skipped (skip_nonfinite_batches)


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

        def write(folder: Path) -> None:
            self.sae.save_model(folder, sparsity=self.log_feature_sparsity)
            self._write_trainer_files(folder)

        # the whole folder is swapped in: a kill at any moment leaves the old checkpoint
        # or the new one, complete (fastsae.loading.atomic_dir)
        replace_dir(final, write)
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
        path = recover_dir(Path(path))  # finish a swap that a kill interrupted
        clean_stale(path.parent)  # leftovers of killed writes beside it
        state_file = path / TRAINER_STATE_FILENAME
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a fastsae training checkpoint: {TRAINER_STATE_FILENAME} is missing"
            )
        self.check_checkpoint_sae_config(path)
        self.sae.load_weights_from_checkpoint(path)
        state = load_torch_file(state_file, "trainer state", map_location=self.sae.device)
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

    def check_checkpoint_sae_config(self, path: Path) -> None:
        """Raise naming ``<path>/cfg.json`` when the SAE config it records differs from
        the one this run trains (another ``d_sae``, ``k``, architecture, normalisation,
        dtype...): a resume continues the run that wrote the checkpoint, so an edit of
        either is an error, not silently ignored. ``device`` and the metadata may differ."""
        cfg_file = path / "cfg.json"
        saved = read_json(cfg_file)
        metadata = dict(saved.get("metadata") or {})
        saved_arch = metadata.get("training_architecture") or saved.get("architecture")
        saved = {**dict(metadata.get("training_architecture_details") or {}), **saved}
        mine = self.sae.cfg
        differ = []
        if saved_arch != mine.architecture():
            differ.append(f"architecture={saved_arch!r} (this run: {mine.architecture()!r})")
        ours = json.loads(json.dumps(mine.to_dict(), default=str))
        for f in fields(mine):
            if f.name in _CFG_KEYS_FREE_ON_RESUME or f.name not in saved:
                continue
            if saved[f.name] != ours.get(f.name):
                differ.append(f"{f.name}={saved[f.name]!r} (this run: {ours.get(f.name)!r})")
        if differ:
            raise ValueError(
                f"{cfg_file} does not match the SAE config of the run resuming from it: "
                f"{', '.join(differ)}. A resume continues the run that wrote the checkpoint: "
                "resume with that run's SAE config (or start a new run, e.g. with "
                "from_pretrained_path, to train another SAE)"
            )

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

    def _warn_runner_config_changes(self, path: Path) -> None:
        """Warn (rank 0) naming ``<path>/runner_cfg.json`` and the fields when the run
        config that wrote the checkpoint differs from this one in a field that changes
        what is trained (model, hook, data, batch, optimisation): the resume is then not
        the run that was interrupted. Paths, devices and logging may differ."""
        cfg_file = path / RUNNER_CFG_FILENAME
        to_dict = getattr(self.cfg, "to_dict", None)
        if not cfg_file.is_file() or not callable(to_dict) or getattr(self, "rank", 0) != 0:
            return
        saved = read_json(cfg_file)
        ours = json.loads(json.dumps(to_dict(), default=str))
        differ = [
            f"{key}={saved[key]!r} (this run: {ours.get(key)!r})"
            for key in _RUNNER_KEYS_OF_THE_RUN
            if key in saved and key in ours and saved[key] != ours[key]
        ]
        if differ:
            warnings.warn(
                f"{cfg_file}: the checkpoint was written by a run with {', '.join(differ)}; "
                "the resumed run continues with this run's values, so it is not the run "
                "that was interrupted",
                stacklevel=3,
            )

    def _load_run_files(self, path: Path, state: dict[str, Any]) -> None:
        """The part of a resume every trainer shares: RNG states, normalisation, an
        interrupted step's pending batch, the data position, the metrics file."""
        self._warn_runner_config_changes(path)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.scaler.load(path, normalisation=self.sae.cfg.normalize_activations)
        pending = path / PENDING_BATCH_FILENAME
        self._pending_batch = None
        if pending.is_file():
            tensors = read_tensors(pending, "pending batch")
            if "batch" not in tensors:
                raise ValueError(f"{pending}: no 'batch' tensor (found {sorted(tensors)})")
            self._pending_batch = tensors["batch"]
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
            data_state = load_torch_file(data_file, "data position")
            if is_rank_sharded_state(data_state) and not isinstance(
                self.data_provider, RankShardedProvider
            ):  # written by a data-parallel run, resumed without one
                data_state = bare_provider_state(data_state)
            _load_naming(load, data_state, data_file)
            return
        if saved > 1:
            files = [path / DATA_REPLICA_FILENAME.format(replica=i) for i in range(saved)]
        else:
            files = [path / DATA_STATE_FILENAME]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"the checkpoint's data positions are missing: {missing}")
        if saved == count:
            _load_naming(load, load_torch_file(files[index], "data position"), files[index])
            return
        from fastsae.training.activations_store_state import furthest_position

        states = []
        for f in files:
            st = load_torch_file(f, "data position")
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


def load_torch_file(path: Path, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a checkpoint file (``what`` it holds, for the message); a
    missing, truncated or corrupt file raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - name the file whatever torch raised
        raise ValueError(f"{path}: unreadable {what}, truncated or corrupt ({e})") from e


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file of a checkpoint (any dtype; ``what`` it holds,
    for the message); a missing, truncated or corrupt file raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable {what}, truncated or corrupt ({e})") from e


def _load_naming(load: Any, state: Any, file: Path) -> None:
    """``load(state)``; a state that does not fit the data provider raises naming
    ``file``."""
    try:
        load(state)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: the data position does not fit this run's data ({e})") from e
