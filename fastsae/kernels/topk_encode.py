"""Fused encoder + top-k: ``topk(relu?((x @ W_enc + b_enc) * dec_norm), k)`` per row,
without ever writing the ``[B, d_sae]`` pre-activations.

Each program owns BLOCK_B rows and one of SPLITS contiguous chunks of the latents.
It walks its chunk in BLOCK_N tiles: tile = x_blk @ W_enc[:, tile] (fp32 acc) +
bias (* dec_norm), turned into order-preserving int64 keys (value bits high, column
low), top-K_PAD of the tile, merged into a running top-K_PAD. The SPLITS
candidate lists ([B, SPLITS, K_PAD] int64, ~B*SPLITS*K_PAD*8 bytes of scratch) are
merged by a second small kernel that unpacks values and indices.

Keys: for fp32 ``v`` with bits ``u`` (as int32), ``u ^ ((u >> 31) & 0x7FFFFFFF)``
orders like ``v``. With ``ABS`` the key is built from ``|v|`` and the sign is kept
in bit 31 of the low word, beside the column (columns < 2**31). Selection is by
insertion into a running top-k (``_insert_topk``), not by sorting tiles: a
``tl.topk`` of a [64, 1024] tile took 10 s in the interpreter (triton 3.9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_same_device, encoder_tile

MAX_K = 1024


@triton.jit
def _to_key(h, offs_n, mask_n, ABS: tl.constexpr):
    """fp32 ``h [R, C]`` and columns -> int64 keys ordering by value (or |value|)."""
    v = tl.abs(h) if ABS else h
    bits = v.to(tl.int32, bitcast=True)
    key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key32 = tl.where(mask_n[None, :], key32, -2147483648)
    low = offs_n[None, :].to(tl.int64)
    if ABS:
        low = low | ((h < 0).to(tl.int64) << 31)
    return (key32.to(tl.int64) << 32) | low


@triton.jit
def _floor_key(ROWS: tl.constexpr, COLS: tl.constexpr):
    """A key below every real key (built in int32 then widened: see DESIGN's kernel notes)."""
    return tl.full([ROWS, COLS], -2147483648, tl.int32).to(tl.int64) << 32


@triton.jit
def _insert_topk(running, tile, BLOCK_B: tl.constexpr, K_PAD: tl.constexpr, C: tl.constexpr):
    """Merge the keys of ``tile [BLOCK_B, C]`` into ``running [BLOCK_B, K_PAD]`` (an
    unsorted top-k whose unused slots hold a ceiling key that is never the minimum).

    Repeatedly moves each row's largest remaining tile key into the slot of its
    smallest running key while it is larger. Keys are unique (the column is in the
    low bits), so exactly one tile entry leaves per step. Over a whole row this does
    about k*ln(N/k) insertions instead of sorting every tile, and it costs the
    interpreter a handful of array ops per step rather than a sorting network.
    """
    floor = _floor_key(BLOCK_B, C)
    slot = tl.arange(0, K_PAD)
    run_min = tl.min(running, axis=1)
    tile = tl.where(tile > run_min[:, None], tile, floor)
    tmax = tl.max(tile, axis=1)
    while tl.max((tmax > run_min).to(tl.int32), axis=0) > 0:
        upd = tmax > run_min
        pos = tl.argmin(running, axis=1)
        running = tl.where((slot[None, :] == pos[:, None]) & upd[:, None], tmax[:, None], running)
        tile = tl.where(tile == tmax[:, None], floor, tile)
        run_min = tl.min(running, axis=1)
        tmax = tl.max(tile, axis=1)
    return running


@triton.jit
def _empty_topk(K, BLOCK_B: tl.constexpr, K_PAD: tl.constexpr):
    """Running top-k with k usable slots (floor) and K_PAD - k ceiling slots."""
    slot = tl.arange(0, K_PAD)
    ceil = tl.full([BLOCK_B, K_PAD], 2147483647, tl.int32).to(tl.int64) << 32
    return tl.where(slot[None, :] < K, _floor_key(BLOCK_B, K_PAD), ceil)


@triton.jit
def _topk_candidates_kernel(
    x_ptr,  # [B, D] input rows (dtype of W)
    w_ptr,  # [D, N] encoder (any strides)
    b_ptr,  # [N] encoder bias
    dn_ptr,  # [N] decoder norms, or dummy when HAS_DEC_NORM is False
    cand_ptr,  # [B, SPLITS, K_PAD] int64 candidate keys (unused slots: floor)
    B,
    D,
    N,
    K,
    chunk,  # latents per split (multiple of BLOCK_N)
    stride_wd,
    stride_wn,
    SPLITS: tl.constexpr,
    HAS_DEC_NORM: tl.constexpr,
    ABS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mask_b = offs_b < B
    running = _empty_topk(K, BLOCK_B, K_PAD)
    n_start = split * chunk
    n_stop = tl.minimum(n_start + chunk, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_stop
        h = encoder_tile(
            x_ptr, w_ptr, b_ptr, offs_b, mask_b, offs_n, mask_n, D, stride_wd, stride_wn,
            IEEE, UPCAST_DOT, BLOCK_B, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        if HAS_DEC_NORM:
            h = h * tl.load(dn_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        keys = _to_key(h, offs_n, mask_n, ABS)
        running = _insert_topk(running, keys, BLOCK_B, K_PAD, BLOCK_N)
    offs_k = tl.arange(0, K_PAD)
    running = tl.where(offs_k[None, :] < K, running, _floor_key(BLOCK_B, K_PAD))
    out = cand_ptr + offs_b[:, None] * (SPLITS * K_PAD) + split * K_PAD + offs_k[None, :]
    tl.store(out, running, mask=mask_b[:, None])


@triton.jit
def _topk_merge_kernel(
    cand_ptr,  # [B, SPLITS * K_PAD] int64 candidate keys
    vals_ptr,  # [B, K] output values
    idx_ptr,  # [B, K] output int64 indices
    B,
    K,
    ABS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    WIDTH: tl.constexpr,  # SPLITS * K_PAD
    K_PAD: tl.constexpr,
):
    offs_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mask_b = offs_b < B
    offs_w = tl.arange(0, WIDTH)
    cand = tl.load(
        cand_ptr + offs_b[:, None] * WIDTH + offs_w[None, :],
        mask=mask_b[:, None],
        other=_floor_key(BLOCK_B, WIDTH),
    )
    if WIDTH > K_PAD:
        keys = _insert_topk(_empty_topk(K, BLOCK_B, K_PAD), cand, BLOCK_B, K_PAD, WIDTH)
    else:
        keys = cand
    low32 = (tl.full([1, 1], 1, tl.int64) << 32) - 1
    low = keys & low32
    col = low & 0x7FFFFFFF
    key32 = (keys >> 32).to(tl.int32)
    bits = key32 ^ ((key32 >> 31) & 0x7FFFFFFF)
    v = bits.to(tl.float32, bitcast=True)
    if ABS:
        v = tl.where(((low >> 31) & 1) == 1, -v, v)
    else:
        v = tl.maximum(v, 0.0)
    offs_k = tl.arange(0, K_PAD)
    mask = mask_b[:, None] & (offs_k[None, :] < K)
    tl.store(
        vals_ptr + offs_b[:, None] * K + offs_k[None, :], v.to(vals_ptr.dtype.element_ty), mask=mask
    )
    tl.store(idx_ptr + offs_b[:, None] * K + offs_k[None, :], col, mask=mask)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    dec_norm: torch.Tensor | None = None,
    abs_select: bool = False,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, D]`` (cast to W_enc's dtype, as SAELens casts its input), ``W_enc [D, N]``,
    ``b_enc [N]``, ``dec_norm [N]`` -> (values ``[B, k]`` in W_enc's dtype, int64
    indices ``[B, k]``), sorted by decreasing key. fp32 runs the dot in IEEE fp32."""
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("dec_norm", dec_norm)):
        if t is not None:
            check_dtype(name, t)
    check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, dec_norm=dec_norm)
    if x.ndim != 2 or W_enc.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"topk_encode: x must be [B, D] and W_enc [D, N]; got {tuple(x.shape)}, "
            f"{tuple(W_enc.shape)}"
        )
    B, D = x.shape
    N = W_enc.shape[1]
    if not 0 < k <= min(N, MAX_K):
        raise ValueError(f"topk_encode: k must be in [1, min(d_sae, {MAX_K})], got {k}")
    x = x.to(W_enc.dtype).contiguous()
    b_enc = b_enc.contiguous()
    dec_norm = dec_norm.contiguous() if dec_norm is not None else None
    K_PAD = triton.next_power_of_2(k)
    if x.is_cuda:
        BLOCK_B, BLOCK_N, BLOCK_D = 16, max(K_PAD, 64), 32
        if splits is None:
            # enough programs to fill a GPU at small B, few enough that the candidate
            # scratch (B * splits * K_PAD * 8 bytes) stays under ~3% of a [B, N] bf16 tensor
            by_memory = max(1, N // (128 * K_PAD))
            splits = max(1, min(16, triton.cdiv(N, 4 * BLOCK_N), by_memory))
            splits = 1 << (splits.bit_length() - 1)  # round down to a power of 2
    else:
        # TRITON_INTERPRET=1 on CPU: the interpreter pays per op, not per element, so
        # few big tiles (one program per 64 rows, the whole row in one or two tiles)
        BLOCK_B, BLOCK_N, BLOCK_D = 64, max(K_PAD, min(1024, triton.next_power_of_2(N))), 128
        splits = splits or 1
    splits = triton.next_power_of_2(splits)
    chunk = triton.cdiv(triton.cdiv(N, splits), BLOCK_N) * BLOCK_N
    cand = torch.empty(B, splits, K_PAD, dtype=torch.int64, device=x.device)
    values = torch.empty(B, k, dtype=W_enc.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    if B == 0:
        return values, indices
    _topk_candidates_kernel[(triton.cdiv(B, BLOCK_B), splits)](
        x,
        W_enc,
        b_enc,
        dec_norm if dec_norm is not None else b_enc,
        cand,
        B,
        D,
        N,
        k,
        chunk,
        W_enc.stride(0),
        W_enc.stride(1),
        SPLITS=splits,
        HAS_DEC_NORM=dec_norm is not None,
        ABS=abs_select,
        IEEE=W_enc.dtype == torch.float32,
        # the triton 3.9 interpreter multiplies bf16 tiles as raw 16-bit integers in
        # tl.dot (wrong by ~1e10); widen them first when not on a GPU
        UPCAST_DOT=not x.is_cuda,
        BLOCK_B=BLOCK_B,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        K_PAD=K_PAD,
    )
    _topk_merge_kernel[(triton.cdiv(B, BLOCK_B),)](
        cand,
        values,
        indices,
        B,
        k,
        ABS=abs_select,
        BLOCK_B=BLOCK_B,
        WIDTH=splits * K_PAD,
        K_PAD=K_PAD,
    )
    return values, indices
