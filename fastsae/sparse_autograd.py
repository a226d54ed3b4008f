"""The sparse encoders' autograd, written once for every path.

``TopKEncodeFunction`` is the TopK encode of the torch path (``torch_ops.topk_encode``),
the Triton paths (``ops.topk_encode``'s fused and chunked selections,
``ops.batch_topk_encode``) and latent sharding (a global top-k over the ranks). Two
things vary, and are arguments:

- the selection ``select(x, W_enc, b_enc, k, dec_norm, abs_select) -> (values,
  indices)`` (no grad): the fused Triton kernel, ``torch_ops.topk_select_chunked``,
  ``torch_ops.batch_topk_select_chunked``, ``torch_ops.topk_select_dense`` or a
  sharded module's global top-k;
- the backend (a :class:`SparseBackend`: ``fastsae.torch_ops.TORCH_BACKEND`` or this
  module's ``TRITON_BACKEND``): the sparse primitives its backward runs, under the same
  names in ``fastsae.torch_ops`` and the Triton launchers of ``fastsae.kernels``.

``sparse_encoder_grads`` (the gradients of ``x @ W_enc + b_enc`` at the selected pairs
only) is shared with the sparse JumpReLU encode. This module imports no Triton:
``TRITON_BACKEND`` imports the kernels when a primitive first runs, so ``import
fastsae`` works without Triton.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor


class SparseBackend(abc.ABC):
    """The sparse primitives of a sparse code's backward, in one implementation.

    - ``gather_weighted_sum(weights, indices, rows, out_dtype)``:
      ``out[b] = sum_j weights[b, j] * rows[indices[b, j]]`` ``[B, D]`` (``rows`` any
      strides: ``dx`` through ``W_enc.T``);
    - ``gather_dot(G, indices, rows, out_dtype)``: ``out[b, j] = <G[b],
      rows[indices[b, j]]>`` ``[B, K]``;
    - ``segment_rows_sum(weights, indices, X, n_rows, out_dtype, transposed=False)``:
      ``out[n] = sum over (b, j) with indices[b, j] == n of weights[b, j] * X[b]``
      ``[n_rows, D]``; ``transposed=True`` gives the sums as ``[D, n_rows]`` (``dW_enc``);
      pairs with weight 0 add nothing;
    - ``index_add(indices, src, like)``: ``out[n] = sum of src[b, j] over indices[b, j]
      == n``, ``like``'s shape and dtype (``db_enc``, ``d dec_norm``).

    ``float32_grads``: the encoders' gradient ``d_h`` at the selected pairs is formed,
    and ``index_add`` accumulates, in fp32 (the kernels' way) rather than in the
    gradients' own dtype (the torch path's).
    """

    name = ""
    float32_grads = False

    @abc.abstractmethod
    def gather_weighted_sum(
        self, weights: Tensor, indices: Tensor, rows: Tensor, out_dtype: torch.dtype
    ) -> Tensor: ...

    @abc.abstractmethod
    def gather_dot(
        self, G: Tensor, indices: Tensor, rows: Tensor, out_dtype: torch.dtype
    ) -> Tensor: ...

    @abc.abstractmethod
    def segment_rows_sum(
        self,
        weights: Tensor,
        indices: Tensor,
        X: Tensor,
        n_rows: int,
        out_dtype: torch.dtype,
        *,
        transposed: bool = False,
    ) -> Tensor: ...

    def index_add(self, indices: Tensor, src: Tensor, like: Tensor) -> Tensor:
        acc = torch.float32 if self.float32_grads else like.dtype
        out = torch.zeros(like.shape[0], dtype=acc, device=like.device)
        return out.index_add_(0, indices.reshape(-1), src.reshape(-1).to(acc)).to(like.dtype)


class _TritonBackend(SparseBackend):
    """The Triton launchers of ``fastsae.kernels`` (imported on first use): fp32
    accumulation, no atomics; ``segment_rows_sum`` groups the pairs by latent first
    and writes a transposed result straight in ``[D, n_rows]`` row-major layout."""

    name = "triton"
    float32_grads = True

    def gather_weighted_sum(self, weights, indices, rows, out_dtype):
        # optional dependency: triton
        from fastsae.kernels.sparse_decode import gather_weighted_sum

        return gather_weighted_sum(weights, indices, rows, out_dtype=out_dtype)

    def gather_dot(self, G, indices, rows, out_dtype):
        from fastsae.kernels.sparse_backward import gather_dot  # optional dependency: triton

        return gather_dot(G, indices, rows, out_dtype)

    def segment_rows_sum(self, weights, indices, X, n_rows, out_dtype, *, transposed=False):
        # optional dependency: triton
        from fastsae.kernels.sparse_backward import group_by_latent, segment_rows_sum

        order, offsets = group_by_latent(indices, n_rows, keep=weights != 0)
        K = indices.shape[1]
        return segment_rows_sum(order, offsets, weights, X, K, out_dtype, transposed=transposed)


TRITON_BACKEND: SparseBackend = _TritonBackend()


def sparse_encoder_grads(
    backend: SparseBackend,
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    indices: Tensor,
    d_h: Tensor,
    x_dtype: torch.dtype,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dW_enc, db_enc)`` of ``h = x @ W_enc + b_enc`` given ``d_h [B, K]``
    at the selected latents ``indices [B, K]`` only (no ``[B, d_sae]`` tensor).

    ``dx[b] = sum_j d_h[b, j] * W_enc[:, idx[b, j]]`` (``gather_weighted_sum`` through
    ``W_enc.T``, in ``x_dtype``); ``dW_enc[:, n] = sum over the pairs of latent n of
    d_h * x[b]`` (``segment_rows_sum``, transposed: the Triton backend writes it in
    W_enc's own layout, so that autograd keeps the tensor as the parameter's gradient
    instead of copying it); ``db_enc`` by ``index_add`` over the pairs.
    """
    N = W_enc.shape[1]
    d_x = backend.gather_weighted_sum(d_h, indices, W_enc.T, x_dtype) if need_x else None
    d_w = None
    if need_w:
        if W_enc.is_contiguous():
            d_w = backend.segment_rows_sum(d_h, indices, x, N, W_enc.dtype, transposed=True)
        else:
            d_w = backend.segment_rows_sum(d_h, indices, x, N, W_enc.dtype).T
    d_b = backend.index_add(indices, d_h, b_enc) if need_b and b_enc is not None else None
    return d_x, d_w, d_b


class TopKEncodeFunction(torch.autograd.Function):
    """Encode + top-k with a backward that only touches the selected (token, latent)
    pairs: ``d_h[b, j] = d_values[b, j] * relu'(.) * dec_norm[idx]``, then
    ``sparse_encoder_grads`` (``dx``, ``dW_enc``, ``db_enc``) and ``d dec_norm`` by
    ``index_add`` over the pairs. No ``[B, d_sae]`` tensor is formed in the backward.

    ``apply(x, W_enc, b_enc, dec_norm, k, abs_select, select, backend) -> (values,
    indices)``: ``select`` picks the pairs (see the module docstring: values ReLU'd
    unless ``abs_select``, value-0 entries are padding and get no gradient), on ``x``
    cast to W_enc's dtype; ``backend`` (``TORCH_BACKEND``/``TRITON_BACKEND``) runs the
    backward's sparse primitives.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, dec_norm, k, abs_select, select, backend):  # type: ignore[override]
        x_c = x.to(W_enc.dtype)
        values, indices = select(x_c, W_enc, b_enc, k, dec_norm, abs_select)
        h_sel = None
        if dec_norm is not None:
            # the selected pre-activations before the decoder-norm scale, for d dec_norm
            # (where a value is 0 its gradient is masked anyway; avoids 0/0)
            dtype = torch.promote_types(values.dtype, dec_norm.dtype)
            if backend.float32_grads:
                dtype = torch.float32
            dn = dec_norm.to(dtype)[indices]
            h_sel = torch.where((values != 0) & (dn != 0), values.to(dtype) / dn, 0.0)
        ctx.save_for_backward(x_c, W_enc, b_enc, dec_norm, values, indices, h_sel)
        ctx.abs_select = abs_select
        ctx.x_dtype = x.dtype
        ctx.backend = backend
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, d_values, _d_indices):  # type: ignore[override]
        x, W_enc, b_enc, dec_norm, values, indices, h_sel = ctx.saved_tensors
        need_x, need_w, need_b, need_dn = ctx.needs_input_grad[:4]
        backend: SparseBackend = ctx.backend
        d_pre = d_values.float() if backend.float32_grads else d_values
        if not ctx.abs_select:
            d_pre = d_pre * (values > 0)
        d_h, d_dn = d_pre, None
        if dec_norm is not None:
            dn = dec_norm.float() if backend.float32_grads else dec_norm
            d_h = d_pre * dn[indices]
            if need_dn:
                d_dn = backend.index_add(indices, d_pre * h_sel, dec_norm)
        d_x, d_w, d_b = sparse_encoder_grads(
            backend, x, W_enc, b_enc, indices, d_h, ctx.x_dtype, need_x, need_w, need_b
        )
        return d_x, d_w, d_b, d_dn, None, None, None, None
