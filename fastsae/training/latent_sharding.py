"""Latent-sharded TopK training on ``torch.distributed``: ``W_enc``, ``b_enc``, ``W_dec``
(and so their Adam state) split over ranks along ``d_sae``; ``b_dec`` replicated.

Rank ``r`` of ``W`` ranks holds latents ``[r * d_sae / W, (r + 1) * d_sae / W)``. One step:

1. every rank encodes its shard: ``h_r = ((x - b_dec) @ W_enc_r + b_enc_r) * |W_dec_r|``
   (the decoder-norm factor when ``rescale_acts_by_decoder_norm``, as TopK);
2. local top-k candidates (raw pre-activations and **global** latent ids) are
   all-gathered, ``[W, batch, k]``, and every rank takes the same global top-k of the
   ``W * k`` candidates. A latent in the global top-k has fewer than k larger values
   anywhere, so it is in its own shard's local top-k: the set equals the single-device
   ``torch.topk`` set. Ties: when the k-th and (k+1)-th largest pre-activations of a
   row are exactly equal, which of them is chosen is unspecified (as it is for
   ``torch.topk`` on one device); with distinct values the sets are identical;
3. each rank keeps the selected entries of its shard (a padded ``[batch, k]`` code,
   ``value 0`` padding), decodes them with ``W_dec_r`` (sparse), and the partial
   reconstructions are summed with ``all_reduce``; ``+ b_dec``; MSE as TopK's;
4. AuxK: the dead mask is sharded the same way; the top ``min(d_in // 2, n_dead)`` dead
   latents are chosen globally by the same candidate gather and their partial
   reconstructions all-reduced. ``n_dead`` is the global count.

Backward. The losses are computed redundantly on every rank from the same summed
reconstruction, so each rank's loss is the global loss and ``d loss / d sae_out`` is
already the full gradient on every rank. Hence the reconstruction ``all_reduce`` has an
**identity** backward (:class:`_SumOverShards`; an all-reduce backward, as
``torch.distributed.nn.functional.all_reduce`` has, would count it ``W`` times). The
only gradient that is partial per rank is ``b_dec``'s through the encoder input
``x - b_dec`` (each rank sees only its latents): :class:`_ReplicatedInput` is identity
forward and sums that ``[d_in]`` gradient over ranks in backward. ``b_dec``'s gradient
through the output ``+ b_dec`` is full on every rank and is not reduced. So the shards
get exactly their rows of the unsharded gradient, and ``b_dec`` the full gradient,
bitwise equal on every rank (replicas stay in sync).

Optimizer: Adam is elementwise, so Adam on each rank's shard is the unsharded Adam
restricted to it, given equal gradients and one global clipping factor:
:func:`clip_grad_norm_sharded` sums the squared norms of the sharded gradients over
ranks and adds ``b_dec``'s once.

Communication per step (fp32): candidates ``2 * W * batch * k`` values+ids gathered,
the ``[batch, d_in]`` reconstruction all-reduced (twice with AuxK) and ``d_in`` for
``b_dec``'s encoder gradient; nothing of size ``d_sae``.

Saving: :meth:`ShardedTopKTrainingSAE.gather_full` all-gathers the shards into an
ordinary :class:`TopKTrainingSAE` (on every rank), whose ``save_model`` /
``save_inference_model`` write the normal single-file SAELens directory; a saved
directory loads into a sharded run with ``from_full(TopKTrainingSAE.load_from_disk(p),
rank, world)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastsae import ops
from fastsae.sparse_code import SparseCode
from fastsae.torch_ops import encoder_preacts, gather_weighted_sum, scatter_rows
from fastsae.training.distributed import _collective
from fastsae.training.losses import topk_aux_scale
from fastsae.training.saes.base import TrainStepInput, TrainStepOutput, _total
from fastsae.training.saes.topk import TopKTrainingSAE, TopKTrainingSAEConfig

_SHARDED = ("W_enc", "b_enc", "W_dec")


def shard_range(d_sae: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(lo, hi)``: the latents rank ``rank`` of ``world_size`` holds (even split)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if d_sae % world_size:
        raise ValueError(
            f"latent sharding needs d_sae divisible by the world size: d_sae {d_sae} is not "
            f"divisible by world size {world_size}"
        )
    n = d_sae // world_size
    return rank * n, (rank + 1) * n


# --------------------------------------------------------------------------- collectives
def _group_world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _all_reduce(t: Tensor, group, what: str) -> Tensor:
    if _group_world(group)[1] > 1:
        _collective(what, dist.all_reduce, t, op=dist.ReduceOp.SUM, group=group)
    return t


def _all_gather(t: Tensor, group, what: str) -> list[Tensor]:
    world = _group_world(group)[1]
    if world == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(world)]
    _collective(what, dist.all_gather, parts, t.contiguous(), group=group)
    return parts


class _SumOverShards(torch.autograd.Function):
    """Forward: sum of the ranks' partial tensors (all_reduce). Backward: identity — the
    loss downstream is computed identically on every rank, so each rank's incoming
    gradient already is the full gradient of its partial."""

    @staticmethod
    def forward(ctx, partial, group, what):  # type: ignore[override]
        return _all_reduce(partial.clone(), group, what)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


class _ReplicatedInput(torch.autograd.Function):
    """Forward: identity on a replicated tensor that feeds only this rank's shard.
    Backward: the gradient summed over ranks (each rank contributes its latents')."""

    @staticmethod
    def forward(ctx, t, group, what):  # type: ignore[override]
        ctx.group, ctx.what = group, what
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _all_reduce(grad.contiguous().clone(), ctx.group, ctx.what), None, None


class _SelectedEncode(torch.autograd.Function):
    """The values of an already-selected code ``(values, indices)`` (ReLU'd
    pre-activations, padding 0) with TopK's sparse encoder backward (no ``[B, n]``
    gradient): ``d x``, ``d W_enc``, ``d b_enc``, ``d dec_norm``."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, dec_norm, values, indices, h_sel):  # type: ignore[override]
        ctx.save_for_backward(x, W_enc, b_enc, dec_norm, values, indices, h_sel)
        return values.clone()

    @staticmethod
    def backward(ctx, d_values):  # type: ignore[override]
        x, W_enc, b_enc, dec_norm, values, indices, h_sel = ctx.saved_tensors
        need_x, need_w, need_b, need_dn = ctx.needs_input_grad[:4]
        d_pre = d_values * (values > 0)
        d_h = d_pre if dec_norm is None else d_pre * dec_norm[indices]
        d_dn = None
        if dec_norm is not None and need_dn:
            d_dn = torch.zeros_like(dec_norm).index_add_(
                0, indices.reshape(-1), (d_pre * h_sel).reshape(-1).to(dec_norm.dtype)
            )
        d_x = (
            gather_weighted_sum(d_h, indices, W_enc.T.contiguous()).to(x.dtype) if need_x else None
        )
        d_w = scatter_rows(d_h, indices, x, W_enc.shape[1]).T.to(W_enc.dtype) if need_w else None
        d_b = None
        if need_b:
            d_b = torch.zeros_like(b_enc).index_add_(
                0, indices.reshape(-1), d_h.reshape(-1).to(b_enc.dtype)
            )
        return d_x, d_w, d_b, d_dn, None, None, None


def global_topk(
    h_local: Tensor, k: int, offset: int, group=None, what: str = "topk candidates"
) -> tuple[Tensor, Tensor]:
    """Exact global top-k of a row-sharded ``[B, n_local]`` score matrix (no grad).

    Returns ``(local_positions [B, k'], selected [B, k'] bool, global_ids [B, k])`` where
    ``k' = min(k, n_local)`` are this rank's candidate columns and ``selected`` marks those
    in the global top-k. ``global_ids`` (sorted by value, descending) is the global
    selection, the same on every rank. Every rank must call it (it all-gathers).
    """
    batch, n_local = h_local.shape
    k_local = min(k, n_local)
    vals, pos = torch.topk(h_local, k_local, dim=-1, sorted=False)
    cand_vals = h_local.new_full((batch, k), float("-inf"))
    cand_ids = torch.full((batch, k), -1, dtype=torch.int64, device=h_local.device)
    cand_vals[:, :k_local] = vals
    cand_ids[:, :k_local] = pos + offset
    all_vals = torch.cat(_all_gather(cand_vals, group, what + " (values)"), dim=-1)
    all_ids = torch.cat(_all_gather(cand_ids, group, what + " (ids)"), dim=-1)
    top_vals, top_pos = torch.topk(all_vals, k, dim=-1, sorted=True)
    global_ids = all_ids.gather(-1, top_pos)
    rank = _group_world(group)[0]
    mine = top_pos[:, :, None] == (rank * k + torch.arange(k_local, device=pos.device))
    selected = mine.any(dim=1)  # [B, k_local]: candidate j of this rank was chosen
    return pos, selected, global_ids


# --------------------------------------------------------------------------- the module
class ShardedTopKTrainingSAE(nn.Module):
    """This rank's shard of a :class:`TopKTrainingSAE`: ``W_enc [d_in, n]``, ``b_enc [n]``,
    ``W_dec [n, d_in]`` for latents ``[lo, hi)`` (``n = d_sae / world_size``), and the
    replicated ``b_dec [d_in]``. ``cfg`` is the full SAE's config (``cfg.d_sae`` is the
    global width). ``group``: the process group the latents are sharded over (``None``:
    the default group); every rank of it must run the same calls in the same order.

    Supports ``normalize_activations="none"`` and no hooks (the dense SAELens forms are
    not built); ``apply_b_dec_to_input`` and ``rescale_acts_by_decoder_norm`` either way.
    """

    def __init__(self, cfg: TopKTrainingSAEConfig, rank: int, world_size: int, group=None) -> None:
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
        self.last_global_indices: Tensor | None = None

    @property
    def d_sae_local(self) -> int:
        return self.hi - self.lo

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def get_coefficients(self) -> dict[str, float]:
        """TopK has no scheduled loss coefficients (the trainer's interface)."""
        return {}

    def sharded_parameters(self) -> Iterable[nn.Parameter]:
        return (self.W_enc, self.b_enc, self.W_dec)

    def replicated_parameters(self) -> Iterable[nn.Parameter]:
        return (self.b_dec,)

    # ------------------------------------------------------------------ build / gather
    @classmethod
    @torch.no_grad()
    def from_full(
        cls, full_sae: TopKTrainingSAE, rank: int, world_size: int, group=None
    ) -> ShardedTopKTrainingSAE:
        """Rank ``rank``'s shard of ``full_sae`` (copies; ``full_sae`` is left alone)."""
        if not isinstance(full_sae, TopKTrainingSAE):
            raise TypeError(f"from_full needs a TopKTrainingSAE, got {type(full_sae).__name__}")
        shard = cls(copy.deepcopy(full_sae.cfg), rank, world_size, group)
        shard.to(device=full_sae.W_enc.device, dtype=full_sae.W_enc.dtype)
        lo, hi = shard.lo, shard.hi
        shard.W_enc.copy_(full_sae.W_enc[:, lo:hi])
        shard.b_enc.copy_(full_sae.b_enc[lo:hi])
        shard.W_dec.copy_(full_sae.W_dec[lo:hi])
        shard.b_dec.copy_(full_sae.b_dec)
        return shard

    @torch.no_grad()
    def gather_full(self) -> TopKTrainingSAE:
        """All ranks' shards gathered into an ordinary :class:`TopKTrainingSAE` (returned on
        every rank; every rank must call it). Needs the full SAE's memory on each rank."""
        full = TopKTrainingSAE(copy.deepcopy(self.cfg))
        full.to(device=self.W_enc.device, dtype=self.W_enc.dtype)
        g = self.group
        full.W_enc.copy_(torch.cat(_all_gather(self.W_enc.detach(), g, "gather W_enc"), dim=1))
        full.b_enc.copy_(torch.cat(_all_gather(self.b_enc.detach(), g, "gather b_enc"), dim=0))
        full.W_dec.copy_(torch.cat(_all_gather(self.W_dec.detach(), g, "gather W_dec"), dim=0))
        full.b_dec.copy_(self.b_dec)
        return full

    # ------------------------------------------------------------------ the step
    def _local_dead(self, dead_neuron_mask: Tensor | None) -> Tensor | None:
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

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """TopK's step (MSE + AuxK) on the shards; every rank must call it with the same
        ``sae_in`` and dead mask. ``output.code`` holds this rank's latents (shard-local
        ids, value-0 padding) and ``output.fired()`` is ``[d_sae_local]``; the global
        selection is ``self.last_global_indices [batch, k]``."""
        x = step_input.sae_in.to(self.W_enc.dtype)
        g = self.group
        b_dec_in = _ReplicatedInput.apply(self.b_dec, g, "b_dec encoder-gradient all_reduce")
        sae_in = x - b_dec_in if self.cfg.apply_b_dec_to_input else x
        dec_norm = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        with torch.no_grad():
            h = encoder_preacts(sae_in.detach(), self.W_enc.detach(), self.b_enc.detach())
            if dec_norm is not None:
                h = h * dec_norm.detach()
            pos, selected, global_ids = global_topk(h, self.cfg.k, self.lo, g, "topk candidates")
            raw = h.gather(-1, pos)
            values0 = torch.where(selected, raw.relu(), torch.zeros_like(raw))
            h_sel = raw / dec_norm.detach()[pos] if dec_norm is not None else None
        self.last_global_indices = global_ids
        values = _SelectedEncode.apply(
            sae_in, self.W_enc, self.b_enc, dec_norm, values0, pos, h_sel
        )
        code = SparseCode(values, pos)
        dec_values = (
            values
            if dec_norm is None
            else values * (1 / dec_norm).index_select(0, pos.reshape(-1)).view(pos.shape)
        )
        partial = ops.sparse_decode(SparseCode(dec_values, pos), self.W_dec)
        sae_out = _SumOverShards.apply(partial, g, "reconstruction all_reduce") + self.b_dec
        losses = {"mse_loss": (sae_out - x).pow(2).sum(dim=-1).mean()}
        losses["auxiliary_reconstruction_loss"] = self._auxk_loss(
            x, sae_in, sae_out, self._local_dead(step_input.dead_neuron_mask)
        )
        return TrainStepOutput(
            sae_in=x,
            sae_out=sae_out,
            loss=_total(losses),
            losses=losses,
            code=code,
            d_sae=self.d_sae_local,
        )

    def _auxk_loss(
        self, x: Tensor, sae_in: Tensor, sae_out: Tensor, dead_local: Tensor | None
    ) -> Tensor:
        """TopK's AuxK with the dead latents chosen globally (collectives on every rank)."""
        if dead_local is None:
            return sae_out.new_tensor(0.0)
        g = self.group
        dead = dead_local.nonzero().squeeze(1)
        counts = torch.tensor([dead.numel()], dtype=torch.int64, device=x.device)
        num_dead = int(_all_reduce(counts, g, "dead latent count all_reduce").item())
        if num_dead == 0:
            return sae_out.new_tensor(0.0)
        residual = (x - sae_out).detach()
        k_aux, scale = topk_aux_scale(num_dead, x.shape[-1])
        W_dec_dead = self.W_dec.index_select(0, dead)
        dec_norm = W_dec_dead.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        h_dead = sae_in @ self.W_enc.index_select(1, dead) + self.b_enc.index_select(0, dead)
        if dec_norm is not None:
            h_dead = h_dead * dec_norm
        # the selection only needs each rank's candidate positions (the returned global
        # ids are ``lo + column of the dead subset``, unused here)
        with torch.no_grad():
            pos, selected, _ = global_topk(h_dead.detach(), k_aux, self.lo, g, "AuxK candidates")
        if pos.shape[-1] == 0:
            recons = h_dead.new_zeros(x.shape)
        else:
            values = h_dead.gather(-1, pos) * selected
            acts = torch.zeros_like(h_dead).scatter(-1, pos, values)
            if dec_norm is not None:
                acts = acts * (1 / dec_norm)
            recons = acts @ W_dec_dead
        recons = _SumOverShards.apply(recons, g, "AuxK reconstruction all_reduce")
        loss = (recons - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * loss


# --------------------------------------------------------------------------- optimizer
@torch.no_grad()
def clip_grad_norm_sharded(sae: ShardedTopKTrainingSAE, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the *unsharded* parameters: the global
    L2 norm is ``sqrt(sum over ranks of the shards' squared norms + |grad b_dec|^2)``
    (``b_dec`` counted once: it is replicated). Scales every gradient in place by
    ``min(max_norm / (norm + 1e-6), 1)``, as torch does; returns the global norm."""
    shard_grads = [p.grad for p in sae.sharded_parameters() if p.grad is not None]
    rep_grads = [p.grad for p in sae.replicated_parameters() if p.grad is not None]
    device = sae.b_dec.device
    sq = torch.zeros(1, dtype=torch.float32, device=device)
    for grad in shard_grads:
        sq += grad.float().pow(2).sum()
    _all_reduce(sq, sae.group, "grad norm all_reduce")
    for grad in rep_grads:
        sq += grad.float().pow(2).sum()
    total = sq.sqrt()[0]
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in shard_grads + rep_grads:
        grad.mul_(coef.to(grad.dtype))
    return total
