"""Building a rank's shard without the full SAE in memory: a fresh shard whose latents
are exactly those of the full SAE's initialisation, and a shard's latents read from a
saved SAE (``sae_weights.safetensors``).

A latent-sharded run exists because the full SAE may not fit one device; on a node with
eight ranks it may not fit eight times in host memory either. Both builders hold the
shard plus a bounded block (``chunk_bytes``), never the full ``[d_sae, d_in]`` matrices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from fastsae.loading.atomic_dir import recover_dir
from fastsae.loading.disk import SAE_WEIGHTS_FILENAME
from fastsae.saes.training_sae import TrainingSAEConfig, scale_decoder_rows_
from fastsae.training.parallel.latent.base import SHARD_DIMS, ShardedTrainingSAE, meta_full

INIT_CHUNK_BYTES = 1 << 26  # rows of the full W_dec drawn at a time while initialising


@torch.no_grad()
def init_shard(
    cls: type[ShardedTrainingSAE],
    cfg: TrainingSAEConfig,
    rank: int,
    world_size: int,
    group=None,
    *,
    chunk_bytes: int = INIT_CHUNK_BYTES,
) -> ShardedTrainingSAE:
    """Rank ``rank``'s shard of the SAE that ``cls.full_class(cfg)`` would build on the
    CPU from the current torch RNG state, equal to ``cls.from_full(full, ...)`` bit for
    bit, and leaving the RNG where building the full SAE would.

    The full initialisation draws ``W_dec [d_sae, d_in]`` kaiming-uniform row by row
    (the only random draw of the sharded architectures; the other parameters start at
    constants, which the shard's constructor sets), scales each row to
    ``decoder_init_norm`` and sets ``W_enc = W_dec.T``. Here the same draws happen in
    blocks of rows of at most ``chunk_bytes``; the shard keeps its rows and drops the
    others.
    """
    shard = cls(cfg, rank, world_size, group)
    W_dec = shard.W_dec.data
    d_sae, d_in = cfg.d_sae, cfg.d_in
    rows = max(1, chunk_bytes // max(1, d_in * W_dec.element_size()))
    for start in range(0, d_sae, rows):
        stop = min(d_sae, start + rows)
        block = torch.empty(stop - start, d_in, dtype=W_dec.dtype)
        nn.init.kaiming_uniform_(block)  # fan_in = d_in, as for the whole matrix
        lo, hi = max(start, shard.lo), min(stop, shard.hi)
        if lo < hi:
            W_dec[lo - shard.lo : hi - shard.lo].copy_(block[lo - start : hi - start])
    if getattr(cfg, "decoder_init_norm", None) is not None:
        scale_decoder_rows_(W_dec, cfg.decoder_init_norm)
    shard.W_enc.data.copy_(W_dec.T)
    return shard


def full_parameter_names(shard: ShardedTrainingSAE) -> list[str]:
    """The full SAE's parameter names in ``parameters()`` order (how a single-process
    checkpoint's optimizer state indexes them), from a build on the meta device."""
    return [name for name, _ in meta_full(shard.full_class, shard.cfg).named_parameters()]


def _slice_spec(name: str, lo: int, hi: int, ndim: int) -> tuple[slice, ...]:
    dim = SHARD_DIMS[name]
    return tuple(slice(lo, hi) if d == dim else slice(None) for d in range(ndim))


@torch.no_grad()
def load_shard_weights_(shard: ShardedTrainingSAE, path: str | Path) -> None:
    """Set ``shard``'s parameters and buffers from the saved SAE in folder ``path``
    (``sae_weights.safetensors`` of a training checkpoint or a ``from_pretrained_path``),
    reading only this shard's latents of the per-latent tensors.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing,
    corrupt, or does not fit (missing or extra tensors, another ``d_sae`` or ``d_in``).
    """
    file = recover_dir(Path(path)) / SAE_WEIGHTS_FILENAME  # finish an interrupted swap
    if not file.is_file():
        raise FileNotFoundError(f"{file}: file not found")
    state: dict[str, Tensor] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = "threshold" if key == "log_threshold" else key
                if name not in SHARD_DIMS:
                    state[key] = f.get_tensor(key)
                    continue
                part = f.get_slice(key)
                shape = part.get_shape()
                dim = SHARD_DIMS[name]
                if len(shape) <= dim or shape[dim] != shard.cfg.d_sae:
                    raise ValueError(
                        f"{file}: {key} has shape {tuple(shape)}, not {shard.cfg.d_sae} "
                        f"latents along dimension {dim} (this SAE's d_sae)"
                    )
                state[key] = part[_slice_spec(name, shard.lo, shard.hi, len(shape))]
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    # older JumpReLU checkpoints store log_threshold (elementwise: fine on a slice)
    shard.full_class.process_state_dict_for_loading(shard, state)  # type: ignore[arg-type]
    _copy_state_(shard, state, file)


def _copy_state_(shard: ShardedTrainingSAE, state: dict[str, Any], file: Path) -> None:
    own = dict(shard.state_dict(keep_vars=True))
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(
            f"{file} does not fit a {shard.full_class.__name__}: missing {missing}, "
            f"unexpected {extra}"
        )
    for name, target in own.items():
        value = state[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{file}: {name} has shape {tuple(value.shape)} for this shard, expected "
                f"{tuple(target.shape)} (d_in {shard.cfg.d_in}, d_sae {shard.cfg.d_sae})"
            )
        target.data.copy_(value)  # cast to the shard's dtype, as load_state_dict does


__all__ = ["INIT_CHUNK_BYTES", "full_parameter_names", "init_shard", "load_shard_weights_"]
