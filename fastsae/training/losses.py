"""Training losses shared by the training SAEs (same maths as SAELens 6.x).

Shapes: ``sae_in``/``sae_out``/``residual`` are ``[batch, d_in]``, ``hidden_pre``
``[batch, d_sae]`` (or ``[batch, n_dead]`` for the dead-subset forms), masks ``[d_sae]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def rectangle(x: Tensor) -> Tensor:
    """1 on (-1/2, 1/2), else 0: the kernel of the JumpReLU straight-through estimator."""
    return ((x > -0.5) & (x < 0.5)).to(x)


class StepFunction(torch.autograd.Function):
    """``H(h - threshold)`` whose threshold gradient is the rectangle-kernel estimate.

    Backward: ``d threshold = -sum_batch rectangle((h - t)/bw) / bw * grad``; with
    ``ste_to_input`` the negation also flows to ``h`` (Anthropic's setup).
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool):  # type: ignore[override]
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input
        return (h > threshold).to(h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        h, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        ste = rectangle((h - threshold) / bw) * grad / bw
        d_threshold = -ste.sum(dim=0)
        return (ste if ctx.ste_to_input else None), d_threshold, None, None


class JumpReLUFunction(torch.autograd.Function):
    """``h * H(h - threshold)``; threshold gradient ``-(t / bw) * rectangle((h - t)/bw) * grad``."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool):  # type: ignore[override]
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input
        return (h * (h > threshold)).to(h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        h, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        ste = (threshold / bw) * rectangle((h - threshold) / bw) * grad
        d_threshold = -ste.sum(dim=0)
        d_h = (h > threshold) * grad
        if ctx.ste_to_input:
            d_h = d_h + ste
        return d_h, d_threshold, None, None


def pre_act_loss(
    coefficient: float,
    threshold: Tensor,
    hidden_pre: Tensor,
    dead_neuron_mask: Tensor | None,
    W_dec_norm: Tensor,
) -> Tensor:
    """Anthropic's pre-activation loss, on dead latents only: pushes them up to threshold."""
    if dead_neuron_mask is None or not bool(dead_neuron_mask.any()):
        return hidden_pre.new_tensor(0.0)
    per_item = ((threshold - hidden_pre).relu() * dead_neuron_mask * W_dec_norm).sum(dim=-1)
    return coefficient * per_item.mean()


def ghost_grad_loss(
    sae_in: Tensor,
    sae_out: Tensor,
    elementwise_mse: Tensor,
    hidden_pre: Tensor,
    W_dec: Tensor,
    dead_neuron_mask: Tensor,
) -> Tensor:
    """Ghost grads (Anthropic, Jan 2024; SAELens < 6): dead latents, through ``exp``,
    reconstruct the residual at half its norm, loss rescaled to the MSE's size.

    ``elementwise_mse [batch, d_in]`` is the step's squared error; the rescaling is
    elementwise and the result a mean over all elements, as SAELens 3.x computed it.
    """
    residual = sae_in - sae_out
    residual_norm = residual.norm(dim=-1)
    dead_acts = torch.exp(hidden_pre[:, dead_neuron_mask])
    ghost_out = dead_acts @ W_dec[dead_neuron_mask]
    scale = residual_norm / (1e-6 + ghost_out.norm(dim=-1) * 2)
    ghost_out = ghost_out * scale.unsqueeze(-1).detach()
    ghost_mse = (ghost_out - residual.detach()).pow(2)
    rescale = (elementwise_mse / (ghost_mse + 1e-6)).detach()
    return (rescale * ghost_mse).mean()


def topk_aux_scale(num_dead: int, d_in: int) -> tuple[int, float]:
    """``(k_aux, scale)`` of the TopK auxiliary loss: k_aux = min(d_in // 2, num_dead)
    (Gao et al. 2024, App. B.1), scale = min(num_dead / (d_in // 2), 1)."""
    k_aux = d_in // 2
    return min(k_aux, num_dead), min(num_dead / k_aux, 1.0)
