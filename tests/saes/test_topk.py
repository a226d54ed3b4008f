"""TopK and AbsTopK (``fastsae.saes.topk``) on their own.

Inference, against sae-lens: ``rescale_acts_by_decoder_norm`` (outputs and gradients),
sparse codes with exactly k entries per token, ``k > d_sae`` refused. Training (TopK and
AbsTopK): the MSE and AuxK losses equal a hand-written float64 formula, a hook on
``hook_sae_acts_pre`` switches the sparse step to the dense path, ``to_inference_sae``
copies, AuxK refuses run-time normalisation as sae-lens does, ``matvec_upcast`` blocks,
and bf16 weights' sparse-step gradients match the dense step's. AbsTopK training:
negative activations kept with their sign (and counted as firing), AuxK chooses dead
latents by ``|hidden_pre|``, the saved SAE is an ``abstopk`` one, the runner config
takes ``architecture="abstopk"`` and a short run trains it. Inference sizes are
``sae_cases``'s ``D_IN``/``D_SAE``/``K`` (k=5); the training tests spell their k=7
``TRAIN_K``.
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
from fastsae.saes.topk import (
    AbsTopKSAE,
    AbsTopKTrainingSAE,
    AbsTopKTrainingSAEConfig,
    TopKSAEConfig,
    abs_topk_rows,
)


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
def _hand_topk_losses(
    ours, x, mask, *, rescale: bool, aux_coefficient: float, abs_select: bool = False
):
    """TopK's (``abs_select``: AbsTopK's) MSE and AuxK written out in float64 from the
    SAE's (float64) weights."""
    W_enc, b_enc = ours.W_enc.detach().double(), ours.b_enc.detach().double()
    W_dec, b_dec = ours.W_dec.detach().double(), ours.b_dec.detach().double()
    x = x.double()
    h = (x - b_dec) @ W_enc + b_enc
    norm = W_dec.norm(dim=1) if rescale else torch.ones(W_dec.shape[0], dtype=torch.float64)
    h = h * norm
    if abs_select:  # the k largest |h|, signed values
        idx = h.abs().topk(ours.cfg.k, dim=-1).indices
        acts = torch.zeros_like(h).scatter(-1, idx, h.gather(-1, idx))
    else:
        vals, idx = h.topk(ours.cfg.k, dim=-1)
        acts = torch.zeros_like(h).scatter(-1, idx, vals.relu())
    out = (acts / norm) @ W_dec + b_dec
    mse = (out - x).pow(2).sum(-1).mean()
    n_dead = int(mask.sum())
    half = x.shape[-1] // 2
    k_aux = min(half, n_dead)
    key = h.abs() if abs_select else h
    dead_key = torch.where(mask, key, torch.tensor(-math.inf, dtype=torch.float64))
    aidx = dead_key.topk(k_aux, dim=-1).indices
    aux_acts = torch.zeros_like(h).scatter(-1, aidx, h.gather(-1, aidx))
    recons = (aux_acts / norm) @ W_dec
    aux = (recons - (x - out)).pow(2).sum(-1).mean()
    return float(mse), aux_coefficient * min(n_dead / half, 1.0) * float(aux)


@pytest.mark.parametrize("arch", TOPK_ARCHS)
@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "norescale"])
@pytest.mark.parametrize("n_dead", [10, 100], ids=["fewdead", "manydead"])
def test_topk_losses_equal_hand_formula_in_float64(arch, rescale, n_dead):
    kwargs = {"k": TRAIN_K, "rescale_acts_by_decoder_norm": rescale, "aux_loss_coefficient": 0.7}
    x, mask = _x(torch.float64), _dead_mask(n_dead)
    for dtype, tol in (("float64", 1e-12), ("float32", FP32_VS_FP64_TOL)):
        ours, _ = _make_pair(arch, kwargs, dtype=dtype)
        out = _run(ours, TrainStepInput, x.to(ours.dtype), {}, mask)
        mse, aux = _hand_topk_losses(
            ours, x, mask, rescale=rescale, aux_coefficient=0.7, abs_select=arch == "abstopk"
        )
        _assert_scalar_close(out.losses["mse_loss"], mse, tol, f"{dtype} mse")
        _assert_scalar_close(out.losses["auxiliary_reconstruction_loss"], aux, tol, f"{dtype} auxk")


@pytest.mark.parametrize("arch", TOPK_ARCHS)
def test_hook_on_acts_pre_also_switches_to_the_dense_path(arch):
    ours, _ = _make_pair(arch, {"k": TRAIN_K})
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


@pytest.mark.parametrize("arch", TOPK_ARCHS)
@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm"])
def test_auxk_refuses_run_time_normalisation_like_sae_lens(arch, mode):
    ours, theirs = _make_pair(arch, {"k": TRAIN_K, "normalize_activations": mode})
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


@pytest.mark.parametrize("arch", TOPK_ARCHS)
def test_bf16_weights_sparse_step_gradients_match_the_dense_step(arch):
    """bf16 SAE weights: the sparse step (b_dec's gradient through the encoder input from
    the blocked fp32 matvec) against the dense step, within bf16 rounding."""
    x = _x(torch.bfloat16)
    ours, _ = _make_pair(arch, {"k": TRAIN_K}, dtype="bfloat16")
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


# --------------------------------------------------------------------------- AbsTopK training
def test_abstopk_training_config_matches_sae_lens():
    """Same fields and defaults as sae-lens's config, architecture ``abstopk``, saved as
    ``abstopk``."""
    from dataclasses import fields

    from sae_lens import AbsTopKTrainingSAEConfig as SLConfig

    ours = AbsTopKTrainingSAEConfig(d_in=D_IN, d_sae=200)  # d_sae >= the default k
    theirs = SLConfig(d_in=D_IN, d_sae=200)
    assert ours.architecture() == theirs.architecture() == "abstopk"
    assert ours.inference_architecture() == "abstopk"
    assert ours.get_inference_config_class() is fastsae.AbsTopKSAEConfig
    for f in fields(theirs):
        if f.name != "metadata":
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert (ours.k, ours.aux_loss_coefficient, ours.rescale_acts_by_decoder_norm) == (
        100,
        1.0,
        True,
    )
    assert fastsae.saes.training_sae_class_for_architecture("abstopk") is AbsTopKTrainingSAE
    assert fastsae.AbsTopKTrainingSAE is fastsae.training.AbsTopKTrainingSAE is AbsTopKTrainingSAE
    # latent sharding is TopK's only: refused by name
    with pytest.raises(NotImplementedError, match="not 'abstopk'"):
        fastsae.saes.sharded_class_for_architecture("abstopk")


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "norescale"])
def test_abstopk_step_keeps_negative_activations_with_their_sign(rescale):
    ours, _ = _make_pair("abstopk", {"k": TRAIN_K, "rescale_acts_by_decoder_norm": rescale})
    x = _x()
    out = _run(ours, TrainStepInput, x, {}, None)
    assert out.code is not None  # the sparse step
    values, indices = out.code
    assert values.shape == (x.shape[0], TRAIN_K)
    assert (values < 0).any() and (values > 0).any()
    # the code is the k largest |hidden_pre| of each token, signed (decoder-norm scaled)
    hidden_pre = out.hidden_pre
    want = hidden_pre.abs().topk(TRAIN_K, dim=-1).indices.sort(-1).values
    assert torch.equal(indices.sort(-1).values, want)
    torch.testing.assert_close(values, hidden_pre.gather(-1, indices))
    # negative latents fired: counted as firing and in l0, as SAELens's trainer does
    assert float(out.l0()) == TRAIN_K
    fired = out.fired()
    negative_only = torch.zeros_like(fired).index_add_(
        0, indices.reshape(-1), (values < 0).reshape(-1).float()
    )
    assert torch.equal(fired > 0, (out.feature_acts != 0).any(0))
    assert ((negative_only > 0) & (fired > 0)).any()
    # TopK on the same weights would ReLU them away
    topk, _ = _make_pair("topk", {"k": TRAIN_K, "rescale_acts_by_decoder_norm": rescale})
    assert (_run(topk, TrainStepInput, x, {}, None).feature_acts >= 0).all()


def test_abstopk_auxk_selects_dead_latents_by_magnitude():
    """AuxK takes the dead latents of largest ``|hidden_pre|``, signed: with the dead
    latents' pre-activations pushed far below zero, TopK's signed selection and AbsTopK's
    magnitude selection pick different latents, and AbsTopK's is sae-lens's."""
    from sae_lens.saes.abstopk_sae import calculate_abstopk_aux_acts

    h = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    kept = abs_topk_rows(h, 5)
    mask = torch.ones(40, dtype=torch.bool)
    assert torch.equal(kept, calculate_abstopk_aux_acts(5, h, mask))
    assert (kept < 0).any()

    kwargs = {"k": TRAIN_K, "rescale_acts_by_decoder_norm": False}
    mask = _dead_mask(100)
    x = _x(torch.float64)
    losses = {}
    for arch in ("topk", "abstopk"):
        ours, theirs = _make_pair(arch, kwargs, dtype="float64")
        for sae in (ours, theirs):
            with torch.no_grad():  # dead latents mostly strongly negative
                sae.b_enc[mask] -= 3.0 * (torch.arange(int(mask.sum())) % 3 != 0).double()
        out_o = _run(ours, TrainStepInput, x, {}, mask)
        out_t = _run(theirs, SLTrainStepInput, x, {}, mask)
        aux_o = out_o.losses["auxiliary_reconstruction_loss"]
        _assert_scalar_close(aux_o, out_t.losses["auxiliary_reconstruction_loss"], 1e-10, arch)
        losses[arch] = float(aux_o.detach())
    assert losses["topk"] != pytest.approx(losses["abstopk"], rel=1e-3)


def test_abstopk_saves_as_abstopk_and_loads_in_both_libraries(tmp_path):
    import sae_lens

    ours, _ = _make_pair("abstopk", {"k": TRAIN_K})
    inference = ours.to_inference_sae()
    assert type(inference) is AbsTopKSAE
    x = _x()
    ours.save_inference_model(tmp_path / "sae")
    ours.eval()
    with torch.no_grad():
        want = ours(x)
        assert (ours.encode(x) < 0).any()
        for lib in (fastsae, sae_lens):
            loaded = lib.SAE.load_from_disk(tmp_path / "sae")
            assert type(loaded).__name__ == "AbsTopKSAE", lib.__name__
            assert_close(loaded(x), want, 1e-5, lib.__name__)
    # a training checkpoint reloads as the training class
    ours.save_model(tmp_path / "ck")
    again = fastsae.TrainingSAE.load_from_disk(tmp_path / "ck")
    assert type(again) is AbsTopKTrainingSAE and again.cfg.k == TRAIN_K


def test_runner_config_takes_abstopk_flat_and_nested():
    from fastsae.training import LanguageModelSAERunnerConfig

    flat = LanguageModelSAERunnerConfig(
        architecture="abstopk", d_in=10, expansion_factor=4, k=3, dataset_path="x"
    )
    assert type(flat.sae) is AbsTopKTrainingSAEConfig
    assert (flat.sae.d_sae, flat.sae.k) == (40, 3)
    nested = LanguageModelSAERunnerConfig(
        sae={"architecture": "abstopk", "d_in": 10, "d_sae": 40, "k": 3}, dataset_path="x"
    )
    assert type(nested.sae) is AbsTopKTrainingSAEConfig and nested.sae.k == 3
    again = LanguageModelSAERunnerConfig.from_dict(nested.to_dict())
    assert type(again.sae) is AbsTopKTrainingSAEConfig and again.sae.k == 3


def test_abstopk_trains_through_the_runner(tmp_path):
    import sae_lens
    import tiny_runs

    from fastsae.training import SAETrainingRunner

    cfg = tiny_runs.runner_config(
        tmp_path,
        AbsTopKTrainingSAEConfig(d_in=16, d_sae=64, k=4),
        training_tokens=64 * 6,
        eval_every_n_wandb_logs=10**6,
    )
    runner = SAETrainingRunner(
        cfg,
        override_model=tiny_runs.tiny_model(),
        override_dataset=tiny_runs.token_rows_dataset(200),
        show_progress=False,
    )
    trained = runner.run()
    assert type(trained) is AbsTopKTrainingSAE
    for lib in (fastsae, sae_lens):
        saved = lib.SAE.load_from_disk(tmp_path / "out")
        assert type(saved).__name__ == "AbsTopKSAE" and saved.cfg.k == 4
