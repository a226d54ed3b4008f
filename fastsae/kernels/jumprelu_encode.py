"""Fused encoder + JumpReLU: ``relu(h) * (h > threshold)`` with ``h = x @ W_enc + b_enc``.

Two kernels share the tile maths:
- dense: one program per (BLOCK_B rows, BLOCK_N latents) tile, writes ``[B, N]``;
- sparse: one program per BLOCK_B rows walks every latent tile and appends the
  active (value, latent) pairs of each row to its slots in ``[B, CAP]`` buffers
  (positions from a prefix sum over the tile's mask). The true per-row counts are
  written too; when a row overflows CAP the launcher runs again with CAP = the
  largest count, so the result is exact either way. No ``[B, N]`` tensor is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_same_device, encoder_tile


@triton.jit
def _jumprelu_tile(
    x_ptr, w_ptr, b_ptr, t_ptr, offs_b, mask_b, offs_n, mask_n, D, stride_wd, stride_wn,
    IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """fp32 JumpReLU activations of one [BLOCK_B, BLOCK_N] tile, and its active mask."""
    h = encoder_tile(
        x_ptr, w_ptr, b_ptr, offs_b, mask_b, offs_n, mask_n, D, stride_wd, stride_wn,
        IEEE, UPCAST_DOT, BLOCK_B, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    thr = tl.load(t_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    active = (h > thr) & (h > 0) & mask_n[None, :] & mask_b[:, None]
    return tl.where(active, h, 0.0), active


@triton.jit
def _jumprelu_dense_kernel(
    x_ptr,  # [B, D]
    w_ptr,  # [D, N] (any strides)
    b_ptr,  # [N]
    t_ptr,  # [N] threshold
    out_ptr,  # [B, N]
    B,
    D,
    N,
    stride_wd,
    stride_wn,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_b = offs_b < B
    mask_n = offs_n < N
    acts, _ = _jumprelu_tile(
        x_ptr, w_ptr, b_ptr, t_ptr, offs_b, mask_b, offs_n, mask_n, D, stride_wd, stride_wn,
        IEEE, UPCAST_DOT, BLOCK_B, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    tl.store(
        out_ptr + offs_b[:, None] * N + offs_n[None, :],
        acts.to(out_ptr.dtype.element_ty),
        mask=mask_b[:, None] & mask_n[None, :],
    )


@triton.jit
def _jumprelu_sparse_kernel(
    x_ptr,  # [B, D]
    w_ptr,  # [D, N] (any strides)
    b_ptr,  # [N]
    t_ptr,  # [N] threshold
    vals_ptr,  # [B, CAP] values, zero-filled by the launcher
    idx_ptr,  # [B, CAP] int64 latents, zero-filled by the launcher
    count_ptr,  # [B] int32 true number of active latents per row
    B,
    D,
    N,
    CAP,
    stride_wd,
    stride_wn,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mask_b = offs_b < B
    count = tl.zeros([BLOCK_B], dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acts, active = _jumprelu_tile(
            x_ptr, w_ptr, b_ptr, t_ptr, offs_b, mask_b, offs_n, mask_n, D, stride_wd,
            stride_wn, IEEE, UPCAST_DOT, BLOCK_B, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        flag = active.to(tl.int32)
        slot = count[:, None] + tl.cumsum(flag, axis=1) - 1  # this pair's slot in its row
        keep = active & (slot < CAP)
        dst = offs_b[:, None] * CAP + slot.to(tl.int64)
        tl.store(vals_ptr + dst, acts.to(vals_ptr.dtype.element_ty), mask=keep)
        tl.store(idx_ptr + dst, offs_n[None, :].to(tl.int64) + tl.zeros_like(dst), mask=keep)
        count += tl.sum(flag, axis=1)
    tl.store(count_ptr + offs_b, count, mask=mask_b)


def _blocks(on_cuda: bool, N: int) -> tuple[int, int, int]:
    if on_cuda:
        return 32, 64, 32
    # TRITON_INTERPRET=1: few, large tiles (the interpreter pays per op, not per element)
    return 64, min(1024, triton.next_power_of_2(N)), 128


def _prepare(x, W_enc, b_enc, threshold):
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("threshold", threshold)):
        check_dtype(name, t)
    check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, threshold=threshold)
    if x.ndim != 2 or W_enc.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"jumprelu_encode: x must be [B, D] and W_enc [D, N]; got {tuple(x.shape)}, "
            f"{tuple(W_enc.shape)}"
        )
    return x.to(W_enc.dtype).contiguous(), b_enc.contiguous(), threshold.contiguous()


def jumprelu_encode_dense(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """``x [B, D]``, ``W_enc [D, N]``, ``b_enc [N]``, ``threshold [N]`` -> ``[B, N]`` in W_enc's dtype."""
    x, b_enc, threshold = _prepare(x, W_enc, b_enc, threshold)
    B, D = x.shape
    N = W_enc.shape[1]
    out = torch.empty(B, N, dtype=W_enc.dtype, device=x.device)
    if B == 0:
        return out
    BLOCK_B, BLOCK_N, BLOCK_D = _blocks(x.is_cuda, N)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(N, BLOCK_N))
    _jumprelu_dense_kernel[grid](
        x, W_enc, b_enc, threshold, out, B, D, N, W_enc.stride(0), W_enc.stride(1),
        IEEE=W_enc.dtype == torch.float32, UPCAST_DOT=not x.is_cuda,
        BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


def jumprelu_encode_sparse(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    capacity: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (values ``[B, K]`` in W_enc's dtype, int64 indices ``[B, K]``) with K the largest
    active count of any row (at least 1); padding has value 0 and latent 0."""
    x, b_enc, threshold = _prepare(x, W_enc, b_enc, threshold)
    B, D = x.shape
    N = W_enc.shape[1]
    BLOCK_B, BLOCK_N, BLOCK_D = _blocks(x.is_cuda, N)
    cap = max(1, min(capacity, N))
    while True:
        values = torch.zeros(B, cap, dtype=W_enc.dtype, device=x.device)
        indices = torch.zeros(B, cap, dtype=torch.int64, device=x.device)
        counts = torch.empty(B, dtype=torch.int32, device=x.device)
        if B == 0:
            return values[:, :1], indices[:, :1]
        _jumprelu_sparse_kernel[(triton.cdiv(B, BLOCK_B),)](
            x, W_enc, b_enc, threshold, values, indices, counts, B, D, N, cap,
            W_enc.stride(0), W_enc.stride(1),
            IEEE=W_enc.dtype == torch.float32, UPCAST_DOT=not x.is_cuda,
            BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
        width = max(int(counts.max()), 1)
        if width <= cap:
            return values[:, :width].contiguous(), indices[:, :width].contiguous()
        cap = width  # a row overflowed: run again with room for every row
