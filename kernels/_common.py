"""Launcher helpers shared by the kernels (no torch_ops, no nn.Module)."""

from __future__ import annotations

import torch
import triton

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


def block_size(n: int, lo: int, hi: int) -> int:
    """Power of two in [lo, hi] covering ``n`` where possible."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))
