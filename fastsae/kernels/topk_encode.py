"""Fused encoder + top-k: ``topk(relu?((x @ W_enc + b_enc) * dec_norm), k)`` per row,
without ever writing the ``[B, d_sae]`` pre-activations.

Two kernels:

1. ``_topk_filter_kernel`` is a GEMM with a filtering epilogue. Each program owns
   BLOCK_M rows and one of SPLITS contiguous chunks of the latents and walks its chunk
   in [BLOCK_M, BLOCK_N] tiles computed on tensor cores (K-steps of BLOCK_K, software
   pipelined). Per row it keeps SLOTS running maxima (slot ``s`` holds the largest key
   seen in the columns ``= s mod SLOTS`` of its tiles); the k-th largest of those SLOTS
   distinct entries is a lower bound of the row's final k-th largest key, so anything
   below it can never be selected. After each tile the bound is raised (a 16-step
   bitwise search over the slots, rounding down, so it stays a bound) and the tile's
   entries at or above it are appended to the row's bounded candidate buffer
   (``[B, SPLITS, CAP]`` values and columns, positions from a prefix sum). The true
   count per (row, split) is written too. Nothing in a tile is serialised: every step is
   a whole-tile comparison, reduction or scan.
2. ``_topk_select_kernel`` is an exact top-k over each row's candidates: a 32-step
   bitwise search finds the k-th largest key, then everything above it and the first
   ties at it are compacted into the ``[B, k]`` outputs.

The launcher reruns the rows whose candidates overflowed CAP with room for all of them
(the bound depends on the row only, so the rerun stores the same survivors), so the
result is exact either way. Keys: for fp32 ``v`` with bits ``u``, ``u ^ ((u >> 31) &
0x7FFFFFFF)`` orders like ``v`` as a signed int; flipping its sign bit makes it an
unsigned key (0 is below every real value and marks empty slots). With ``ABS`` the key is
built from ``|v|`` and the candidates keep the signed value.

Expected candidates per (row, split) with the latents in random order: about ``k`` from
the first tile plus ``~1.4 k ln(tiles)``; CAP leaves room for several times that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsae.sparse_code import SparseCode

from ._common import check_dtype, check_same_device, encoder_tile, ieee_fp32

# the running bound needs SLOTS >= k slots in a 128-latent tile; larger k take the
# chunked cuBLAS selection (fastsae.ops)
MAX_K = 128
# programs the filter kernel aims for on a GPU (about two waves of an H100's 132 SMs);
# more splits mean more candidates per row, so no more than needed
TARGET_PROGRAMS = 264
ROWS_PER_SELECT = 1  # rows per program of the select kernel on a GPU
# candidates per chunk of the select kernel; a row that fits is held in registers
SELECT_MAX_BLOCK_W = 2048


@triton.jit
def _ukey(v):
    """fp32 -> uint32 ordering like ``v`` (0 only for a negative NaN's all-ones bits)."""
    bits = v.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF) ^ -2147483648
    return key.to(tl.uint32, bitcast=True)


@triton.jit
def _kth_bound(slots, K, ROWS: tl.constexpr, BITS: tl.constexpr):
    """Per row of ``slots [ROWS, C]`` (uint32 keys): the k-th largest slot with all but its
    top BITS bits cleared (so at least K slots are ``>=`` it; exactly the k-th largest
    when BITS is 32), or 0 when fewer than K slots are nonzero."""
    prefix = tl.zeros([ROWS], dtype=tl.uint32)
    for b in tl.static_range(BITS):
        cand = prefix | (tl.full([ROWS], 1, tl.uint32) << (31 - b))
        count = tl.sum((slots >= cand[:, None]).to(tl.int32), axis=1)
        prefix = tl.where(count >= K, cand, prefix)
    return prefix


@triton.jit
def _topk_filter_kernel(
    x_ptr,  # [B, D] input rows (dtype of W)
    w_ptr,  # [D, N] encoder (any strides)
    b_ptr,  # [N] encoder bias
    dn_ptr,  # [N] decoder norms, or dummy when HAS_DEC_NORM is False
    cval_ptr,  # [B, SPLITS, CAP] fp32 candidate values (signed, after dec_norm)
    ccol_ptr,  # [B, SPLITS, CAP] int32 candidate latents
    count_ptr,  # [B, SPLITS] int32 survivors per (row, split), may exceed CAP
    B,
    D,
    N,
    K,
    CAP,
    SPLITS,
    chunk,  # latents per split (multiple of BLOCK_N)
    stride_wd,
    stride_wn,
    HAS_DEC_NORM: tl.constexpr,
    ABS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SLOTS: tl.constexpr,  # running maxima per row, divides BLOCK_N
):
    # programs with consecutive ids share a split: its W_enc chunk is read from memory
    # once and served from L2 to every row block
    n_row_blocks = tl.cdiv(B, BLOCK_M)
    split = tl.program_id(0) // n_row_blocks
    offs_m = ((tl.program_id(0) % n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < B
    slots = tl.zeros([BLOCK_M, SLOTS], dtype=tl.uint32)
    bound = tl.zeros([BLOCK_M], dtype=tl.uint32)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    # int32 offsets (the launcher keeps B * SPLITS * CAP under 2**31): int64 ones cost
    # the epilogue the registers it has no room for
    row_base = ((offs_m * SPLITS + split) * CAP).to(tl.int32)
    n_start = split * chunk
    n_stop = tl.minimum(n_start + chunk, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_stop
        h = encoder_tile(
            x_ptr, w_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, D, stride_wd, stride_wn,
            IEEE, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if HAS_DEC_NORM:
            h = h * tl.load(dn_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        key = _ukey(tl.abs(h) if ABS else h)
        key = tl.where(mask_n[None, :], key, 0)
        if SLOTS == BLOCK_N:
            slots = tl.maximum(slots, key)
        else:
            grouped = tl.reshape(key, [BLOCK_M, BLOCK_N // SLOTS, SLOTS])
            slots = tl.maximum(slots, tl.max(grouped, axis=1))
        bound = tl.maximum(bound, _kth_bound(slots, K, BLOCK_M, 16))
        keep = (key >= bound[:, None]) & mask_n[None, :] & mask_m[:, None]
        flag = keep.to(tl.int32)
        slot = count[:, None] + tl.cumsum(flag, axis=1) - 1
        room = keep & (slot < CAP)
        dst = row_base[:, None] + slot
        tl.store(cval_ptr + dst, h, mask=room)
        tl.store(ccol_ptr + dst, offs_n[None, :] + tl.zeros_like(slot), mask=room)
        count += tl.sum(flag, axis=1)
    tl.store(count_ptr + offs_m * SPLITS + split, count, mask=mask_m)


@triton.jit
def _candidate_keys(
    cval_ptr, count_ptr, offs_r, mask_r, offs_w, WIDTH, CAP, SPLITS, ABS: tl.constexpr
):
    """Values and keys of candidates ``offs_w`` of rows ``offs_r`` (key 0 where empty)."""
    in_row = offs_w < WIDTH
    split = offs_w // CAP
    filled = tl.load(
        count_ptr + offs_r[:, None] * SPLITS + split[None, :],
        mask=mask_r[:, None] & in_row[None, :],
        other=0,
    )
    valid = mask_r[:, None] & in_row[None, :] & ((offs_w % CAP)[None, :] < filled)
    v = tl.load(cval_ptr + offs_r[:, None] * WIDTH + offs_w[None, :], mask=valid, other=0.0)
    key = tl.where(valid, _ukey(tl.abs(v) if ABS else v), 0)
    return v, key, valid


@triton.jit
def _write_taken(
    v, take, written, offs_r, offs_w, ccol_ptr, vals_ptr, idx_ptr, K, WIDTH, ABS: tl.constexpr
):
    """Append the ``take`` candidates of a chunk to the rows' outputs after ``written``
    (never past k); -> the new ``written``."""
    pos = written[:, None] + tl.cumsum(take.to(tl.int32), axis=1) - 1
    take = take & (pos < K)
    col = tl.load(ccol_ptr + offs_r[:, None] * WIDTH + offs_w[None, :], mask=take, other=0)
    out = v if ABS else tl.maximum(v, 0.0)
    dst = offs_r[:, None] * K + pos.to(tl.int64)
    tl.store(vals_ptr + dst, out.to(vals_ptr.dtype.element_ty), mask=take)
    tl.store(idx_ptr + dst, col.to(tl.int64), mask=take)
    return written + tl.sum(take.to(tl.int32), axis=1)


@triton.jit
def _topk_select_kernel(
    cval_ptr,  # [B, WIDTH] fp32 candidate values (WIDTH = SPLITS * CAP)
    ccol_ptr,  # [B, WIDTH] int32 candidate latents
    count_ptr,  # [B, SPLITS] int32 filled slots per split (entries past CAP are lost)
    vals_ptr,  # [B, K] output values
    idx_ptr,  # [B, K] int64 output latents
    B,
    K,
    CAP,
    SPLITS,
    WIDTH,
    ABS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    WHOLE_ROW: tl.constexpr,  # WIDTH <= BLOCK_W: a row's candidates stay in registers
):
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = offs_r < B
    written = tl.zeros([BLOCK_R], dtype=tl.int32)
    if WHOLE_ROW:
        offs_w = tl.arange(0, BLOCK_W)
        v, key, valid = _candidate_keys(
            cval_ptr, count_ptr, offs_r, mask_r, offs_w, WIDTH, CAP, SPLITS, ABS
        )
        kth = _kth_bound(key, K, BLOCK_R, 32)  # all 32 bits: exactly the k-th largest key
        # everything above the k-th key, then ties at it until k are written
        written = _write_taken(
            v, valid & (key > kth[:, None]), written, offs_r, offs_w, ccol_ptr, vals_ptr,
            idx_ptr, K, WIDTH, ABS,
        )  # fmt: skip
        _write_taken(
            v, valid & (key == kth[:, None]), written, offs_r, offs_w, ccol_ptr, vals_ptr,
            idx_ptr, K, WIDTH, ABS,
        )  # fmt: skip
    else:
        # the same in chunks: each of the 32 bitwise steps counts the keys >= its candidate
        kth = tl.zeros([BLOCK_R], dtype=tl.uint32)
        for b in tl.static_range(32):
            cand = kth | (tl.full([BLOCK_R], 1, tl.uint32) << (31 - b))
            above = tl.zeros([BLOCK_R], dtype=tl.int32)
            for w0 in range(0, WIDTH, BLOCK_W):
                offs_w = w0 + tl.arange(0, BLOCK_W)
                _, key, _ = _candidate_keys(
                    cval_ptr, count_ptr, offs_r, mask_r, offs_w, WIDTH, CAP, SPLITS, ABS
                )
                above += tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
            kth = tl.where(above >= K, cand, kth)
        for tie in tl.static_range(2):
            for w0 in range(0, WIDTH, BLOCK_W):
                offs_w = w0 + tl.arange(0, BLOCK_W)
                v, key, valid = _candidate_keys(
                    cval_ptr, count_ptr, offs_r, mask_r, offs_w, WIDTH, CAP, SPLITS, ABS
                )
                if tie == 0:
                    take = valid & (key > kth[:, None])
                else:
                    take = valid & (key == kth[:, None])
                written = _write_taken(
                    v, take, written, offs_r, offs_w, ccol_ptr, vals_ptr, idx_ptr, K, WIDTH, ABS
                )


def _filter_configs(sixteen_bit: bool) -> list[triton.Config]:
    """GEMM-class tilings of the filter kernel (BLOCK_N is the launcher's): the ones whose
    epilogue fits the register file without spilling on sm_80 and sm_90, by
    ``python -m fastsae.kernels.check``. fp32 runs its FMAs (IEEE) with operands in
    registers, so it takes shorter K-steps and a shallower pipeline."""
    if sixteen_bit:
        shapes = [(64, 64, 8, 3), (64, 64, 8, 4)]
    else:
        shapes = [(64, 16, 8, 2), (64, 32, 8, 2)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for m, bk, w, s in shapes
    ]


_TUNED_FILTERS = {
    sixteen_bit: triton.autotune(configs=_filter_configs(sixteen_bit), key=["B", "D", "N", "K"])(
        _topk_filter_kernel
    )
    for sixteen_bit in (True, False)
}


def launch_plan(B: int, N: int, k: int, on_gpu: bool, splits: int | None = None) -> dict[str, int]:
    """Tile sizes, splits, chunk and candidate capacity for a ``[B, N]`` top-k."""
    K_PAD = triton.next_power_of_2(k)
    if on_gpu:
        block_n = 128
        if splits is None:
            row_blocks = triton.cdiv(B, 64)
            splits = max(1, min(TARGET_PROGRAMS // row_blocks, N // (8 * block_n)))
    else:
        # TRITON_INTERPRET=1 on CPU: the interpreter pays per op, not per element, so
        # few big tiles (the whole row in one or two tiles)
        block_n = max(2 * K_PAD, min(1024, triton.next_power_of_2(N)))
        splits = splits or 1
    splits = 1 << (max(1, splits).bit_length() - 1)  # a power of 2, rounded down
    chunk = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    splits = triton.cdiv(N, chunk)  # no empty split
    tiles = triton.cdiv(chunk, block_n)
    cap = min(chunk, K_PAD * (4 + tiles.bit_length()))
    return {
        "BLOCK_N": block_n,
        "SLOTS": min(block_n, 2 * K_PAD),
        "splits": splits,
        "chunk": chunk,
        "cap": cap,
    }


def _prepare(x, W_enc, b_enc, k, dec_norm):
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("dec_norm", dec_norm)):
        if t is not None:
            check_dtype(name, t)
    check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, dec_norm=dec_norm)
    if x.ndim != 2 or W_enc.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"topk_encode: x must be [B, D] and W_enc [D, N]; got {tuple(x.shape)}, "
            f"{tuple(W_enc.shape)}"
        )
    if not 0 < k <= min(W_enc.shape[1], MAX_K):
        raise ValueError(f"topk_encode: k must be in [1, min(d_sae, {MAX_K})], got {k}")
    dec_norm = dec_norm.contiguous() if dec_norm is not None else None
    return x.to(W_enc.dtype).contiguous(), b_enc.contiguous(), dec_norm


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    dec_norm: torch.Tensor | None = None,
    abs_select: bool = False,
    splits: int | None = None,
    capacity: int | None = None,
) -> SparseCode:
    """``x [B, D]`` (cast to W_enc's dtype, as SAELens casts its input), ``W_enc [D, N]``,
    ``b_enc [N]``, ``dec_norm [N]`` -> values ``[B, k]`` in W_enc's dtype and int64
    indices ``[B, k]``, in no particular order. fp32 follows torch's float32 matmul
    precision (IEEE under ``"highest"``, TF32 otherwise). ``splits`` and ``capacity``
    (candidates per row and split) override the launch plan; tests use them to force
    many splits and the overflow path."""
    x, b_enc, dec_norm = _prepare(x, W_enc, b_enc, k, dec_norm)
    B = x.shape[0]
    plan = launch_plan(B, W_enc.shape[1], k, x.is_cuda, splits)
    cap = plan["cap"] if capacity is None else max(1, min(capacity, plan["chunk"]))
    values = torch.empty(B, k, dtype=W_enc.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    if B == 0:
        return SparseCode(values, indices)
    counts = _launch(x, W_enc, b_enc, dec_norm, k, abs_select, plan, cap, values, indices)
    rows = (counts > cap).any(dim=1).nonzero().squeeze(1)
    while rows.numel() > 0:
        # rows whose survivors overflowed CAP: again, with room for all of them (the
        # bound depends on the row alone, so they survive again; CAP <= chunk ends it)
        cap = int(counts.max())
        sub_x = x[rows]
        sub_v = torch.empty(rows.numel(), k, dtype=W_enc.dtype, device=x.device)
        sub_i = torch.empty(rows.numel(), k, dtype=torch.int64, device=x.device)
        counts = _launch(sub_x, W_enc, b_enc, dec_norm, k, abs_select, plan, cap, sub_v, sub_i)
        values[rows], indices[rows] = sub_v, sub_i
        over = (counts > cap).any(dim=1)
        rows, counts = rows[over], counts[over]
    return SparseCode(values, indices)


def _launch(x, W_enc, b_enc, dec_norm, k, abs_select, plan, cap, values, indices):
    """Filter then select, in row slices whose candidate buffers stay under 2**31
    entries (the filter kernel's offsets are int32); -> the per-(row, split) survivor
    counts ``[B, SPLITS]``."""
    rows = max(1, (2**31 - 1) // (plan["splits"] * cap))
    counts = [
        _filter_select(
            x[r0 : r0 + rows],
            W_enc,
            b_enc,
            dec_norm,
            k,
            abs_select,
            plan,
            cap,
            values[r0 : r0 + rows],
            indices[r0 : r0 + rows],
        )  # fmt: skip
        for r0 in range(0, x.shape[0], rows)
    ]
    return torch.cat(counts) if len(counts) > 1 else counts[0]


def _filter_select(x, W_enc, b_enc, dec_norm, k, abs_select, plan, cap, values, indices):
    B, D = x.shape
    N = W_enc.shape[1]
    splits = plan["splits"]
    cval = torch.empty(B, splits, cap, dtype=torch.float32, device=x.device)
    ccol = torch.empty(B, splits, cap, dtype=torch.int32, device=x.device)
    counts = torch.empty(B, splits, dtype=torch.int32, device=x.device)
    args = (
        x, W_enc, b_enc, dec_norm if dec_norm is not None else b_enc, cval, ccol, counts,
        B, D, N, k, cap, splits, plan["chunk"], W_enc.stride(0), W_enc.stride(1),
    )  # fmt: skip
    flags = {
        "HAS_DEC_NORM": dec_norm is not None,
        "ABS": abs_select,
        "IEEE": ieee_fp32(W_enc.dtype),
        # the triton 3.9 interpreter multiplies bf16 tiles as raw 16-bit integers in
        # tl.dot (wrong by ~1e10); widen them first when not on a GPU
        "UPCAST_DOT": not x.is_cuda,
        "BLOCK_N": plan["BLOCK_N"],
        "SLOTS": plan["SLOTS"],
    }
    if x.is_cuda:
        kernel = _TUNED_FILTERS[W_enc.element_size() == 2]
        kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]) * splits,)](*args, **flags)
        block_r = ROWS_PER_SELECT
    else:
        _topk_filter_kernel[(triton.cdiv(B, 64) * splits,)](*args, **flags, BLOCK_M=64, BLOCK_K=128)
        block_r = 64
    block_w = min(SELECT_MAX_BLOCK_W, triton.next_power_of_2(splits * cap))
    _topk_select_kernel[(triton.cdiv(B, block_r),)](
        cval, ccol, counts, values, indices, B, k, cap, splits, splits * cap,
        ABS=abs_select, BLOCK_R=block_r, BLOCK_W=block_w, WHOLE_ROW=splits * cap <= block_w,
    )  # fmt: skip
    return counts
