"""Comparison helpers shared by the test files (importable: conftest puts tests/ on sys.path)."""

import math

import torch

FP32_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are zero, inf when only b is)."""
    a64, b64 = a.detach().double(), b.detach().double()
    num, den = (a64 - b64).norm().item(), b64.norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = FP32_TOL, what: str = ""):
    """Same shape, a non-vacuous reference, and relative error within ``tol``."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ref.detach().abs().sum() > 0, f"{what}: reference is all zeros (a vacuous test)"
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
