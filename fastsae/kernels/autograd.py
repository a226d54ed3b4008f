"""``torch.autograd.Function`` wrappers around the Triton launchers."""

from __future__ import annotations

import torch

from .sparse_backward import gather_dot, group_by_latent, segment_rows_sum
from .sparse_decode import sparse_decode


class SparseDecodeFunction(torch.autograd.Function):
    """``out[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec`` with a sparse backward.

    Gradients: ``d_values[b, j] = <dOut[b], W_dec[idx[b, j]]>``; ``dW_dec`` summed per
    latent over its (token, slot) pairs (no atomics); ``db_dec = dOut.sum(0)``.
    """

    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec)
        ctx.has_bias = b_dec is not None
        return sparse_decode(values, indices, W_dec, b_dec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, indices, W_dec = ctx.saved_tensors
        need_values, _, need_w, need_b = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        d_values = gather_dot(grad_out, indices, W_dec, values.dtype) if need_values else None
        d_w = None
        if need_w:
            order, offsets = group_by_latent(indices, W_dec.shape[0], keep=values != 0)
            d_w = segment_rows_sum(order, offsets, values, grad_out, indices.shape[1], W_dec.dtype)
        d_b = grad_out.sum(0) if (need_b and ctx.has_bias) else None
        return d_values, None, d_w, d_b


class TopKEncodeFunction(torch.autograd.Function):
    """Encode + top-k with a backward that only touches the selected (token, latent)
    pairs: ``d_h[b, j] = d_values[b, j] * relu'(.) * dec_norm[idx]``, then
    ``dx = sum_j d_h[b, j] * W_enc[:, idx[b, j]]`` (a sparse decode through ``W_enc.T``),
    ``dW_enc[:, n] = sum over pairs of latent n of d_h * x[b]`` (grouped by latent, no
    atomics, written in W_enc's own layout), ``db_enc`` and ``d_dec_norm`` by index_add
    over the pairs. No ``[B, d_sae]`` tensor is formed.

    ``select(x, W_enc, b_enc, k, dec_norm, abs_select) -> (values, indices)`` picks the
    pairs: the fused Triton kernel by default; the dispatch layer may pass another
    selection with the same contract (``fastsae.torch_ops.topk_select_chunked``).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, dec_norm, k, abs_select, select=None):  # type: ignore[override]
        if select is None:
            from .topk_encode import topk_encode as select

        x_c = x.to(W_enc.dtype)
        values, indices = select(x_c, W_enc, b_enc, k, dec_norm, abs_select)
        h_sel = None
        if dec_norm is not None:
            # the selected pre-activations before the decoder-norm scale, for d dec_norm
            # (where a value is 0 its gradient is masked anyway; avoids 0/0)
            dn = dec_norm.float()[indices]
            h_sel = torch.where((values != 0) & (dn != 0), values.float() / dn, 0.0)
        ctx.save_for_backward(x_c, W_enc, b_enc, dec_norm, values, indices, h_sel)
        ctx.abs_select = abs_select
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, d_values, _d_indices):  # type: ignore[override]
        x, W_enc, b_enc, dec_norm, values, indices, h_sel = ctx.saved_tensors
        need_x, need_w, need_b, need_dn = ctx.needs_input_grad[:4]
        d_pre = d_values.float()
        if not ctx.abs_select:
            d_pre = d_pre * (values > 0)
        N = W_enc.shape[1]
        d_h = d_pre
        d_dn = None
        if dec_norm is not None:
            d_h = d_pre * dec_norm.float()[indices]
            if need_dn:
                d_dn = torch.zeros(N, dtype=torch.float32, device=x.device)
                d_dn.index_add_(0, indices.reshape(-1), (d_pre * h_sel).reshape(-1))
                d_dn = d_dn.to(dec_norm.dtype)
        d_x, d_w, d_b = _sparse_encoder_grads(
            x, W_enc, b_enc, indices, d_h, ctx.x_dtype, need_x, need_w, need_b
        )
        return d_x, d_w, d_b, d_dn, None, None, None


def _sparse_encoder_grads(x, W_enc, b_enc, indices, d_h, x_dtype, need_x, need_w, need_b):
    """Gradients of ``h = x @ W_enc + b_enc`` given ``d_h`` at the selected latents only.

    ``dx[b] = sum_j d_h[b, j] * W_enc[:, idx[b, j]]`` (a sparse decode through ``W_enc.T``),
    ``dW_enc[:, n] = sum over pairs of latent n of d_h * x[b]`` (grouped by latent, no
    atomics, written straight into W_enc's layout so that autograd keeps the tensor as
    the parameter's gradient instead of copying it), ``db_enc`` by index_add over the
    pairs.
    """
    N = W_enc.shape[1]
    d_x = sparse_decode(d_h, indices, W_enc.T, out_dtype=x_dtype) if need_x else None
    d_w = None
    if need_w:
        order, offsets = group_by_latent(indices, N, keep=d_h != 0)
        d_w = segment_rows_sum(
            order, offsets, d_h, x, indices.shape[1], W_enc.dtype, transposed=W_enc.is_contiguous()
        )
        if not W_enc.is_contiguous():
            d_w = d_w.T
    d_b = None
    if need_b:
        d_b = torch.zeros(N, dtype=torch.float32, device=x.device)
        d_b = d_b.index_add_(0, indices.reshape(-1), d_h.reshape(-1)).to(b_enc.dtype)
    return d_x, d_w, d_b


class JumpReLUEncodeFunction(torch.autograd.Function):
    """Fused encode + JumpReLU, dense ``[B, d_sae]`` or compacted to a padded code.

    ``threshold`` gets no gradient (the comparison is flat almost everywhere, as in
    SAELens's inference ``JumpReLUSAE``); x, W_enc and b_enc get the ReLU-gated
    gradient, through the sparse path when the output is a code.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, threshold, sparse):  # type: ignore[override]
        from .jumprelu_encode import jumprelu_encode_dense, jumprelu_encode_sparse

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
            d_x, d_w, d_b = _sparse_encoder_grads(
                x, W_enc, b_enc, indices, d_h, ctx.x_dtype, need_x, need_w, need_b
            )
            return d_x, d_w, d_b, None, None
        x, W_enc, b_enc, acts = ctx.saved_tensors
        d_h = grads[0] * (acts > 0)
        d_x = (d_h @ W_enc.T).to(ctx.x_dtype) if need_x else None
        d_w = (x.T @ d_h.to(x.dtype)).to(W_enc.dtype) if need_w else None
        d_b = d_h.sum(0).to(b_enc.dtype) if need_b else None
        return d_x, d_w, d_b, None, None
