"""Backward kernels of a sparse code, all without atomics.

- ``gather_dot``: ``out[b, j] = <G[b], W[idx[b, j]]>`` (the gradient of the code's
  values, given the gradient ``G`` of the decoder output).
- ``segment_rows_sum``: ``out[n] = sum over (b, j) with idx[b, j] == n of
  weight[b, j] * X[b]`` -- dW_dec (weights = values, X = dOut) and, transposed,
  dW_enc (weights = dPreact, X = x). The (b, j) pairs are grouped by latent first
  (``group_by_latent``), then one program per (latent, BLOCK_D slice) sums its
  pairs: each output row is written once, popular latents cost a longer loop
  instead of serialised atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_size, check_dtype, check_index_dtype, check_same_device


@triton.jit
def _gather_dot_kernel(
    g_ptr,  # [B, D] gradient rows
    idx_ptr,  # [B, K] latent ids
    w_ptr,  # [N, D] rows (any strides)
    out_ptr,  # [B, K] output
    K,
    D,
    stride_wn,
    stride_wd,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(idx_ptr + row * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(g_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None] * stride_wn + offs_d[None, :].to(tl.int64) * stride_wd,
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + row * K + offs_k, acc.to(out_ptr.dtype.element_ty), mask=mask_k)


def gather_dot(
    G: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``G [B, D]``, ``indices [B, K]``, ``W [N, D]`` -> ``[B, K]`` of ``<G[b], W[idx[b, j]]>``."""
    check_dtype("G", G)
    check_dtype("W", W)
    check_index_dtype("indices", indices)
    check_same_device(G=G, indices=indices, W=W)
    B, K = indices.shape
    D = W.shape[1]
    if G.shape != (B, D):
        raise ValueError(f"gather_dot: G must be [{B}, {D}], got {tuple(G.shape)}")
    G, indices = G.contiguous(), indices.contiguous()
    out = torch.empty(B, K, dtype=out_dtype, device=G.device)
    if B == 0 or K == 0:
        return out
    BLOCK_K = block_size(K, 1, 32)
    BLOCK_D = block_size(D, 16, 128)
    grid = (B, triton.cdiv(K, BLOCK_K))
    _gather_dot_kernel[grid](
        G, indices, W, out, K, D, W.stride(0), W.stride(1), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D
    )
    return out


@triton.jit
def _segment_rows_sum_kernel(
    order_ptr,  # [B*K] int64 pair ids (b*K + j) sorted by latent
    offsets_ptr,  # [N+1] int64 start of each latent's pairs in order
    weight_ptr,  # [B*K] per-pair weight
    x_ptr,  # [B, D] rows to sum
    out_ptr,  # [N, D] output (any strides: [D, N] row-major for dW_enc)
    K,
    D,
    stride_on,
    stride_od,
    SKIP_EMPTY: tl.constexpr,  # out is zero-filled: latents without pairs store nothing
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + latent)
    end = tl.load(offsets_ptr + latent + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        pair = tl.load(order_ptr + offs_t, mask=mask_t, other=0)
        wgt = tl.load(weight_ptr + pair, mask=mask_t, other=0.0).to(tl.float32)
        token = pair // K
        x = tl.load(
            x_ptr + token[:, None] * D + offs_d[None, :],
            mask=mask_t[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(wgt[:, None] * x, axis=0)
    mask_out = mask_d
    if SKIP_EMPTY:
        # (a block-shaped comparison: the interpreter rejects a scalar & block mask)
        mask_out = mask_d & ((offs_d * 0 + end) > start)
    tl.store(
        out_ptr + latent * stride_on + offs_d.to(tl.int64) * stride_od,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_out,
    )


def group_by_latent(
    indices: torch.Tensor, n_latents: int, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``indices [B, K]`` -> (``order [B*K]`` pair ids sorted by latent, ``offsets [N+1]``).

    Pairs where ``keep`` is False (padding, zero weights) are sorted past the last
    latent and never visited, so a padded code's filler latent is no hot spot.
    """
    flat = indices.reshape(-1).long()
    if keep is not None:
        flat = torch.where(keep.reshape(-1), flat, n_latents)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_latents + 1)[:n_latents]
    offsets = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def segment_rows_sum(
    order: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    X: torch.Tensor,
    K: int,
    out_dtype: torch.dtype,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """``out [N, D]``: for each latent n, ``sum weights[p] * X[p // K]`` over its pairs p.

    ``transposed=True`` returns the same sums as a row-major ``[D, N]`` tensor (dW_enc,
    whose parameter is ``[d_in, d_sae]``): written in that layout directly, so the
    gradient needs no transposing copy (at d_sae 1M x d_in 2304 that copy is 9 GiB).
    It is zero-filled first and only latents with pairs are written.
    """
    check_dtype("weights", weights)
    check_dtype("X", X)
    check_same_device(order=order, offsets=offsets, weights=weights, X=X)
    N = offsets.numel() - 1
    D = X.shape[1]
    X, weights = X.contiguous(), weights.contiguous().reshape(-1)
    if transposed:
        result = torch.zeros(D, N, dtype=out_dtype, device=X.device)
        out = result.T
    else:
        result = out = torch.empty(N, D, dtype=out_dtype, device=X.device)
    if N == 0 or D == 0:
        return result
    BLOCK_D = block_size(D, 16, 128)
    grid = (N, triton.cdiv(D, BLOCK_D))
    _segment_rows_sum_kernel[grid](
        order,
        offsets,
        weights,
        X,
        out,
        K,
        D,
        out.stride(0),
        out.stride(1),
        SKIP_EMPTY=transposed,
        BLOCK_T=16,
        BLOCK_D=BLOCK_D,
    )
    return result
