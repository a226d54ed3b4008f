"""The files of a training checkpoint: what
:class:`~fastsae.training.trainer.SAETrainer` writes and reads so that a resumed run
continues with exactly the losses of an uninterrupted one.

A checkpoint folder (written complete beside its place and swapped in as a whole, so a
kill or a failed rename at any moment leaves the old checkpoint or the new one: see
:mod:`fastsae.loading.atomic_dir`, whose recovery rule loading applies) holds the SAE
in the SAELens format, ``trainer_state.pt`` (optimizer, schedules, counters, firing
statistics, RNG states), the data position (``data_state.pt``, or one
``data_state_replica{i}.pt`` per data-parallel replica when each replica draws its own
token rows), the activation normalisation, an interrupted step's pending batch and the
run config.

This module holds the file names, formats and checks, as functions of what they read or
write; the trainer's ``save_checkpoint`` / ``load_checkpoint`` put its state through
them, and the data-parallel and latent-sharded trainers override parts of those
(:mod:`fastsae.training.parallel.data_parallel`,
:mod:`fastsae.training.parallel.latent.trainer`).
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fastsae.loading.atomic_dir import clean_stale, recover_dir
from fastsae.loading.disk import load_torch_file, read_json, read_tensors
from fastsae.training.data.activations_store import furthest_position
from fastsae.training.parallel.rank_shards import (
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


# --------------------------------------------------------------------------- reading
def recover_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder at ``path``, ready to read: a swap that a kill interrupted
    is finished and the leftovers of killed writes beside it are deleted
    (:mod:`fastsae.loading.atomic_dir`). Raises when it holds no trainer state."""
    path = recover_dir(Path(path))
    clean_stale(path.parent)
    if not (path / TRAINER_STATE_FILENAME).is_file():
        raise FileNotFoundError(
            f"{path} is not a fastsae training checkpoint: {TRAINER_STATE_FILENAME} is missing"
        )
    return path


def check_sae_config(path: Path, sae_cfg: Any) -> None:
    """Raise naming ``<path>/cfg.json`` when the SAE config it records differs from
    ``sae_cfg``, the one the resuming run trains (another ``d_sae``, ``k``,
    architecture, normalisation, dtype...): a resume continues the run that wrote the
    checkpoint, so an edit of either is an error, not silently ignored. ``device`` and
    the metadata may differ."""
    cfg_file = path / "cfg.json"
    saved = read_json(cfg_file)
    metadata = dict(saved.get("metadata") or {})
    saved_arch = metadata.get("training_architecture") or saved.get("architecture")
    saved = {**dict(metadata.get("training_architecture_details") or {}), **saved}
    differ = []
    if saved_arch != sae_cfg.architecture():
        differ.append(f"architecture={saved_arch!r} (this run: {sae_cfg.architecture()!r})")
    ours = json.loads(json.dumps(sae_cfg.to_dict(), default=str))
    for f in fields(sae_cfg):
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


def warn_runner_config_changes(path: Path, cfg: Any) -> None:
    """Warn naming ``<path>/runner_cfg.json`` and the fields when the run config that
    wrote the checkpoint differs from ``cfg`` in a field that changes what is trained
    (model, hook, data, batch, optimisation): the resume is then not the run that was
    interrupted. Paths, devices and logging may differ. Nothing when the checkpoint or
    ``cfg`` has no run config."""
    cfg_file = path / RUNNER_CFG_FILENAME
    to_dict = getattr(cfg, "to_dict", None)
    if not cfg_file.is_file() or not callable(to_dict):
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


def read_pending_batch(path: Path) -> torch.Tensor | None:
    """The batch an interrupted step had drawn but not trained on, when the checkpoint
    at ``path`` holds one."""
    pending = path / PENDING_BATCH_FILENAME
    if not pending.is_file():
        return None
    tensors = read_tensors(pending, "pending batch")
    if "batch" not in tensors:
        raise ValueError(f"{pending}: no 'batch' tensor (found {sorted(tensors)})")
    return tensors["batch"]


def load_data_position(
    path: Path, provider: Any, saved_replicas: int, replica: tuple[int, int], *, warn: bool
) -> None:
    """Restore ``provider``'s position (when it has ``load_state_dict``) from the
    checkpoint at ``path``. ``saved_replicas``: how many data replicas wrote the
    checkpoint; ``replica``: ``(index, count)`` of the provider's replica in this run.
    The replica's own file when the counts agree, else the furthest saved position
    (warning, when ``warn``, with the number of buffered activations skipped)."""
    load = getattr(provider, "load_state_dict", None)
    if not callable(load):
        return
    index, count = replica
    if saved_replicas == 1 and count == 1:
        data_file = path / DATA_STATE_FILENAME
        if not data_file.is_file():
            raise FileNotFoundError(
                f"{data_file} is missing: the checkpoint has no data position to resume from"
            )
        data_state = load_torch_file(data_file, "data position")
        if is_rank_sharded_state(data_state) and not isinstance(provider, RankShardedProvider):
            # written by a data-parallel run, resumed without one
            data_state = bare_provider_state(data_state)
        _load_naming(load, data_state, data_file)
        return
    if saved_replicas > 1:
        files = [path / DATA_REPLICA_FILENAME.format(replica=i) for i in range(saved_replicas)]
    else:
        files = [path / DATA_STATE_FILENAME]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"the checkpoint's data positions are missing: {missing}")
    if saved_replicas == count:
        _load_naming(load, load_torch_file(files[index], "data position"), files[index])
        return
    states = []
    for f in files:
        st = load_torch_file(f, "data position")
        states.append(bare_provider_state(st) if is_rank_sharded_state(st) else st)
    merged, dropped = furthest_position(states, (index, count))
    if warn:
        warnings.warn(
            f"{path} was written with {saved_replicas} data replicas, this run has {count}: "
            f"the data continues from the furthest saved position; {dropped} "
            "activations that were in the saved shuffling buffers are not trained on",
            stacklevel=2,
        )
    load(merged)


def _load_naming(load: Callable[[Any], None], state: Any, file: Path) -> None:
    """``load(state)``; a state that does not fit the data provider raises naming
    ``file``."""
    try:
        load(state)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: the data position does not fit this run's data ({e})") from e


# --------------------------------------------------------------------------- writing
def write_data_position(path: Path, provider: Any) -> None:
    """``provider.state_dict()`` into ``path``, when the provider has one."""
    state_dict = getattr(provider, "state_dict", None)
    if callable(state_dict):
        torch.save(state_dict(), path)


def write_pending_batch(folder: Path, batch: torch.Tensor | None) -> None:
    """An interrupted step's batch (drawn, not trained on), when there is one."""
    if batch is not None:
        save_file({"batch": batch.detach().cpu().contiguous()},
                  str(folder / PENDING_BATCH_FILENAME))  # fmt: skip


def write_runner_cfg(folder: Path, cfg: Any) -> None:
    """The run config (``cfg.to_dict()``, when it has one) as ``runner_cfg.json``."""
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        (folder / RUNNER_CFG_FILENAME).write_text(json.dumps(to_dict(), indent=2))


# --------------------------------------------------------------------------- RNG
def rng_states() -> dict[str, Any]:
    """The torch, Python and (when available) CUDA random generators' states."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_states(rng: dict[str, Any]) -> None:
    """Set the generators to states :func:`rng_states` returned."""
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
