"""Peak bytes of tensors created during a block of code, at op granularity.

A ``TorchDispatchMode`` that records the storage of every tensor an op returns (at
least ``min_bytes`` large, not one of the ``exclude`` storages that existed before,
e.g. parameters seen through views) and, after every op, sums the storages that some
tensor still holds. Allocations inside the Triton interpreter (its host copies of
kernel arguments) are not counted: on a GPU they do not exist.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _in_triton_interpreter() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if "triton/runtime/interpreter" in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back
    return False


class LiveTensors(TorchDispatchMode):
    def __init__(self, min_bytes: int = 1, exclude: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.min_bytes = min_bytes
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, tuple[int, list[weakref.ref]]] = {}
        self.peak = 0
        self.peak_op = ""

    def live_bytes(self) -> int:
        total = 0
        for key, (nbytes, refs) in list(self.storages.items()):
            if any(r() is not None for r in refs):
                total += nbytes
            else:
                del self.storages[key]
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _in_triton_interpreter():
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() >= self.min_bytes and ptr not in self.exclude:
                self.storages.setdefault(ptr, (storage.nbytes(), []))[1].append(weakref.ref(t))
        live = self.live_bytes()
        if live > self.peak:
            self.peak, self.peak_op = live, str(func)
        return out
