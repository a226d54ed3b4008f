"""What every latent-sharded training SAE shares: the shard layout, the collectives and
their autograd rules, building a shard from a full SAE and gathering it back, and
gradient clipping over the shards.

Rank ``r`` of the ``W`` ranks of the shard group holds latents
``[r * d_sae / W, (r + 1) * d_sae / W)`` of every per-latent parameter (``W_enc``
columns, ``b_enc``, ``W_dec`` rows, JumpReLU's ``threshold``); ``b_dec`` is replicated.

Autograd. The losses are computed redundantly on every rank from the same summed
reconstruction (and summed per-token sparsity terms), so each rank's loss *is* the
global loss and the gradient arriving at a sum over shards is already the full
gradient on every rank. Hence :class:`_SumOverShards` (an all_reduce forward) has an
**identity** backward (an all-reduce backward, as
``torch.distributed.nn.functional.all_reduce`` has, would count it ``W`` times). The
only partial gradient is ``b_dec``'s through the encoder input ``x - b_dec`` (each rank
sees its own latents): :class:`_ReplicatedInput` is identity forward and sums that
``[d_in]`` gradient over the ranks. ``b_dec``'s gradient through the output
``+ b_dec`` is full on every rank. So each shard gets exactly its rows of the unsharded
gradient, and ``b_dec`` the full gradient, equal on every rank (replicas stay in sync).

Optimizer: Adam is elementwise, so Adam on each shard is the unsharded Adam restricted
to it, given equal gradients and one global clipping factor
(:func:`clip_grad_norm_sharded`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastsae.saes.training_sae import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from fastsae.sparse_code import SparseCode
from fastsae.training.parallel.collectives import collective

# per-latent parameters and the dimension along which d_sae runs
SHARD_DIMS: dict[str, int] = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}


def shard_range(d_sae: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(lo, hi)``: the latents rank ``rank`` of ``world_size`` holds (even split)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if d_sae % world_size:
        raise ValueError(
            f"latent sharding needs d_sae divisible by the number of shards: d_sae {d_sae} "
            f"is not divisible by {world_size}"
        )
    n = d_sae // world_size
    return rank * n, (rank + 1) * n


def shard_tensor(name: str, full: Tensor, lo: int, hi: int) -> Tensor:
    """Rows ``[lo, hi)`` along ``d_sae`` of a per-latent tensor named ``name`` (a view);
    a replicated tensor (``b_dec``) whole."""
    dim = SHARD_DIMS.get(name)
    return full if dim is None else full.narrow(dim, lo, hi - lo)


# --------------------------------------------------------------------------- collectives
def group_rank_and_world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_reduce(t: Tensor, group, what: str, op=None) -> Tensor:
    """``t`` reduced in place over ``group`` (``op``: default SUM)."""
    if group_rank_and_world(group)[1] > 1:
        op = dist.ReduceOp.SUM if op is None else op
        collective(what, dist.all_reduce, t, op=op, group=group)
    return t


def all_gather(t: Tensor, group, what: str) -> list[Tensor]:
    world = group_rank_and_world(group)[1]
    if world == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(world)]
    collective(what, dist.all_gather, parts, t.contiguous(), group=group)
    return parts


def broadcast_shard(t: Tensor, src: int, group, what: str) -> Tensor:
    """Group rank ``src``'s ``t`` on every rank of ``group`` (``t``: this rank's tensor of
    the same shape and dtype; returned as is on ``src``)."""
    rank, world = group_rank_and_world(group)
    if world == 1:
        return t
    buf = t.contiguous() if rank == src else torch.empty_like(t)
    global_src = src if group is None else dist.get_global_rank(group, src)
    collective(f"{what} (shard {src})", dist.broadcast, buf, src=global_src, group=group)
    return buf


def meta_full(full_class: type[TrainingSAE], cfg: TrainingSAEConfig) -> TrainingSAE:
    """A full training SAE of ``cfg`` on the meta device: its parameter names, shapes and
    order, with no memory and no random initialisation (``cfg`` is left alone)."""
    cfg = copy.deepcopy(cfg)
    cfg.device = "meta"
    return full_class(cfg)


def _allocated_full(full_class: type[TrainingSAE], cfg: TrainingSAEConfig, device) -> TrainingSAE:
    """A full training SAE of ``cfg`` with uninitialised tensors on ``device``."""
    full = meta_full(full_class, cfg)
    full.to_empty(device=device)
    full.device = torch.device(device)
    full.cfg.device = str(full.device)
    return full


class _SumOverShards(torch.autograd.Function):
    """Forward: sum of the ranks' partial tensors (all_reduce). Backward: identity — the
    loss downstream is computed identically on every rank, so each rank's incoming
    gradient already is the full gradient of its partial."""

    @staticmethod
    def forward(ctx, partial, group, what):  # type: ignore[override]
        return all_reduce(partial.clone(), group, what)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


def sum_over_shards(partial: Tensor, group, what: str) -> Tensor:
    """``partial`` summed over the shard group, with the identity backward above."""
    return _SumOverShards.apply(partial, group, what)


class _ReplicatedInput(torch.autograd.Function):
    """Forward: identity on a replicated tensor that feeds only this rank's shard.
    Backward: the gradient summed over ranks (each rank contributes its latents')."""

    @staticmethod
    def forward(ctx, t, group, what):  # type: ignore[override]
        ctx.group, ctx.what = group, what
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return all_reduce(grad.contiguous().clone(), ctx.group, ctx.what), None, None


# --------------------------------------------------------------------------- the module
class ShardedTrainingSAE(nn.Module):
    """This rank's shard of a training SAE (subclasses: one per architecture).

    ``W_enc [d_in, n]``, ``b_enc [n]``, ``W_dec [n, d_in]`` (and the architecture's other
    per-latent parameters) for latents ``[lo, hi)`` (``n = d_sae / world_size``) and the
    replicated ``b_dec [d_in]``. ``cfg`` is the full SAE's config (``cfg.d_sae`` is the
    global width). ``group``: the process group the latents are sharded over (``None``:
    the default group); every rank of it must make the same calls in the same order, with
    the same ``sae_in``.

    Supports ``normalize_activations="none"`` and no hooks (the dense SAELens forms are
    not built).
    """

    full_class: ClassVar[type[TrainingSAE]]
    cfg: Any

    @classmethod
    def step_payloads(
        cls, batch: int, d_in: int, *, k: float, n_dead: int, dtype_bytes: int, pre_act_loss: bool
    ) -> dict[str, int]:
        """Payload bytes of the architecture's own collectives in one step on one rank
        (:func:`~fastsae.training.parallel.latent.communication.step_payload_bytes` adds
        the ones every architecture makes); each architecture's class says its own."""
        raise NotImplementedError(f"{cls.__name__} does not say what its step sends")

    def __init__(self, cfg: TrainingSAEConfig, rank: int, world_size: int, group=None) -> None:
        super().__init__()
        if cfg.normalize_activations != "none":
            raise NotImplementedError(
                "latent sharding supports normalize_activations='none' only, got "
                f"{cfg.normalize_activations!r}"
            )
        self.cfg = cfg
        self.rank, self.world_size, self.group = rank, world_size, group
        self.lo, self.hi = shard_range(cfg.d_sae, rank, world_size)
        n, d_in = self.hi - self.lo, cfg.d_in
        kw = {"dtype": getattr(torch, str(cfg.dtype).removeprefix("torch.")), "device": "cpu"}
        self.W_enc = nn.Parameter(torch.zeros(d_in, n, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n, **kw))
        self.W_dec = nn.Parameter(torch.zeros(n, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))

    @property
    def d_sae_local(self) -> int:
        return self.hi - self.lo

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def get_coefficients(self) -> dict[str, Any]:
        """The scheduled loss coefficients (the full SAE's: the trainer's interface)."""
        return self.full_class.get_coefficients(self)  # type: ignore[arg-type]

    def sharded_parameters(self) -> Iterable[nn.Parameter]:
        return (p for name, p in self.named_parameters() if name in SHARD_DIMS)

    def replicated_parameters(self) -> Iterable[nn.Parameter]:
        return (p for name, p in self.named_parameters() if name not in SHARD_DIMS)

    # ------------------------------------------------------------------ build / gather
    @classmethod
    @torch.no_grad()
    def from_full(
        cls, full_sae: TrainingSAE, rank: int, world_size: int, group=None
    ) -> ShardedTrainingSAE:
        """Rank ``rank``'s shard of ``full_sae`` (copies; ``full_sae`` is left alone)."""
        if type(full_sae) is not cls.full_class:
            raise TypeError(
                f"{cls.__name__}.from_full needs a {cls.full_class.__name__}, got "
                f"{type(full_sae).__name__}"
            )
        shard = cls(copy.deepcopy(full_sae.cfg), rank, world_size, group)
        # every tensor takes the full SAE's device and dtype (fp32 JumpReLU threshold,
        # float64 BatchTopK threshold, the weights' dtype), not one dtype for all
        full_params = dict(full_sae.named_parameters())
        for name, p in shard.named_parameters():
            p.data = shard_tensor(name, full_params[name].detach(), shard.lo, shard.hi).clone()
        full_buffers = dict(full_sae.named_buffers())
        for name, b in shard.named_buffers():  # replicated (BatchTopK's threshold)
            b.data = full_buffers[name].detach().clone()
        return shard

    @torch.no_grad()
    def gather_full(
        self, device: str | torch.device | None = None, dst: int | None = None
    ) -> TrainingSAE | None:
        """The shards gathered into the ordinary training SAE; every rank of the shard
        group must call it.

        ``device``: where the full SAE is built (default: this shard's device; ``"cpu"``
        keeps it out of accelerator memory). ``dst``: the group rank that receives it
        (the others return None); None: every rank. The shards travel one at a time
        (one broadcast per shard and tensor), so a rank holds at most one other shard
        of one tensor besides its own in the shards' memory, plus the full SAE on
        ``device`` where it is kept.
        """
        device = self.device if device is None else torch.device(device)
        keep = dst is None or self.rank == dst
        full = _allocated_full(self.full_class, self.cfg, device) if keep else None
        full_params = dict(full.named_parameters()) if full is not None else {}
        for name, p in self.named_parameters():
            dim = SHARD_DIMS.get(name)
            if full is not None:  # the shards' dtypes (fp32 JumpReLU threshold)
                full_params[name].data = full_params[name].data.to(p.dtype)
            if dim is None:
                if full is not None:
                    full_params[name].copy_(p)
                continue
            for s in range(self.world_size):
                part = broadcast_shard(p.detach(), s, self.group, f"gather {name}")
                if full is not None:
                    lo, hi = shard_range(self.cfg.d_sae, s, self.world_size)
                    full_params[name].narrow(dim, lo, hi - lo).copy_(part)
        if full is not None:
            full_buffers = dict(full.named_buffers())
            for name, b in self.named_buffers():
                full_buffers[name].data = b.detach().to(device).clone()
        return full

    # ------------------------------------------------------------------ inference
    def _forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        """The step's forward without touching the SAE's state (the training step also
        updates running statistics: BatchTopK's threshold EMA, JumpReLU's clamp)."""
        return self.training_forward_pass(step_input)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor | SparseCode]:
        """``x [..., d_in]`` -> ``(reconstruction [..., d_in], this rank's activations)``:
        the SAE's output (the same full tensor on every rank; the training activation,
        as the unsharded training SAE's ``encode``/``decode`` give it) and this shard's
        latents of the flattened tokens, ``[tokens, d_sae_local]`` dense or a
        ``SparseCode [tokens, K]`` of shard-local ids (value-0 padding). Nothing of size
        ``d_sae`` is built. Every rank of the shard group must call it with the same
        ``x``."""
        flat = x.reshape(-1, x.shape[-1])
        coefficients = {
            k: v.value if isinstance(v, TrainCoefficientConfig) else v
            for k, v in self.get_coefficients().items()
        }
        out = self._forward(TrainStepInput(flat, coefficients, None, 0))
        acts = out.code if out.code is not None else out.feature_acts
        return out.sae_out.reshape(*x.shape[:-1], out.sae_out.shape[-1]), acts

    # ------------------------------------------------------------------ helpers
    def _local_dead(self, dead_neuron_mask: Tensor | None) -> Tensor | None:
        """This shard's part of a dead mask given globally (``[d_sae]``) or locally."""
        if dead_neuron_mask is None:
            return None
        if dead_neuron_mask.shape[-1] == self.cfg.d_sae:
            return dead_neuron_mask[self.lo : self.hi]
        if dead_neuron_mask.shape[-1] == self.d_sae_local:
            return dead_neuron_mask
        raise ValueError(
            f"dead_neuron_mask has {dead_neuron_mask.shape[-1]} entries: expected d_sae "
            f"{self.cfg.d_sae} (global) or {self.d_sae_local} (this rank's shard)"
        )

    def _encoder_input(self, x: Tensor) -> Tensor:
        """``x - b_dec`` (when ``apply_b_dec_to_input``) with ``b_dec``'s encoder
        gradient summed over the shards."""
        if not self.cfg.apply_b_dec_to_input:
            return x
        b_dec = _ReplicatedInput.apply(self.b_dec, self.group, "b_dec encoder-gradient all_reduce")
        return x - b_dec


# --------------------------------------------------------------------------- optimizer
@torch.no_grad()
def clip_grad_norm_sharded(sae: ShardedTrainingSAE, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the *unsharded* parameters: the global
    L2 norm is ``sqrt(sum over ranks of the shards' squared norms + |grad b_dec|^2)``
    (``b_dec`` counted once: it is replicated). Scales every gradient in place by
    ``min(max_norm / (norm + 1e-6), 1)``, as torch does; returns the global norm."""
    shard_grads = [p.grad for p in sae.sharded_parameters() if p.grad is not None]
    rep_grads = [p.grad for p in sae.replicated_parameters() if p.grad is not None]
    sq = torch.zeros(1, dtype=torch.float32, device=sae.b_dec.device)
    for grad in shard_grads:
        sq += grad.float().pow(2).sum()
    all_reduce(sq, sae.group, "grad norm all_reduce")
    for grad in rep_grads:
        sq += grad.float().pow(2).sum()
    total = sq.sqrt()[0]
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in shard_grads + rep_grads:
        grad.mul_(coef.to(grad.dtype))
    return total
