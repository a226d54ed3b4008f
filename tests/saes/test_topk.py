"""TopK and AbsTopK (``fastsae.saes.topk``) on their own.

Inference, against sae-lens: ``rescale_acts_by_decoder_norm`` (outputs and gradients),
sparse codes with exactly k entries per token, ``k > d_sae`` refused. Training: the MSE
and AuxK losses equal a hand-written float64 formula, a hook on ``hook_sae_acts_pre``
switches the sparse step to the dense path, ``to_inference_sae`` copies, AuxK refuses
run-time normalisation as sae-lens does, ``matvec_upcast`` blocks, and bf16 weights'
sparse-step gradients match the dense step's. Inference sizes are ``sae_cases``'s
``D_IN``/``D_SAE``/``K`` (k=5); the training tests spell their k=7 ``TRAIN_K``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from sae_cases import (
    D_IN,
    D_SAE,
    FP32_VS_FP64_TOL,
    SHAPES,
    TOPK_ARCHS,
    TRAIN_K,
    K,
    _assert_scalar_close,
    _dead_mask,
    _grad_case,
    _make_pair,
    _run,
    _x,
    check_encode_decode_forward,
    make_input,
    make_pair,
)
from sae_lens.saes.sae import TrainStepInput as SLTrainStepInput
from sae_testing import assert_close

import fastsae
from fastsae.saes import TrainStepInput
from fastsae.saes.topk import TopKSAEConfig


# --------------------------------------------------------------------------- inference
@pytest.mark.parametrize("arch", TOPK_ARCHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("normalize_activations", ["none", "layer_norm"])
def test_topk_rescale_acts_by_decoder_norm(arch, shape, normalize_activations):
    ours, theirs = make_pair(
        arch, rescale_acts_by_decoder_norm=True, normalize_activations=normalize_activations
    )
    norms = ours.W_dec.norm(dim=-1)
    assert (norms - 1).abs().max() > 0.1, "test setup: decoder norms should not be 1"
    check_encode_decode_forward(ours, theirs, make_input(SHAPES[shape]))
    # the rescale changes the selection: without it the code would differ
    plain, _ = make_pair(arch, rescale_acts_by_decoder_norm=False)
    x = make_input(SHAPES[shape])
    assert not torch.equal(plain.encode(x) != 0, theirs.encode(x) != 0)


@pytest.mark.parametrize("arch", TOPK_ARCHS)
def test_gradients_topk_rescaled(arch):
    ours, theirs = make_pair(arch, rescale_acts_by_decoder_norm=True)
    _grad_case(ours, theirs, make_input(SHAPES["3d"]), weighted=True)


@pytest.mark.parametrize("arch", TOPK_ARCHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_topk_sparse_code_has_exactly_k_entries(arch, shape):
    ours, theirs = make_pair(arch)
    x = make_input(SHAPES[shape])
    code = ours.encode_sparse(x)
    lead = SHAPES[shape][:-1]
    assert code.values.shape == (*lead, K)
    assert code.indices.shape == (*lead, K)
    assert not code.indices.dtype.is_floating_point
    assert int(code.indices.min()) >= 0 and int(code.indices.max()) < D_SAE
    # k distinct latents per token
    flat_idx = code.indices.reshape(-1, K)
    assert all(len(set(row.tolist())) == K for row in flat_idx)
    # the selected latents are the non-zeros of sae-lens's dense code
    dense_t = theirs.encode(x).reshape(-1, D_SAE)
    for row_idx, row_vals, row_dense in zip(
        flat_idx, code.values.reshape(-1, K), dense_t, strict=True
    ):
        assert set(row_dense.nonzero().flatten().tolist()) <= set(row_idx.tolist())
        torch.testing.assert_close(row_vals, row_dense[row_idx])


def test_topk_k_larger_than_d_sae_raises():
    with pytest.raises(ValueError, match=r"\bk\b"):
        TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=D_SAE + 1)
    assert TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=D_SAE).k == D_SAE


# --------------------------------------------------------------------------- training
def _hand_topk_losses(ours, x, mask, *, rescale: bool, aux_coefficient: float):
    """TopK's MSE and AuxK written out in float64 from the SAE's (float64) weights."""
    W_enc, b_enc = ours.W_enc.detach().double(), ours.b_enc.detach().double()
    W_dec, b_dec = ours.W_dec.detach().double(), ours.b_dec.detach().double()
    x = x.double()
    h = (x - b_dec) @ W_enc + b_enc
    norm = W_dec.norm(dim=1) if rescale else torch.ones(W_dec.shape[0], dtype=torch.float64)
    h = h * norm
    vals, idx = h.topk(ours.cfg.k, dim=-1)
    acts = torch.zeros_like(h).scatter(-1, idx, vals.relu())
    out = (acts / norm) @ W_dec + b_dec
    mse = (out - x).pow(2).sum(-1).mean()
    n_dead = int(mask.sum())
    half = x.shape[-1] // 2
    k_aux = min(half, n_dead)
    dead_h = torch.where(mask, h, torch.tensor(-math.inf, dtype=torch.float64))
    avals, aidx = dead_h.topk(k_aux, dim=-1)
    aux_acts = torch.zeros_like(h).scatter(-1, aidx, avals)
    recons = (aux_acts / norm) @ W_dec
    aux = (recons - (x - out)).pow(2).sum(-1).mean()
    return float(mse), aux_coefficient * min(n_dead / half, 1.0) * float(aux)


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "norescale"])
@pytest.mark.parametrize("n_dead", [10, 100], ids=["fewdead", "manydead"])
def test_topk_losses_equal_hand_formula_in_float64(rescale, n_dead):
    kwargs = {"k": TRAIN_K, "rescale_acts_by_decoder_norm": rescale, "aux_loss_coefficient": 0.7}
    x, mask = _x(torch.float64), _dead_mask(n_dead)
    for dtype, tol in (("float64", 1e-12), ("float32", FP32_VS_FP64_TOL)):
        ours, _ = _make_pair("topk", kwargs, dtype=dtype)
        out = _run(ours, TrainStepInput, x.to(ours.dtype), {}, mask)
        mse, aux = _hand_topk_losses(ours, x, mask, rescale=rescale, aux_coefficient=0.7)
        _assert_scalar_close(out.losses["mse_loss"], mse, tol, f"{dtype} mse")
        _assert_scalar_close(out.losses["auxiliary_reconstruction_loss"], aux, tol, f"{dtype} auxk")


def test_hook_on_acts_pre_also_switches_to_the_dense_path():
    ours, _ = _make_pair("topk", {"k": TRAIN_K})
    ours.hook_sae_acts_pre.add_hook(lambda act, hook: act)
    try:
        out = _run(ours, TrainStepInput, _x(), {}, None)
    finally:
        ours.reset_hooks()
    assert out.code is None
    assert _run(ours, TrainStepInput, _x(), {}, None).code is not None


def test_to_inference_sae_is_a_copy():
    ours, _ = _make_pair("topk", {"k": TRAIN_K})
    inference = ours.to_inference_sae()
    assert type(inference) is fastsae.TopKSAE
    with torch.no_grad():
        inference.W_enc.zero_()
    assert ours.W_enc.abs().sum() > 0


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm"])
def test_auxk_refuses_run_time_normalisation_like_sae_lens(mode):
    ours, theirs = _make_pair("topk", {"k": TRAIN_K, "normalize_activations": mode})
    x, mask = _x(), _dead_mask(10)
    with pytest.raises(ValueError, match=mode):
        _run(theirs, SLTrainStepInput, x, {}, mask)
    with pytest.raises(ValueError, match=mode):
        _run(ours, TrainStepInput, x, {}, mask)


def test_matvec_upcast_blocks_equal_one_matvec_and_hold_no_full_copy():
    from live_tensors import LiveTensors

    from fastsae.saes.topk import matvec_upcast

    g_ = torch.Generator().manual_seed(0)
    W = torch.randn(64, 1000, generator=g_).bfloat16()
    g = torch.randn(1000, generator=g_)
    want = W.double() @ g.double()
    block = 64 * 4 * 37  # 37 columns in fp32 per block, ragged last block
    with LiveTensors(min_bytes=1024, exclude=(W, g)) as live:
        got = matvec_upcast(W, g, block_bytes=block)
    assert got.dtype == torch.float32
    assert_close(got, want, 1e-6, "blocked W @ g")
    assert live.peak <= 2 * block, live.peak  # one upcast block (+ its product), not W
    assert torch.equal(matvec_upcast(W.float(), g), W.float() @ g)  # same dtype: one matvec


def test_bf16_weights_sparse_step_gradients_match_the_dense_step():
    """bf16 SAE weights: the sparse step (b_dec's gradient through the encoder input from
    the blocked fp32 matvec) against the dense step, within bf16 rounding."""
    x = _x(torch.bfloat16)
    ours, _ = _make_pair("topk", {"k": TRAIN_K}, dtype="bfloat16")
    dense_sae = copy.deepcopy(ours)
    out = _run(ours, TrainStepInput, x, {}, None)
    assert out.code is not None
    dense_sae.hook_sae_acts_post.add_hook(lambda act, hook: act)
    try:
        dense = _run(dense_sae, TrainStepInput, x, {}, None)
    finally:
        dense_sae.reset_hooks()
    assert dense.code is None
    out.loss.backward()
    dense.loss.backward()
    dense_params = dict(dense_sae.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad.dtype == torch.bfloat16
        assert_close(p.grad, dense_params[name].grad, 2e-2, f"grad {name}")
