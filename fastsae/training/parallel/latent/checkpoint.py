"""The training state of a latent-sharded run on disk, and reading it back for any
layout: the same number of shards, another number, or one process (and back).

A latent-sharded checkpoint folder holds the full SAE (the ordinary SAELens
directory: ``cfg.json``, ``sae_weights.safetensors``), ``trainer_state.pt`` (counters,
schedules, RNG; ``latent_shards`` and ``data_parallel`` record the layout) and one
``trainer_state_shard{s}.pt`` per shard: that shard's Adam state **by parameter name**
and its firing statistics. A single-process checkpoint keeps the torch optimizer state
dict and the ``[d_sae]`` firing statistics in ``trainer_state.pt``.

:func:`read_latent_range` returns, from either kind, the optimizer tensors and firing
statistics of latents ``[lo, hi)`` (replicated parameters whole), reading only the shard
files that overlap the range, so a rank resuming with the same layout reads one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastsae.training.parallel.latent.base import SHARD_DIMS, shard_tensor

SHARD_STATE_FILENAME = "trainer_state_shard{shard}.pt"
FIRING_KEYS = ("act_freq_scores", "n_forward_passes_since_fired")


def optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, named_params: list[tuple[str, nn.Parameter]]
) -> tuple[dict[str, dict[str, Tensor]], list[dict[str, Any]]]:
    """``(per-parameter state keyed by name, param_groups' hyperparameters)``."""
    sd = optimizer.state_dict()
    names = [name for name, _ in named_params]
    state = {names[i]: dict(s) for i, s in sd["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return state, groups


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer,
    named_params: list[tuple[str, nn.Parameter]],
    state: dict[str, dict[str, Tensor]],
    groups: list[dict[str, Any]],
) -> None:
    """Inverse of :func:`optimizer_state_by_name` (shapes checked, names must match)."""
    sd = optimizer.state_dict()
    missing = [name for name, _ in named_params if name not in state]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state has no entry for {missing}")
    new_state = {}
    for i, (name, p) in enumerate(named_params):
        entry = dict(state[name])
        for key, value in entry.items():
            if key != "step" and value.shape != p.shape:
                raise ValueError(
                    f"optimizer state {name}.{key} has shape {tuple(value.shape)}, the "
                    f"parameter {tuple(p.shape)}"
                )
        new_state[i] = entry
    if len(groups) != len(sd["param_groups"]):
        raise ValueError("the checkpoint's optimizer has another number of parameter groups")
    sd["state"] = new_state
    sd["param_groups"] = [
        {**saved, "params": g["params"]}
        for saved, g in zip(groups, sd["param_groups"], strict=True)
    ]
    optimizer.load_state_dict(sd)


def _slice_state(name: str, entry: dict[str, Tensor], lo: int, hi: int) -> dict[str, Tensor]:
    return {
        k: (v if k == "step" else shard_tensor(name, v, lo, hi).clone()) for k, v in entry.items()
    }


def read_latent_range(
    path: str | Path,
    trainer_state: dict[str, Any],
    full_param_names: list[str],
    d_sae: int,
    lo: int,
    hi: int,
) -> dict[str, Any]:
    """Latents ``[lo, hi)`` of a checkpoint's training state (either kind, see above).

    ``full_param_names``: the unsharded SAE's parameters in ``parameters()`` order (how
    a single-process checkpoint's optimizer indexes them). Returns ``{"optimizer":
    {name: {exp_avg, exp_avg_sq, step}}, "param_groups": [...], "act_freq_scores",
    "n_forward_passes_since_fired"}`` on the CPU.
    """
    path = Path(path)
    saved_shards = trainer_state.get("latent_shards")
    if not saved_shards:  # a single-process (or data-parallel) checkpoint
        if "optimizer" not in trainer_state:
            raise ValueError(f"{path}: trainer_state.pt has no optimizer state")
        opt = trainer_state["optimizer"]
        state = {full_param_names[i]: s for i, s in opt["state"].items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        return {
            "optimizer": {n: _slice_state(n, s, lo, hi) for n, s in state.items()},
            "param_groups": groups,
            **{k: trainer_state[k].cpu()[lo:hi].clone() for k in FIRING_KEYS},
        }
    per_shard = d_sae // saved_shards
    first, last = lo // per_shard, (hi - 1) // per_shard
    parts = []
    for s in range(first, last + 1):
        file = path / SHARD_STATE_FILENAME.format(shard=s)
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: the checkpoint was written by {saved_shards} latent shards"
            )
        try:
            parts.append(torch.load(file, map_location="cpu", weights_only=False))
        except Exception as e:  # noqa: BLE001 - name the file whatever torch raised
            raise ValueError(f"{file}: unreadable shard state ({e})") from e
    base = first * per_shard  # the concatenated parts cover [base, (last + 1) * per_shard)
    a, b = lo - base, hi - base
    optimizer = {}
    for name, entry in parts[0]["optimizer"].items():
        dim = SHARD_DIMS.get(name)
        if dim is None:  # replicated: every shard holds the same state
            optimizer[name] = dict(entry)
            continue
        optimizer[name] = {}
        for key, value in entry.items():
            if key == "step":
                optimizer[name][key] = value
            else:
                whole = torch.cat([p["optimizer"][name][key] for p in parts], dim=dim)
                optimizer[name][key] = whole.narrow(dim, a, b - a).clone()
    firing = {k: torch.cat([p[k].cpu() for p in parts])[a:b].clone() for k in FIRING_KEYS}
    return {"optimizer": optimizer, "param_groups": parts[0]["param_groups"], **firing}
