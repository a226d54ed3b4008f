"""BatchTopK and Matryoshka BatchTopK (``fastsae.saes.batchtopk``) training on their own.

Against sae-lens's training classes: the threshold EMA over several steps, a batch
selecting no latent at all, Matryoshka's aux loss with a level holding no dead latent,
the forward on ``[batch, pos, d_in]`` token sequences; and Matryoshka widths get a last
level (d_sae) with a warning. Sizes are ``sae_cases``'s training ones.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from sae_cases import (
    FP32_TOL,
    WIDTHS,
    _assert_grad_close,
    _assert_scalar_close,
    _compare_steps,
    _dead_mask,
    _make_pair,
    _run,
    _x,
)
from sae_cases import TRAIN_D_IN as D_IN
from sae_cases import TRAIN_D_SAE as D_SAE
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput as SLTrainStepInput
from sae_testing import assert_close

import fastsae
from fastsae.saes import MatryoshkaBatchTopKTrainingSAEConfig, TrainStepInput


def test_matryoshka_aux_loss_with_a_level_without_dead_latents():
    """Dead latents only in the outer levels: the first level's aux term is skipped."""
    kwargs = {"k": 4.5, "matryoshka_widths": WIDTHS, "use_matryoshka_aux_loss": True}
    ours, theirs = _make_pair("matryoshka_batchtopk", kwargs)
    x, mask = _x(), _dead_mask(30, low=WIDTHS[0])
    assert not mask[: WIDTHS[0]].any()
    out_o = _run(ours, TrainStepInput, x, {}, mask)
    out_t = _run(theirs, SLTrainStepInput, x, {}, mask)
    _compare_steps(ours, theirs, out_o, out_t, FP32_TOL)


def test_batchtopk_threshold_after_steps_matches_sae_lens():
    ours, theirs = _make_pair("batchtopk", {"k": 4.5, "topk_threshold_lr": 0.2})
    for step in range(3):
        x = _x(seed=step)
        out_o = _run(ours, TrainStepInput, x, {}, None)
        out_t = _run(theirs, SLTrainStepInput, x, {}, None)
        assert ours.topk_threshold.dtype == torch.float64
        _assert_scalar_close(ours.topk_threshold, theirs.topk_threshold, 1e-12, "topk_threshold")
        _assert_scalar_close(
            out_o.metrics["topk_threshold"], out_t.metrics["topk_threshold"], 1e-12, "metric"
        )
    assert float(ours.topk_threshold) != 0.37  # it moved


def test_matryoshka_widths_get_a_last_level():
    with pytest.warns(UserWarning, match="matryoshka"):
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=4.5, matryoshka_widths=[20, 90]
        )
    assert cfg.matryoshka_widths == [20, 90, D_SAE]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=4.5, matryoshka_widths=WIDTHS
        )


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_selecting_nothing_matches_sae_lens(arch):
    """k * batch < 1: no latent is selected; the step still works and matches."""
    kwargs = {"k": 0.01}
    if arch == "matryoshka_batchtopk":
        kwargs.update(matryoshka_widths=WIDTHS, use_matryoshka_aux_loss=True)
    ours, theirs = _make_pair(arch, kwargs)
    x, mask = _x(), _dead_mask(100)
    out_o = _run(ours, TrainStepInput, x, {}, mask)
    out_t = _run(theirs, SLTrainStepInput, x, {}, mask)
    assert out_t.feature_acts.abs().sum() == 0 and out_o.feature_acts.abs().sum() == 0
    assert out_o.l0() == 0
    assert set(out_o.losses) == set(out_t.losses)
    for name in out_t.losses:
        _assert_scalar_close(out_o.losses[name], out_t.losses[name], FP32_TOL, name)
    out_o.loss.backward()
    out_t.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        _assert_grad_close(p.grad, theirs_params[name].grad, FP32_TOL, f"grad {name}")
    assert float(ours.topk_threshold) == float(theirs.topk_threshold) == 0.37


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_forward_on_token_sequences_matches_sae_lens(arch):
    """A training BatchTopK SAE spliced into a model sees ``[batch, pos, d_in]`` (the
    runner's CE-loss evals do this): the batch is every token, as in SAELens."""
    from fastsae.saes import training_sae_class_for_architecture

    kw = dict(d_in=16, d_sae=64, k=4.0)
    if arch == "matryoshka_batchtopk":
        kw["matryoshka_widths"] = [16, 64]
    torch.manual_seed(0)
    ours = training_sae_class_for_architecture(arch)(
        fastsae.saes.training_sae.TrainingSAEConfig.from_dict({"architecture": arch, **kw})
    )
    theirs_cls, theirs_cfg_cls = get_sae_training_class(arch)
    theirs = theirs_cls(theirs_cfg_cls(**kw))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(x), theirs(x), 1e-6, "forward")
        assert_close(ours.encode(x), theirs.encode(x), 1e-6, "encode")
    assert ours.encode(x).shape == (3, 5, 64)
