"""Writing a safetensors file block by block, for tensors that are never whole in one
process's memory (a latent-sharded SAE's weights, gathered a block at a time).

The ``safetensors`` package writes only tensors it holds entirely, so this writes the
format itself (https://github.com/huggingface/safetensors#format): an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte
range, padded with spaces to a multiple of 8, then the tensors' bytes back to back in
row-major order. Files it writes are read back by ``safetensors.safe_open`` in the tests.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _header(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {}
    sizes, offset = [], 0
    for name, dtype, shape in specs:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
        numel = 1
        for d in shape:
            numel *= d
        size = numel * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        sizes.append(size)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, sizes


def write_safetensors_blocks(
    file: str | Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    blocks: Iterable[tuple[str, Tensor]],
) -> None:
    """Write ``file``: the tensors ``specs`` lists (name, dtype, full shape), in that
    order, from ``blocks``: ``(name, block)`` pairs that give each tensor's elements in
    row-major order, a block at a time (any number of elements per block, each
    tensor's blocks together and in ``specs`` order). Raises ``ValueError`` when the
    blocks do not fill the tensors exactly or a block has another dtype."""
    head, sizes = _header(specs)
    i, remaining = -1, 0  # the tensor being filled and the bytes it still needs
    with open(file, "wb") as f:
        f.write(head)
        for name, block in blocks:
            while remaining == 0:  # the current tensor is full (or none started)
                i += 1
                if i == len(specs):
                    raise ValueError(f"a block for {name!r} after the last tensor")
                remaining = sizes[i]
            spec_name, dtype, _ = specs[i]
            if name != spec_name:
                raise ValueError(
                    f"a block for {name!r} while {spec_name!r} still needs {remaining} bytes"
                )
            if block.dtype != dtype:
                raise ValueError(f"{name}: block dtype {block.dtype}, expected {dtype}")
            data = block.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
            if data.numel() > remaining:
                raise ValueError(f"{name}: the blocks hold more elements than its shape")
            f.write(memoryview(data.numpy()))
            remaining -= data.numel()
    unfilled = [specs[j][0] for j in range(max(i, 0), len(specs)) if sizes[j]]
    if remaining == 0 and i >= 0:
        unfilled = [specs[j][0] for j in range(i + 1, len(specs)) if sizes[j]]
    if unfilled:
        raise ValueError(f"the blocks ended before filling {unfilled}")


__all__ = ["DTYPE_NAMES", "write_safetensors_blocks"]
