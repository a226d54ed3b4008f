"""Float64 dense references that the kernel tests check the Triton and torch paths against.

Each oracle recomputes an op densely in float64 from the op's inputs (upcast), so its
rounding error is far below the tolerance of any dtype under test; the tests compare
values and gradients against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: relative tolerance of an op's result against the float64 oracle, per input dtype
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def leaves64(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Detached float64 copies of ``tensors`` that collect their own gradients."""
    return tuple(t.detach().double().requires_grad_() for t in tensors)


def encoder_preacts64(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, dec_norm: Tensor | None = None
) -> Tensor:
    """``(x @ W_enc + b_enc) * dec_norm`` in float64 (``dec_norm`` optional)."""
    h = x.double() @ W_enc.double() + b_enc.double()
    return h * dec_norm.double() if dec_norm is not None else h


def jumprelu_active64(h: Tensor, threshold: Tensor) -> Tensor:
    """The latents JumpReLU keeps: above their threshold and above 0."""
    return (h > threshold.double()) & (h > 0)


def dense_code64(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """A sparse code ``(values, indices) [B, K]`` as a dense float64 ``[B, n_latents]``."""
    dense = torch.zeros(values.shape[0], n_latents, dtype=torch.float64, device=values.device)
    return dense.scatter_add(1, indices.long(), values.double())


def sparse_decode64(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None = None
) -> Tensor:
    """``dense(values, indices) @ W_dec (+ b_dec)`` in float64."""
    out = dense_code64(values, indices, W_dec.shape[0]) @ W_dec.double()
    return out + b_dec.double() if b_dec is not None else out


def segment_rows_sum64(weights: Tensor, indices: Tensor, X: Tensor, n_rows: int) -> Tensor:
    """``out[n] = sum over (b, j) with indices[b, j] == n of weights[b, j] * X[b]``, float64."""
    out = torch.zeros(n_rows, X.shape[1], dtype=torch.float64, device=X.device)
    contrib = weights.double()[..., None] * X.double()[:, None, :]
    return out.index_add_(0, indices.reshape(-1), contrib.reshape(-1, X.shape[1]))
