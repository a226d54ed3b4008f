"""Every training loss, in one place (same maths as SAELens 6.x): the reconstruction
error, the JumpReLU step function and its straight-through estimators, the
pre-activation and ghost-gradient losses, and AuxK with a pluggable selection (the
latent-sharded TopK selects across ranks with the same function).

Shapes: ``sae_in``/``sae_out``/``residual`` are ``[batch, d_in]``, ``hidden_pre``
``[batch, d_sae]`` (or ``[batch, n_dead]`` for the dead-subset forms), masks ``[d_sae]``.
"""

from __future__ import annotations

from collections.abc import Callable
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


def mse_loss(preds: Tensor, target: Tensor) -> Tensor:
    """Elementwise squared error (SAELens's ``mse_loss_fn``), ``[batch, d_in]``."""
    return torch.nn.functional.mse_loss(preds, target, reduction="none")


def total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The sum of a step's named losses, in their order."""
    total = None
    for value in losses.values():
        total = value if total is None else total + value
    assert total is not None
    return total


def topk_rows(h: Tensor, k: int) -> Tensor:
    """``h`` with each row's k largest entries kept and the rest 0: AuxK's selection on
    one device."""
    values, indices = h.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter(-1, indices, values)


def auxk_loss(
    x: Tensor,
    sae_out: Tensor,
    h_dead: Tensor,
    W_dec_dead: Tensor,
    num_dead: int,
    coefficient: float,
    *,
    dec_norm: Tensor | None = None,
    select: Callable[[Tensor, int], Tensor] = topk_rows,
    sum_partial: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """TopK's auxiliary loss (Gao et al. 2024, App. B.1): the ``k_aux`` largest dead
    latents reconstruct the detached residual ``x - sae_out``.

    ``h_dead [batch, n]``: pre-activations of the dead latents (times ``dec_norm`` when
    the SAE rescales by decoder norms); ``W_dec_dead [n, d_in]``; ``num_dead``: dead
    latents in total (``n`` on one device; over all shards when latent-sharded).
    ``select(h_dead, k_aux)`` keeps the chosen entries (:func:`topk_rows` on one device;
    a cross-rank top-k when sharded) and ``sum_partial`` sums the partial
    reconstructions of the shards.
    """
    residual = (x - sae_out).detach()
    k_aux, scale = topk_aux_scale(num_dead, x.shape[-1])
    acts = select(h_dead, k_aux)
    if dec_norm is not None:
        acts = acts * (1 / dec_norm)
    recons = acts @ W_dec_dead
    if sum_partial is not None:
        recons = sum_partial(recons)
    loss = (recons - residual).pow(2).sum(dim=-1).mean()
    return coefficient * scale * loss
