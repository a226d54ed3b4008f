"""Sparse decode: ``gather_weighted_sum``, ``out[b] = sum_j vals[b, j] * W[idx[b, j]]
(+ bias)`` (its torch twin is ``fastsae.torch_ops.gather_weighted_sum``).

One program per (token, BLOCK_D slice of the output): it gathers the token's K
decoder rows BLOCK_K at a time and accumulates in fp32, so the work and traffic
are B*K*d_out instead of the dense decoder's B*d_sae*d_out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_size, check_dtype, check_index_dtype, check_same_device


@triton.jit
def _sparse_decode_kernel(
    vals_ptr,  # [B, K] activations
    idx_ptr,  # [B, K] int32/int64 latent ids
    w_ptr,  # [N, D] rows to gather (any strides)
    bias_ptr,  # [D] or dummy when HAS_BIAS is False
    out_ptr,  # [B, D] output
    K,
    D,
    stride_wn,
    stride_wd,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + row * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        val = tl.load(vals_ptr + row * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None] * stride_wn + offs_d[None, :].to(tl.int64) * stride_wd,
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(val[:, None] * w, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


def gather_weighted_sum(
    values: torch.Tensor,
    indices: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``values [B, K]``, ``indices [B, K]``, ``W [N, D]`` (any strides), ``bias [D]``
    -> ``[B, D]`` in ``out_dtype`` (default: promoted dtype of values and W)."""
    check_dtype("values", values)
    check_dtype("W", W)
    check_index_dtype("indices", indices)
    if bias is not None:
        check_dtype("bias", bias)
    check_same_device(values=values, indices=indices, W=W, bias=bias)
    if values.ndim != 2 or values.shape != indices.shape or W.ndim != 2:
        raise ValueError(
            f"gather_weighted_sum: values/indices must be [B, K] and W [N, D]; got "
            f"{tuple(values.shape)}, {tuple(indices.shape)}, {tuple(W.shape)}"
        )
    B, K = values.shape
    D = W.shape[1]
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"gather_weighted_sum: bias must be [{D}], got {tuple(bias.shape)}")
    values, indices = values.contiguous(), indices.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out_dtype = out_dtype or torch.promote_types(values.dtype, W.dtype)
    out = torch.empty(B, D, dtype=out_dtype, device=values.device)
    if B == 0 or D == 0:
        return out
    BLOCK_D = block_size(D, 16, 128)
    BLOCK_K = block_size(K, 1, 16)
    grid = (B, triton.cdiv(D, BLOCK_D))
    _sparse_decode_kernel[grid](
        values,
        indices,
        W,
        bias if bias is not None else values,
        out,
        K,
        D,
        W.stride(0),
        W.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_K=BLOCK_K,
        BLOCK_D=BLOCK_D,
    )
    return out
