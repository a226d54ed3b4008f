"""``torch.autograd.Function`` wrappers around the Triton launchers: the sparse decode
and the JumpReLU encode. The TopK encode's Function, shared with the torch path and
latent sharding, is ``fastsae.sparse_autograd.TopKEncodeFunction``; these backwards
run the same ``TRITON_BACKEND`` primitives."""

from __future__ import annotations

import torch

from fastsae.sparse_autograd import TRITON_BACKEND, sparse_encoder_grads

from .jumprelu_encode import jumprelu_encode_dense, jumprelu_encode_sparse
from .sparse_decode import gather_weighted_sum


class SparseDecodeFunction(torch.autograd.Function):
    """``out[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec`` with a sparse backward.

    Gradients: ``d_values[b, j] = <dOut[b], W_dec[idx[b, j]]>``; ``dW_dec`` summed per
    latent over its (token, slot) pairs (no atomics); ``db_dec = dOut.sum(0)``.
    """

    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec)
        ctx.has_bias = b_dec is not None
        return gather_weighted_sum(values, indices, W_dec, b_dec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, indices, W_dec = ctx.saved_tensors
        need_values, _, need_w, need_b = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        d_values = None
        if need_values:
            d_values = TRITON_BACKEND.gather_dot(grad_out, indices, W_dec, values.dtype)
        d_w = None
        if need_w:
            d_w = TRITON_BACKEND.segment_rows_sum(
                values, indices, grad_out, W_dec.shape[0], W_dec.dtype
            )
        d_b = grad_out.sum(0) if (need_b and ctx.has_bias) else None
        return d_values, None, d_w, d_b


class JumpReLUEncodeFunction(torch.autograd.Function):
    """Fused encode + JumpReLU, dense ``[B, d_sae]`` or compacted to a padded code.

    ``threshold`` gets no gradient (the comparison is flat almost everywhere, as in
    SAELens's inference ``JumpReLUSAE``); x, W_enc and b_enc get the ReLU-gated
    gradient, through the sparse path (``sparse_encoder_grads``) when the output is a
    code.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, threshold, sparse):  # type: ignore[override]
        x_c = x.to(W_enc.dtype)
        ctx.x_dtype = x.dtype
        ctx.sparse = sparse
        if sparse:
            values, indices = jumprelu_encode_sparse(x_c, W_enc, b_enc, threshold)
            ctx.save_for_backward(x_c, W_enc, b_enc, values, indices)
            ctx.mark_non_differentiable(indices)
            return values, indices
        acts = jumprelu_encode_dense(x_c, W_enc, b_enc, threshold)
        ctx.save_for_backward(x_c, W_enc, b_enc, acts)
        return acts

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.sparse:
            x, W_enc, b_enc, values, indices = ctx.saved_tensors
            d_h = grads[0].float() * (values > 0)
            d_x, d_w, d_b = sparse_encoder_grads(
                TRITON_BACKEND, x, W_enc, b_enc, indices, d_h, ctx.x_dtype, need_x, need_w, need_b
            )
            return d_x, d_w, d_b, None, None
        x, W_enc, b_enc, acts = ctx.saved_tensors
        d_h = grads[0] * (acts > 0)
        d_x = (d_h @ W_enc.T).to(ctx.x_dtype) if need_x else None
        d_w = (x.T @ d_h.to(x.dtype)).to(W_enc.dtype) if need_w else None
        d_b = d_h.sum(0).to(b_enc.dtype) if need_b else None
        return d_x, d_w, d_b, None, None
