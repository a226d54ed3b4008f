"""The standard (ReLU) SAE (``fastsae.saes.standard``) on its own.

Inference: hook_z reshaping is refused for an SAE reading a non-``_z`` hook, as in
sae-lens. Training: the MSE and Lp sparsity losses equal a hand-written float64 formula,
and the ghost-grads loss (which SAELens 6 dropped) is present exactly when there are
dead latents in training mode, finite, and reaches only the dead latents' encoder
columns. Training sizes are ``sae_cases``'s training ones.
"""

from __future__ import annotations

import pytest
import torch
from sae_cases import (
    FP32_VS_FP64_TOL,
    HOOK_NAME,
    _assert_scalar_close,
    _dead_mask,
    _make_pair,
    _randomize,
    _run,
    _x,
    cfg_kwargs,
)
from sae_cases import TRAIN_D_IN as D_IN
from sae_cases import TRAIN_D_SAE as D_SAE
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAEMetadata as SLMetadata

import fastsae
from fastsae.saes import (
    StandardTrainingSAEConfig,
    TrainStepInput,
    training_sae_class_for_architecture,
)
from fastsae.saes.config import SAEMetadata


# --------------------------------------------------------------------------- inference
def test_hook_z_rejects_non_hook_z_sae():
    """Both refuse hook_z reshaping for an SAE that reads a non-``_z`` hook."""
    ck = cfg_kwargs("standard", reshape_activations="hook_z")
    their_cls, their_cfg_cls = get_sae_class("standard")
    with pytest.raises(ValueError):
        their_cls(their_cfg_cls(**ck, metadata=SLMetadata(hook_name=HOOK_NAME)))
    with pytest.raises(ValueError):
        fastsae.StandardSAE(
            fastsae.StandardSAEConfig(**ck, metadata=SAEMetadata(hook_name=HOOK_NAME))
        )


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("lp_norm", [1.0, 2.0])
def test_standard_losses_equal_hand_formula_in_float64(lp_norm):
    x = _x(torch.float64)
    coefficient = 0.37
    for dtype, tol in (("float64", 1e-12), ("float32", FP32_VS_FP64_TOL)):
        ours, _ = _make_pair("standard", {"lp_norm": lp_norm}, dtype=dtype)
        out = _run(ours, TrainStepInput, x.to(ours.dtype), {"l1": coefficient}, None)
        W_enc, b_enc = ours.W_enc.detach().double(), ours.b_enc.detach().double()
        W_dec, b_dec = ours.W_dec.detach().double(), ours.b_dec.detach().double()
        acts = ((x - b_dec) @ W_enc + b_enc).relu()
        mse = ((acts @ W_dec + b_dec - x) ** 2).sum(-1).mean()
        weighted = acts * W_dec.norm(dim=1)
        l1 = coefficient * (weighted.abs() ** lp_norm).sum(-1) ** (1 / lp_norm)
        _assert_scalar_close(out.losses["mse_loss"], mse, tol, f"{dtype} mse")
        _assert_scalar_close(out.losses["l1_loss"], l1.mean(), tol, f"{dtype} l1")


def test_ghost_grads_loss_only_with_dead_latents_in_training():
    """SAELens 6 dropped ghost grads, so no parity: it is present exactly when it should
    be, finite, and reaches the dead latents' encoder columns (through exp)."""
    ours = training_sae_class_for_architecture("standard")(
        StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, use_ghost_grads=True)
    )
    _randomize(ours)
    x, mask = _x(), _dead_mask(40)
    assert "ghost_grad_loss" not in _run(ours, TrainStepInput, x, {"l1": 0.1}, None).losses
    assert (
        "ghost_grad_loss"
        not in _run(ours, TrainStepInput, x, {"l1": 0.1}, torch.zeros_like(mask)).losses
    )
    ours.eval()
    assert "ghost_grad_loss" not in _run(ours, TrainStepInput, x, {"l1": 0.1}, mask).losses
    ours.train()
    out = _run(ours, TrainStepInput, x, {"l1": 0.1}, mask)
    ghost = out.losses["ghost_grad_loss"]
    assert torch.isfinite(ghost) and float(ghost.detach()) > 0
    assert float(out.loss.detach()) == pytest.approx(
        sum(float(v.detach()) for v in out.losses.values()), rel=1e-6
    )
    ghost.backward()
    assert ours.W_enc.grad[:, mask].abs().sum() > 0
    assert ours.W_enc.grad[:, ~mask].abs().sum() == 0
