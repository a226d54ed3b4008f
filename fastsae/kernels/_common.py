"""Launcher helpers shared by the kernels (no torch_ops, no nn.Module)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# dtypes the kernels load and store; accumulation is always fp32
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: Triton kernels take float32/float16/bfloat16, got {t.dtype}")


def check_index_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: indices must be int32 or int64, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")


def ieee_fp32(dtype: torch.dtype) -> bool:
    """Whether an fp32 ``tl.dot`` runs in IEEE fp32: torch's float32 matmul precision
    setting decides, as it decides for cuBLAS (TF32 unless it is ``"highest"``)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def block_size(n: int, lo: int, hi: int) -> int:
    """Power of two in [lo, hi] covering ``n`` where possible."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@triton.jit
def encoder_tile(
    x_ptr, w_ptr, b_ptr, offs_b, mask_b, offs_n, mask_n, D, stride_wd, stride_wn,
    IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """fp32 pre-activations ``x[offs_b] @ W[:, offs_n] + b[offs_n]`` of one [BLOCK_B, BLOCK_N] tile.

    ``x [B, D]`` row-major, ``W [D, N]`` any strides (int64 offsets). ``IEEE`` keeps fp32
    dots in IEEE fp32 (TF32 otherwise; 16-bit tiles use the tensor cores either way);
    ``UPCAST_DOT`` widens tiles to fp32 first, because the triton 3.9 interpreter
    computes ``tl.dot`` on bf16 tiles as raw 16-bit integers. The K loop is the one the
    compiler software-pipelines (``num_stages``).
    """
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xt = tl.load(
            x_ptr + offs_b[:, None] * D + offs_d[None, :],
            mask=mask_b[:, None] & mask_d[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_ptr
            + offs_d[:, None].to(tl.int64) * stride_wd
            + offs_n[None, :].to(tl.int64) * stride_wn,
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST_DOT:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
    return acc + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
