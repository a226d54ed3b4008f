"""Kernel tests run where Triton can: on CUDA, or on CPU under TRITON_INTERPRET=1
(set in the environment before pytest starts: the README's interpreter lane)."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()

if not (INTERPRET or HAS_CUDA):
    pytestmark_reason = "needs CUDA or TRITON_INTERPRET=1 (the interpreter lane)"
else:
    pytestmark_reason = ""


def pytest_collection_modifyitems(config, items):
    if not pytestmark_reason:
        return
    skip = pytest.mark.skip(reason=pytestmark_reason)
    for item in items:
        if "tests/kernels" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def batch_sizes() -> tuple[int, ...]:
    # the interpreter runs every program in Python: keep its shapes small
    return (1, 333) if HAS_CUDA else (1, 33)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Make every ``torch.empty`` return NaN (floats) or -1 (ints), so an output element a
    kernel forgets to write shows up in the comparison."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture
def auto_means_triton(monkeypatch):
    """Point ``impl="auto"`` at the kernels (for CPU tensors under the interpreter too);
    returns the list of ops that took the Triton path."""
    from fastsae import ops

    real = ops._use_triton
    calls = []

    def use_triton(op, impl, tensors, has_kernel):
        if impl == "auto" and has_kernel:
            calls.append(op)
            return True
        return real(op, impl, tensors, has_kernel)

    monkeypatch.setattr(ops, "_use_triton", use_triton)
    return calls
