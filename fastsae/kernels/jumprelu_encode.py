"""Fused encoder + JumpReLU: ``relu(h) * (h > threshold)`` with ``h = x @ W_enc + b_enc``.

Both kernels are GEMMs (tensor-core tiles, software-pipelined K-steps, an autotune list
on GPUs) with a threshold epilogue:
- dense: one program per [BLOCK_M, BLOCK_N] output tile, in grouped order (GROUP_M row
  blocks walk the latents together, so their W_enc tiles are served from L2), writes
  ``[B, N]``;
- sparse: each program owns BLOCK_M rows and one of SPLITS contiguous chunks of the
  latents and appends the active (value, latent) pairs of each row to its
  ``[B, SPLITS, CAP]`` buffers (positions from a prefix sum over the tile's mask), with
  the true count per (row, split). A small pack kernel then lays each row's pairs side
  by side in ``[B, K]`` (K = the largest row). When a (row, split) overflows CAP the
  launcher runs again with room for the largest count, so the result is exact either
  way. No ``[B, N]`` tensor is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsae.sparse_code import SparseCode

from ._common import check_dtype, check_same_device, encoder_tile, ieee_fp32

# programs the sparse kernel aims for on a GPU (about two waves of an H100's 132 SMs)
TARGET_PROGRAMS = 264


@triton.jit
def _jumprelu_tile(
    x_ptr, w_ptr, b_ptr, t_ptr, offs_m, mask_m, offs_n, mask_n, D, stride_wd, stride_wn,
    IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 JumpReLU activations of one [BLOCK_M, BLOCK_N] tile, and its active mask."""
    h = encoder_tile(
        x_ptr, w_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, D, stride_wd, stride_wn,
        IEEE, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    thr = tl.load(t_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    active = (h > thr) & (h > 0) & mask_n[None, :] & mask_m[:, None]
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped order: GROUP_M consecutive row blocks per latent block
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(B, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < B
    mask_n = offs_n < N
    acts, _ = _jumprelu_tile(
        x_ptr, w_ptr, b_ptr, t_ptr, offs_m, mask_m, offs_n, mask_n, D, stride_wd, stride_wn,
        IEEE, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    tl.store(
        out_ptr + offs_m[:, None] * N + offs_n[None, :],
        acts.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _jumprelu_sparse_kernel(
    x_ptr,  # [B, D]
    w_ptr,  # [D, N] (any strides)
    b_ptr,  # [N]
    t_ptr,  # [N] threshold
    cval_ptr,  # [B, SPLITS, CAP] values (dtype of the output)
    ccol_ptr,  # [B, SPLITS, CAP] int32 latents
    count_ptr,  # [B, SPLITS] int32 active latents per (row, split), may exceed CAP
    B,
    D,
    N,
    CAP,
    SPLITS,
    chunk,  # latents per split (multiple of BLOCK_N)
    stride_wd,
    stride_wn,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # consecutive programs share a split (its W_enc chunk is read once, then hit in L2)
    n_row_blocks = tl.cdiv(B, BLOCK_M)
    split = tl.program_id(0) // n_row_blocks
    offs_m = ((tl.program_id(0) % n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < B
    # int32 offsets (the launcher keeps B * SPLITS * CAP under 2**31): registers
    row_base = ((offs_m * SPLITS + split) * CAP).to(tl.int32)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_start = split * chunk
    n_stop = tl.minimum(n_start + chunk, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_stop
        acts, active = _jumprelu_tile(
            x_ptr, w_ptr, b_ptr, t_ptr, offs_m, mask_m, offs_n, mask_n, D, stride_wd,
            stride_wn, IEEE, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        flag = active.to(tl.int32)
        slot = count[:, None] + tl.cumsum(flag, axis=1) - 1  # this pair's slot in its row
        keep = active & (slot < CAP)
        dst = row_base[:, None] + slot
        tl.store(cval_ptr + dst, acts.to(cval_ptr.dtype.element_ty), mask=keep)
        tl.store(ccol_ptr + dst, offs_n[None, :] + tl.zeros_like(slot), mask=keep)
        count += tl.sum(flag, axis=1)
    tl.store(count_ptr + offs_m * SPLITS + split, count, mask=mask_m)


@triton.jit
def _jumprelu_pack_kernel(
    cval_ptr,  # [B, SPLITS, CAP] values
    ccol_ptr,  # [B, SPLITS, CAP] int32 latents
    count_ptr,  # [B, SPLITS] int32 (all <= CAP here)
    vals_ptr,  # [B, WIDTH] output values, zero-filled by the launcher
    idx_ptr,  # [B, WIDTH] int64 output latents, zero-filled by the launcher
    CAP,
    SPLITS,
    WIDTH,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    written = tl.full([], 0, tl.int32)
    for s in range(0, SPLITS):
        n = tl.load(count_ptr + row * SPLITS + s)
        src = (row * SPLITS + s) * CAP
        for c0 in range(0, n, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            mask = offs < n
            v = tl.load(cval_ptr + src + offs, mask=mask, other=0.0)
            col = tl.load(ccol_ptr + src + offs, mask=mask, other=0)
            dst = row * WIDTH + written + offs
            tl.store(vals_ptr + dst, v.to(vals_ptr.dtype.element_ty), mask=mask)
            tl.store(idx_ptr + dst, col.to(tl.int64), mask=mask)
        written += n


def _gemm_configs(sixteen_bit: bool, dense: bool) -> list[triton.Config]:
    """GEMM-class tilings (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) that compile without
    spills and within shared memory on sm_80 and sm_90 (``python -m
    fastsae.kernels.check``). fp32 runs IEEE FMAs with operands in registers: shorter
    K-steps, shallower pipelines."""
    if dense:
        shapes = (
            [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3)]
            if sixteen_bit
            else [(64, 128, 32, 8, 3), (128, 128, 16, 8, 3)]
        )
    else:
        shapes = (
            [(64, 128, 64, 8, 3), (64, 128, 32, 8, 3)]
            if sixteen_bit
            else [(64, 128, 16, 8, 2), (64, 128, 32, 8, 2)]
        )
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


_TUNED_DENSE = {
    sixteen_bit: triton.autotune(configs=_gemm_configs(sixteen_bit, True), key=["B", "D", "N"])(
        _jumprelu_dense_kernel
    )
    for sixteen_bit in (True, False)
}
_TUNED_SPARSE = {
    sixteen_bit: triton.autotune(configs=_gemm_configs(sixteen_bit, False), key=["B", "D", "N"])(
        _jumprelu_sparse_kernel
    )
    for sixteen_bit in (True, False)
}
# the sparse kernel's latent block on a GPU (its autotune list keeps BLOCK_N at 128)
SPARSE_BLOCK_N = 128
# TRITON_INTERPRET=1 on CPU: few, large tiles (the interpreter pays per op, not per element)
INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_K": 128}


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


def _flags(x, W_enc) -> dict[str, bool]:
    return {
        "IEEE": ieee_fp32(W_enc.dtype),
        # the triton 3.9 interpreter multiplies bf16 tiles as raw 16-bit integers in
        # tl.dot (wrong by ~1e10); widen them first when not on a GPU
        "UPCAST_DOT": not x.is_cuda,
    }


def jumprelu_encode_dense(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """``x [B, D]``, ``W_enc [D, N]``, ``b_enc [N]``, ``threshold [N]`` -> ``[B, N]`` in
    W_enc's dtype. fp32 follows torch's float32 matmul precision (IEEE under
    ``"highest"``, TF32 otherwise)."""
    x, b_enc, threshold = _prepare(x, W_enc, b_enc, threshold)
    B, D = x.shape
    N = W_enc.shape[1]
    out = torch.empty(B, N, dtype=W_enc.dtype, device=x.device)
    if B == 0:
        return out
    args = (x, W_enc, b_enc, threshold, out, B, D, N, W_enc.stride(0), W_enc.stride(1))
    if x.is_cuda:

        def grid(meta):
            return (triton.cdiv(B, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _TUNED_DENSE[W_enc.element_size() == 2][grid](*args, **_flags(x, W_enc), GROUP_M=8)
    else:
        block_n = min(1024, triton.next_power_of_2(N))
        grid = (triton.cdiv(B, 64) * triton.cdiv(N, block_n),)
        _jumprelu_dense_kernel[grid](
            *args, **_flags(x, W_enc), **INTERPRET_BLOCKS, BLOCK_N=block_n, GROUP_M=8
        )
    return out


def sparse_plan(B: int, N: int, on_gpu: bool, capacity: int, splits: int | None = None):
    """(BLOCK_N, splits, chunk, cap per (row, split)) of a sparse JumpReLU launch."""
    if on_gpu:
        block_n = SPARSE_BLOCK_N
        if splits is None:
            splits = max(1, min(TARGET_PROGRAMS // triton.cdiv(B, 64), N // (4 * block_n)))
    else:
        block_n = min(1024, triton.next_power_of_2(N))
        splits = splits or 1
    splits = 1 << (max(1, splits).bit_length() - 1)
    chunk = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    splits = triton.cdiv(N, chunk)
    cap = max(1, min(chunk, 2 * triton.cdiv(capacity, splits)))
    return block_n, splits, chunk, cap


def jumprelu_encode_sparse(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    capacity: int = 256,
    splits: int | None = None,
) -> SparseCode:
    """-> values ``[B, K]`` in W_enc's dtype and int64 indices ``[B, K]`` with K the
    largest active count of any row (at least 1); padding has value 0 and latent 0.
    ``capacity`` sizes the candidate buffers (about the active latents expected per row);
    a row with more runs again, never loses a pair."""
    x, b_enc, threshold = _prepare(x, W_enc, b_enc, threshold)
    B, D = x.shape
    N = W_enc.shape[1]
    block_n, splits, chunk, cap = sparse_plan(B, N, x.is_cuda, capacity, splits)
    if B == 0:
        empty = torch.zeros(0, 1, device=x.device)
        return SparseCode(empty.to(W_enc.dtype), empty.to(torch.int64))
    while True:
        cval = torch.empty(B, splits, cap, dtype=W_enc.dtype, device=x.device)
        ccol = torch.empty(B, splits, cap, dtype=torch.int32, device=x.device)
        counts = torch.empty(B, splits, dtype=torch.int32, device=x.device)
        rows = max(1, (2**31 - 1) // (splits * cap))
        for r0 in range(0, B, rows):
            _sparse_launch(
                x[r0 : r0 + rows], W_enc, b_enc, threshold, cval[r0 : r0 + rows],
                ccol[r0 : r0 + rows], counts[r0 : r0 + rows], cap, splits, chunk, block_n,
            )  # fmt: skip
        most = int(counts.max())
        if most <= cap:
            break
        cap = most  # a (row, split) overflowed: again with room for every one
    width = max(int(counts.sum(dim=1).max()), 1)
    return pack_rows(cval, ccol, counts, width)


def pack_rows(
    cval: torch.Tensor, ccol: torch.Tensor, counts: torch.Tensor, width: int
) -> SparseCode:
    """Per-(row, split) pairs ``cval``/``ccol [B, SPLITS, CAP]`` with ``counts [B, SPLITS]``
    (each <= CAP, summing to <= ``width`` per row) -> a code ``[B, width]``, each row's
    pairs in split order, zero-padded."""
    B, splits, cap = cval.shape
    values = torch.zeros(B, width, dtype=cval.dtype, device=cval.device)
    indices = torch.zeros(B, width, dtype=torch.int64, device=cval.device)
    _jumprelu_pack_kernel[(B,)](
        cval, ccol, counts, values, indices, cap, splits, width,
        BLOCK_C=min(1024, triton.next_power_of_2(cap)),
    )  # fmt: skip
    return SparseCode(values, indices)


def _sparse_launch(x, W_enc, b_enc, threshold, cval, ccol, counts, cap, splits, chunk, block_n):
    B, D = x.shape
    N = W_enc.shape[1]
    args = (
        x, W_enc, b_enc, threshold, cval, ccol, counts, B, D, N, cap, splits, chunk,
        W_enc.stride(0), W_enc.stride(1),
    )  # fmt: skip
    if x.is_cuda:
        kernel = _TUNED_SPARSE[W_enc.element_size() == 2]
        kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]) * splits,)](*args, **_flags(x, W_enc))
    else:
        grid = (triton.cdiv(B, INTERPRET_BLOCKS["BLOCK_M"]) * splits,)
        _jumprelu_sparse_kernel[grid](
            *args, **_flags(x, W_enc), **INTERPRET_BLOCKS, BLOCK_N=block_n
        )
