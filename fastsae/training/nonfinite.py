"""Non-finite values in a training run: the error a trainer raises at the step where a
NaN or inf appears, and the checks that tell where it came from.

A NaN in one activation makes every parameter NaN a few steps later, and training then
goes on silently to the end. The trainer checks every step's loss and gradient norm
(scalars it has anyway; one host sync per step), refuses to save non-finite weights,
and raises :class:`NonFiniteLossError` naming the step and the rows of the batch that
hold non-finite activations, or skips the batch when ``skip_nonfinite_batches`` is set.
"""

from __future__ import annotations

import torch
from torch import Tensor

# how many batches in a row skip_nonfinite_batches skips before it calls the data broken
MAX_CONSECUTIVE_SKIPS = 100


class NonFiniteLossError(RuntimeError):
    """A training step produced a non-finite loss or gradient (or the SAE holds
    non-finite weights). ``step``: the 1-based number of the step, as in
    ``metrics.jsonl``; ``rows``: the rows of this process's batch that hold non-finite
    activations (empty when the inputs were finite); ``weights_finite``: whether the
    SAE's weights were still finite (then the batch can be skipped)."""

    def __init__(
        self,
        message: str,
        *,
        step: int,
        rows: list[int] | None = None,
        weights_finite: bool = True,
    ):
        super().__init__(message)
        self.step = step
        self.rows = list(rows or [])
        self.weights_finite = weights_finite


def nonfinite_rows(batch: Tensor) -> list[int]:
    """Indices of the rows of a ``[batch, d_in]`` tensor that hold a NaN or an inf."""
    return torch.nonzero(~torch.isfinite(batch).all(dim=-1)).flatten().tolist()


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers that hold a NaN or an
    inf."""
    return [
        name
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())
    ]


def describe_rows(rows: list[int], limit: int = 10) -> str:
    """``"rows [3, 17]"``, shortened past ``limit`` rows."""
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f", ... ({len(rows)} rows)" if len(rows) > limit else ""
    return f"rows [{shown}{more}]"


__all__ = [
    "MAX_CONSECUTIVE_SKIPS",
    "NonFiniteLossError",
    "describe_rows",
    "nonfinite_parameters",
    "nonfinite_rows",
]
