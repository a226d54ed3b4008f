"""One gradient buffer per weight matrix in a sparse TopK-family training step.

The step uses ``W_enc`` and ``W_dec`` in several places: the sparse encoder and
decoder, the decoder row norms (``rescale_acts_by_decoder_norm``) and AuxK's copies of
the dead latents' columns and rows. Left to autograd, every use returns its own
``[d_in, d_sae]``-sized gradient, summed out of place (``index_select``'s backward
alone allocates two, the norm's three): four full-size tensors beyond the two
gradients at the backward's peak. At d_sae 1M x d_in 2304 fp32 each is 9 GiB, the
difference between fitting on an 80 GB GPU and not.

Here each matrix's uses come out of one autograd node (``step_weights``), whose
backward receives the gradients of all of them at once and folds the small ones (row
norms, dead slices) into the main gradient in place: one full-size gradient per
matrix, which autograd then keeps as the parameter's ``.grad`` (it has the
parameter's layout; the Triton dW_enc is written in it). Same numbers as the plain
uses, to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class StepWeights(NamedTuple):
    """The weights one step reads, all differentiable into the parameters.

    ``W_enc``/``W_dec``: the parameters' values (views through the merging node).
    ``dec_norm``: ``W_dec``'s row norms ``[d_sae]`` or None (no rescaling).
    ``dead``: sorted int64 ids of the dead latents, or None (no AuxK this step).
    ``W_enc_dead [d_in, n_dead]``/``W_dec_dead [n_dead, d_in]``: their copies, or None.
    """

    W_enc: Tensor
    W_dec: Tensor
    dec_norm: Tensor | None
    dead: Tensor | None = None
    W_enc_dead: Tensor | None = None
    W_dec_dead: Tensor | None = None


def step_weights(W_enc: Tensor, W_dec: Tensor, dead: Tensor | None, rescale: bool) -> StepWeights:
    """Route a step's uses of ``W_enc``/``W_dec`` through one gradient-merging node each.

    ``dead``: sorted int64 latent ids whose columns/rows AuxK reads, or None.
    Without autograd (no grad mode, or neither matrix requires grad) the plain tensors
    are used.
    """
    if not (torch.is_grad_enabled() and (W_enc.requires_grad or W_dec.requires_grad)):
        dec_norm = W_dec.norm(dim=-1) if rescale else None
        if dead is None:
            return StepWeights(W_enc, W_dec, dec_norm)
        return StepWeights(
            W_enc, W_dec, dec_norm, dead, W_enc.index_select(1, dead), W_dec.index_select(0, dead)
        )
    enc, enc_dead = _EncoderUses.apply(W_enc, dead)
    dec, dec_norm, dec_dead = _DecoderUses.apply(W_dec, dead, rescale)
    return StepWeights(enc, dec, dec_norm, dead, enc_dead, dec_dead)


def _owned(g: Tensor | None, like: Tensor) -> Tensor:
    """A gradient buffer this backward may add into: ``g`` itself when it is a fresh
    tensor in ``like``'s layout (what every consumer in the step returns), else a copy
    in that layout."""
    if g is None:
        return torch.zeros_like(like)
    if g._base is None and g.stride() == like.stride() and g.dtype == like.dtype:
        return g
    return torch.empty_like(like).copy_(g)


class _EncoderUses(torch.autograd.Function):
    """``W_enc -> (W_enc, W_enc[:, dead])``; backward: one ``[d_in, d_sae]`` gradient."""

    @staticmethod
    def forward(ctx, W_enc, dead):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(W_enc, dead)
        cols = W_enc.index_select(1, dead) if dead is not None else None
        return W_enc.view_as(W_enc), cols

    @staticmethod
    def backward(ctx, g, g_cols):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        W_enc, dead = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: stay out of place
            g = torch.zeros_like(W_enc) if g is None else g
            if g_cols is not None:
                g = g.index_add(1, dead, g_cols.to(g.dtype))
            return g, None
        g = _owned(g, W_enc)
        if g_cols is not None:
            g.index_add_(1, dead, g_cols.to(g.dtype))
        return g, None


class _DecoderUses(torch.autograd.Function):
    """``W_dec -> (W_dec, row norms or None, W_dec[dead] or None)``; backward: one
    ``[d_sae, d_in]`` gradient (the norms' ``W_dec / ||W_dec||`` term added in place)."""

    @staticmethod
    def forward(ctx, W_dec, dead, rescale):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        norm = W_dec.norm(dim=-1) if rescale else None
        rows = W_dec.index_select(0, dead) if dead is not None else None
        ctx.save_for_backward(W_dec, norm, dead)
        return W_dec.view_as(W_dec), norm, rows

    @staticmethod
    def backward(ctx, g, g_norm, g_rows):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        W_dec, norm, dead = ctx.saved_tensors
        scale = None
        if g_norm is not None:
            # d||w_n|| / d w_n = w_n / ||w_n|| (0 for a zero row, as torch's norm backward)
            scale = torch.where(norm == 0, 0.0, g_norm / norm).to(W_dec.dtype).unsqueeze(1)
        if torch.is_grad_enabled():  # create_graph: stay out of place
            g = torch.zeros_like(W_dec) if g is None else g
            if scale is not None:
                g = g + W_dec * scale
            if g_rows is not None:
                g = g.index_add(0, dead, g_rows.to(g.dtype))
            return g, None, None
        g = _owned(g, W_dec)
        if scale is not None:
            g.addcmul_(W_dec, scale)
        if g_rows is not None:
            g.index_add_(0, dead, g_rows.to(g.dtype))
        return g, None, None
