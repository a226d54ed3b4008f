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

Backward and optimizer: see :mod:`fastsae.training.latent_sharding.base` (identity
backward of the reconstruction sum; ``b_dec``'s encoder gradient summed over ranks;
one global clipping factor).

Communication per step (fp32): candidates ``2 * W * batch * k`` values+ids gathered,
the ``[batch, d_in]`` reconstruction all-reduced (twice with AuxK) and ``d_in`` for
``b_dec``'s encoder gradient; nothing of size ``d_sae``.

Saving: :meth:`ShardedTopKTrainingSAE.gather_full` gathers the shards into an
ordinary :class:`TopKTrainingSAE` (on every rank, or one rank's host memory), whose ``save_model`` /
``save_inference_model`` write the normal single-file SAELens directory; a saved
directory loads into a sharded run with ``from_full(TopKTrainingSAE.load_from_disk(p),
rank, world)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae import ops
from fastsae.sparse_autograd import TORCH_BACKEND, TRITON_BACKEND, TopKEncodeFunction
from fastsae.sparse_code import SparseCode
from fastsae.torch_ops import encoder_preacts
from fastsae.training.latent_sharding.base import (
    ShardedTrainingSAE,
    all_gather,
    all_reduce,
    group_rank_and_world,
    sum_over_shards,
)
from fastsae.training.losses import topk_aux_scale
from fastsae.training.saes.base import TrainStepInput, TrainStepOutput, total_loss
from fastsae.training.saes.step_weights import StepWeights, step_weights
from fastsae.training.saes.topk import TopKTrainingSAE, TopKTrainingSAEConfig


def global_topk(
    h_local: Tensor,
    k: int,
    offset: int,
    group=None,
    what: str = "topk candidates",
    d_sae: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact global top-k of a row-sharded ``[B, n_local]`` score matrix (no grad).

    Returns ``(local_positions [B, k'], selected [B, k'] bool, global_ids [B, k])`` where
    ``k' = min(k, n_local)`` are this rank's candidate columns and ``selected`` marks those
    in the global top-k. ``global_ids`` (sorted by value, descending) is the global
    selection, the same on every rank. Every rank must call it (it all-gathers).
    """
    k_local = min(k, h_local.shape[-1])
    vals, pos = torch.topk(h_local, k_local, dim=-1, sorted=False)
    selected, global_ids = merge_candidates(vals, pos, k, offset, group, what, d_sae)
    return pos, selected, global_ids


def merge_candidates(
    vals: Tensor,
    pos: Tensor,
    k: int,
    offset: int,
    group=None,
    what: str = "topk candidates",
    d_sae: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The global top-k of every rank's local candidates ``vals``/``pos [B, k']``
    (``k' <= k``; ``pos`` local columns, ``offset`` this rank's first latent).

    Returns ``(selected [B, k'] bool, global_ids [B, k])``: which of this rank's
    candidates are chosen, and the chosen global ids (descending by value, the same on
    every rank). Every rank must call it (it all-gathers ``[B, k]`` values and ids; the
    ids as int32 when the global width ``d_sae`` is given and below 2^31).
    """
    batch, k_local = vals.shape
    # int32 ids halve the id traffic; int64 only past 2^31 latents (the same on every rank)
    id_dtype = torch.int32 if d_sae is not None and d_sae < 2**31 else torch.int64
    cand_vals = vals.new_full((batch, k), float("-inf"))
    cand_ids = torch.full((batch, k), -1, dtype=id_dtype, device=vals.device)
    cand_vals[:, :k_local] = vals
    cand_ids[:, :k_local] = pos + offset
    all_vals = torch.cat(all_gather(cand_vals, group, what + " (values)"), dim=-1)
    all_ids = torch.cat(all_gather(cand_ids, group, what + " (ids)"), dim=-1).long()
    _, top_pos = torch.topk(all_vals, k, dim=-1, sorted=True)
    global_ids = all_ids.gather(-1, top_pos)
    rank = group_rank_and_world(group)[0]
    mine = top_pos[:, :, None] == (rank * k + torch.arange(k_local, device=vals.device))
    selected = mine.any(dim=1)  # [B, k_local]: candidate j of this rank was chosen
    return selected, global_ids


# --------------------------------------------------------------------------- the module
class ShardedTopKTrainingSAE(ShardedTrainingSAE):
    """This rank's shard of a :class:`TopKTrainingSAE` (see
    :class:`~fastsae.training.latent_sharding.base.ShardedTrainingSAE`);
    ``apply_b_dec_to_input`` and ``rescale_acts_by_decoder_norm`` either way."""

    full_class = TopKTrainingSAE
    cfg: TopKTrainingSAEConfig

    def __init__(self, cfg: TopKTrainingSAEConfig, rank: int, world_size: int, group=None) -> None:
        super().__init__(cfg, rank, world_size, group)
        self.last_global_indices: Tensor | None = None

    # ------------------------------------------------------------------ the step
    def _select(self, sae_in: Tensor, dn: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's candidates and which the global selection keeps (no grad):
        ``(pos [B, K'] local columns, raw [B, K'] pre-activations (times the decoder
        norm), selected [B, K'] bool)``; sets ``last_global_indices``."""
        k, g = self.cfg.k, self.group
        k_local = min(k, self.d_sae_local)
        w_enc, b_enc = self.W_enc.detach(), self.b_enc.detach()
        if ops.topk_encode_is_fused(sae_in, w_enc, b_enc, k_local):
            # the fused kernel: local candidates without a [batch, d_sae_local] tensor.
            # Its values are ReLU'd: a row with fewer than k positive pre-activations
            # may pick other zero-valued latents than torch.topk would, which changes
            # neither the output, the gradients nor the firing counts (all value 0)
            local = ops.topk_encode(sae_in, w_enc, b_enc, k_local, dec_norm=dn)
            pos, raw = local.indices.long(), local.values
            selected, global_ids = merge_candidates(
                raw, pos, k, self.lo, g, "topk candidates", self.cfg.d_sae
            )
        else:
            h = encoder_preacts(sae_in, w_enc, b_enc)
            if dn is not None:
                h = h * dn
            pos, selected, global_ids = global_topk(
                h, k, self.lo, g, "topk candidates", self.cfg.d_sae
            )
            raw = h.gather(-1, pos)
        self.last_global_indices = global_ids
        return pos, raw, selected

    def _selected_code(
        self,
        sae_in: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        k: int,
        dn: Tensor | None,
        abs_select: bool,
    ) -> SparseCode:
        """``TopKEncodeFunction``'s selection (no grad; every rank must call it): this
        rank's candidates (``_select``), value 0 where the global top-k does not keep
        them. ``W_enc``, ``b_enc`` and ``k`` are this module's, which ``_select`` reads
        itself; TopK has no ``abs_select``."""
        pos, raw, selected = self._select(sae_in, dn)
        return SparseCode(torch.where(selected, raw.relu(), torch.zeros_like(raw)), pos)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """TopK's step (MSE + AuxK) on the shards; every rank must call it with the same
        ``sae_in`` and dead mask. ``output.code`` holds this rank's latents (shard-local
        ids, value-0 padding) and ``output.fired()`` is ``[d_sae_local]``; the global
        selection is ``self.last_global_indices [batch, k]``."""
        x = step_input.sae_in.to(self.W_enc.dtype)
        g = self.group
        sae_in = self._encoder_input(x)
        dead_local = self._local_dead(step_input.dead_neuron_mask)
        # one gradient buffer per weight shard (step_weights.py), AuxK's dead slices too
        weights = step_weights(
            self.W_enc,
            self.W_dec,
            dead_local.nonzero().squeeze(1) if dead_local is not None else None,
            self.cfg.rescale_acts_by_decoder_norm,
        )
        dec_norm = weights.dec_norm
        # TopK's encode Function with the global selection; its sparse backward runs
        # the Triton kernels where impl="auto" would (CUDA), else torch's primitives
        backend = TRITON_BACKEND if ops.auto_uses_triton(sae_in, self.W_enc) else TORCH_BACKEND
        values, pos = TopKEncodeFunction.apply(
            sae_in, weights.W_enc, self.b_enc, dec_norm, self.cfg.k, False,
            self._selected_code, backend,
        )  # fmt: skip
        code = SparseCode(values, pos)
        dec_values = (
            values
            if dec_norm is None
            else values * (1 / dec_norm).index_select(0, pos.reshape(-1)).view(pos.shape)
        )
        partial = ops.sparse_decode(SparseCode(dec_values, pos), weights.W_dec)
        sae_out = sum_over_shards(partial, g, "reconstruction all_reduce") + self.b_dec
        losses = {"mse_loss": (sae_out - x).pow(2).sum(dim=-1).mean()}
        losses["auxiliary_reconstruction_loss"] = self._auxk_loss(x, sae_in, sae_out, weights)
        return TrainStepOutput(
            sae_in=x,
            sae_out=sae_out,
            loss=total_loss(losses),
            losses=losses,
            code=code,
            d_sae=self.d_sae_local,
        )

    def _auxk_loss(
        self, x: Tensor, sae_in: Tensor, sae_out: Tensor, weights: StepWeights
    ) -> Tensor:
        """TopK's AuxK with the dead latents chosen globally (collectives on every rank).
        ``weights``: the step's weights with this shard's dead columns/rows (``dead`` is
        None when the step has no dead mask, empty when this shard has no dead latent)."""
        if weights.dead is None:
            return sae_out.new_tensor(0.0)
        g = self.group
        dead = weights.dead
        counts = torch.tensor([dead.numel()], dtype=torch.int64, device=x.device)
        num_dead = int(all_reduce(counts, g, "dead latent count all_reduce").item())
        if num_dead == 0:
            return sae_out.new_tensor(0.0)
        residual = (x - sae_out).detach()
        k_aux, scale = topk_aux_scale(num_dead, x.shape[-1])
        W_enc_dead, W_dec_dead = weights.W_enc_dead, weights.W_dec_dead
        dec_norm = W_dec_dead.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        h_dead = sae_in @ W_enc_dead + self.b_enc.index_select(0, dead)
        if dec_norm is not None:
            h_dead = h_dead * dec_norm
        # the selection only needs each rank's candidate positions (the returned global
        # ids are ``lo + column of the dead subset``, unused here)
        with torch.no_grad():
            pos, selected, _ = global_topk(
                h_dead.detach(), k_aux, self.lo, g, "AuxK candidates", self.cfg.d_sae
            )
        if pos.shape[-1] == 0:
            recons = h_dead.new_zeros(x.shape)
        else:
            values = h_dead.gather(-1, pos) * selected
            acts = torch.zeros_like(h_dead).scatter(-1, pos, values)
            if dec_norm is not None:
                acts = acts * (1 / dec_norm)
            recons = acts @ W_dec_dead
        recons = sum_over_shards(recons, g, "AuxK reconstruction all_reduce")
        loss = (recons - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * loss
