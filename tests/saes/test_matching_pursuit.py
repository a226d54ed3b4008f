"""Matching pursuit SAE: parity with sae-lens's ``MatchingPursuitSAE`` /
``MatchingPursuitTrainingSAE`` (same weights copied into both: encode, decode, forward,
gradients, the training step's losses, metrics and gradients), a float64 per-token
reference of the greedy encoder (the batched loop gives every token the code it would
get alone), folders written by one library loaded by the other, configs and their
errors, the tied ``W_enc`` and the folding methods."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import MISSING, fields

import pytest
import sae_lens
import torch
from sae_cases import assert_close, check_encode_decode_forward, make_input, randomize_
from sae_lens import MatchingPursuitSAE as SLMatchingPursuitSAE
from sae_lens import MatchingPursuitSAEConfig as SLMatchingPursuitSAEConfig
from sae_lens import MatchingPursuitTrainingSAE as SLMatchingPursuitTrainingSAE
from sae_lens import MatchingPursuitTrainingSAEConfig as SLMatchingPursuitTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata as SLMetadata
from sae_lens.saes.sae import TrainStepInput as SLTrainStepInput

import fastsae
from fastsae.saes.config import SAEConfig, SAEMetadata
from fastsae.saes.matching_pursuit import (
    MatchingPursuitSAE,
    MatchingPursuitSAEConfig,
    MatchingPursuitTrainingSAE,
    MatchingPursuitTrainingSAEConfig,
    matching_pursuit_encode,
)
from fastsae.saes.registry import (
    sae_class_for_architecture,
    training_config_class_for_architecture,
    training_sae_class_for_architecture,
)
from fastsae.saes.training_sae import TrainingSAE, TrainingSAEConfig, TrainStepInput

ARCH = "matching_pursuit"
D_IN, D_SAE = 12, 40
SHAPES = {"2d": (9, D_IN), "3d": (2, 5, D_IN)}
METADATA = {"hook_name": "blocks.0.hook_resid_pre", "model_name": "gpt2"}
# option sets that take each stopping rule on and off
OPTIONS = {
    "defaults": {},
    "no-threshold": {"residual_threshold": 0.0},
    "threshold-only": {"residual_threshold": 2.0, "stop_on_duplicate_support": False},
    "no-stops": {"residual_threshold": 0.0, "stop_on_duplicate_support": False},
    "capped": {"max_iterations": 3},
    "no-bdec": {"apply_b_dec_to_input": False},
}
MP_FIELDS = {"residual_threshold", "max_iterations", "stop_on_duplicate_support"}


@torch.no_grad()
def _unit_rows_(sae: torch.nn.Module, seed: int) -> None:
    """Random weights with decoder rows of norm 0.6 .. 1.2 (the residual then shrinks
    at every pick, as in a trained matching pursuit SAE)."""
    randomize_(sae, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    norms = 0.6 + 0.6 * torch.rand(D_SAE, 1, generator=gen)
    sae.W_dec.mul_(norms / sae.W_dec.norm(dim=-1, keepdim=True))


def make_pair(seed: int = 0, use_error_term: bool = False, **kwargs):
    """(fastsae, sae-lens) inference SAEs with the same random weights."""
    kw = {"d_in": D_IN, "d_sae": D_SAE, **kwargs}
    ours = MatchingPursuitSAE(
        MatchingPursuitSAEConfig(**kw, metadata=SAEMetadata(**METADATA)), use_error_term
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # sae-lens's use_error_term
        theirs = SLMatchingPursuitSAE(
            SLMatchingPursuitSAEConfig(**kw, metadata=SLMetadata(**METADATA)),
            use_error_term=use_error_term,
        )
    _unit_rows_(ours, seed)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def make_training_pair(seed: int = 0, dtype: str = "float32", **kwargs):
    """(fastsae, sae-lens) training SAEs with the same random weights."""
    kw = {"d_in": D_IN, "d_sae": D_SAE, "dtype": dtype, **kwargs}
    ours = MatchingPursuitTrainingSAE(MatchingPursuitTrainingSAEConfig(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sae-lens: decoder_init_norm -> 1.0
        theirs = SLMatchingPursuitTrainingSAE(SLMatchingPursuitTrainingSAEConfig(**kw))
    _unit_rows_(ours, seed)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def reference_codes(x: torch.Tensor, W_dec: torch.Tensor, cfg) -> torch.Tensor:
    """Matching pursuit of each token on its own, in float64, written from the definition."""
    W = W_dec.detach().double()
    n_steps = cfg.max_iterations or W.shape[1]
    out = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    for t, token in enumerate(x.detach().double()):
        residual = token.clone()
        for _ in range(n_steps):
            scores = (W @ residual).clamp(min=0)
            j = int(scores.argmax())
            coeff = max(float(W[j] @ residual), 0.0)
            new_latent = coeff != 0 and out[t, j] == 0
            out[t, j] += coeff
            residual = residual - coeff * W[j]
            if cfg.stop_on_duplicate_support and not new_latent:
                break
            if cfg.residual_threshold > 0 and float(residual.norm()) < cfg.residual_threshold:
                break
    return out


# --------------------------------------------------------------------------- structure
def test_registered_under_sae_lens_architecture_name():
    assert MatchingPursuitSAEConfig.architecture() == SLMatchingPursuitSAEConfig.architecture()
    assert MatchingPursuitTrainingSAEConfig.architecture() == ARCH
    assert SLMatchingPursuitTrainingSAEConfig.architecture() == ARCH
    assert sae_class_for_architecture(ARCH) is MatchingPursuitSAE
    assert training_sae_class_for_architecture(ARCH) is MatchingPursuitTrainingSAE
    assert training_config_class_for_architecture(ARCH) is MatchingPursuitTrainingSAEConfig
    assert fastsae.SAE.from_dict({"architecture": ARCH, "d_in": 4, "d_sae": 8}).__class__ is (
        MatchingPursuitSAE
    )


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def test_config_fields_and_defaults_match_sae_lens():
    assert {f.name for f in fields(MatchingPursuitSAEConfig)} == {
        f.name for f in fields(SLMatchingPursuitSAEConfig)
    }
    assert _defaults(MatchingPursuitSAEConfig) == _defaults(SLMatchingPursuitSAEConfig)
    assert {f.name for f in fields(MatchingPursuitTrainingSAEConfig)} == {
        f.name for f in fields(SLMatchingPursuitTrainingSAEConfig)
    }
    ours = MatchingPursuitTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)
    with pytest.warns(UserWarning, match="decoder_init_norm"):
        theirs = SLMatchingPursuitTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)
    for name in {f.name for f in fields(ours)} - {"metadata"}:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.residual_threshold, ours.max_iterations) == (1e-2, None)
    assert ours.stop_on_duplicate_support is True and ours.decoder_init_norm == 1.0


def test_parameters_are_W_dec_and_b_dec_and_W_enc_is_tied():
    ours, theirs = make_pair()
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in theirs.named_parameters()
    ]
    assert set(ours.state_dict()) == {"W_dec", "b_dec"}
    assert ours.W_enc.shape == (D_IN, D_SAE)
    assert torch.equal(ours.W_enc, ours.W_dec.T)
    with pytest.raises(AttributeError, match="W_enc.*W_dec"):
        ours.W_enc = torch.nn.Parameter(torch.zeros(D_IN, D_SAE))
    assert "W_enc" not in ours.state_dict()
    training, _ = make_training_pair()
    assert set(training.state_dict()) == {"W_dec", "b_dec"}
    assert torch.equal(training.W_enc, training.W_dec.T)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_same_seed_gives_sae_lens_initial_weights(training):
    kw = {"d_in": D_IN, "d_sae": D_SAE}
    torch.manual_seed(5)
    if training:
        ours = MatchingPursuitTrainingSAE(MatchingPursuitTrainingSAEConfig(**kw))
    else:
        ours = MatchingPursuitSAE(MatchingPursuitSAEConfig(**kw))
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if training:
            theirs = SLMatchingPursuitTrainingSAE(SLMatchingPursuitTrainingSAEConfig(**kw))
        else:
            theirs = SLMatchingPursuitSAE(SLMatchingPursuitSAEConfig(**kw))
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    if training:  # unit decoder rows, whatever decoder_init_norm said
        torch.testing.assert_close(ours.W_dec.norm(dim=-1), torch.ones(D_SAE))


# --------------------------------------------------------------------------- maths
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_encode_decode_forward_match_sae_lens(option, shape):
    ours, theirs = make_pair(**OPTIONS[option])
    x = make_input(SHAPES[shape])
    check_encode_decode_forward(ours, theirs, x)
    acts = theirs.encode(x)
    assert acts.shape == (*SHAPES[shape][:-1], D_SAE)
    l0 = (acts != 0).sum(-1)
    assert int(l0.max()) > 1, "test setup: several latents per token"
    if "max_iterations" in OPTIONS[option]:
        assert int(l0.max()) <= OPTIONS[option]["max_iterations"]


@pytest.mark.parametrize("normalize_activations", ["constant_norm_rescale", "layer_norm"])
def test_run_time_normalisation_matches_sae_lens(normalize_activations):
    ours, theirs = make_pair(normalize_activations=normalize_activations)
    check_encode_decode_forward(ours, theirs, make_input(SHAPES["3d"]))


@pytest.mark.parametrize("option", ["defaults", "threshold-only", "no-stops", "capped"])
def test_batched_codes_equal_per_token_float64_reference(option):
    ours, _ = make_pair(seed=3, **OPTIONS[option])
    ours.double()
    x = make_input(SHAPES["2d"], dtype=torch.float64)
    expected = reference_codes(ours.process_sae_in(x), ours.W_dec, ours.cfg)
    got = ours.encode(x)
    assert (expected != 0).sum(-1).min() >= 1
    assert torch.equal(got != 0, expected != 0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # a token's code does not depend on the other tokens of the batch
    torch.testing.assert_close(ours.encode(x[4:5]), got[4:5], rtol=1e-12, atol=1e-14)


def test_residual_threshold_stops_early():
    """A token stops at its first pick whose residual norm is below the threshold; a huge
    threshold stops every token after one pick."""
    x = make_input(SHAPES["2d"])
    unstopped, _ = make_pair(residual_threshold=0.0, stop_on_duplicate_support=False)
    ours, theirs = make_pair(**OPTIONS["threshold-only"])
    acts = ours.encode(x)
    assert_close(acts, theirs.encode(x), what="encode with a threshold")
    residual = (ours.process_sae_in(x) - acts @ ours.W_dec).norm(dim=-1)
    acts_unstopped = unstopped.encode(x)
    l0, l0_unstopped = (acts != 0).sum(-1), (acts_unstopped != 0).sum(-1)
    stopped = residual < ours.cfg.residual_threshold
    assert stopped.any() and not stopped.all(), "test setup: some tokens stop early"
    assert (l0 <= l0_unstopped).all() and (l0[stopped] < l0_unstopped[stopped]).any()
    # a token that never got below the threshold ran every iteration
    assert torch.equal(acts[~stopped], acts_unstopped[~stopped])
    huge, theirs = make_pair(residual_threshold=1e6, stop_on_duplicate_support=False)
    acts = huge.encode(x)
    assert ((acts != 0).sum(-1) == 1).all()
    assert_close(acts, theirs.encode(x), what="encode with a huge threshold")


def test_encoder_function_checks_d_in_and_keeps_leading_shape():
    W = torch.randn(D_SAE, D_IN)
    kw = {"residual_threshold": 0.0, "max_iterations": 4, "stop_on_duplicate_support": True}
    out = matching_pursuit_encode(torch.randn(2, 3, 4, D_IN), W, **kw)
    assert out.shape == (2, 3, 4, D_SAE)
    assert matching_pursuit_encode(torch.randn(D_IN), W, **kw).shape == (D_SAE,)
    assert matching_pursuit_encode(torch.randn(0, D_IN), W, **kw).shape == (0, D_SAE)
    with pytest.raises(ValueError, match="d_in=12"):
        matching_pursuit_encode(torch.randn(3, D_IN + 1), W, **kw)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("option", ["defaults", "no-stops"])
def test_gradients_match_sae_lens(option, shape):
    ours, theirs = make_pair(**OPTIONS[option])
    x = make_input(SHAPES[shape])
    x_o, x_t = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (ours(x_o) * g).sum().backward()
    (theirs(x_t) * g).sum().backward()
    assert_close(x_o.grad, x_t.grad, what="x.grad")
    for name, p_t in theirs.named_parameters():
        assert_close(dict(ours.named_parameters())[name].grad, p_t.grad, what=f"{name}.grad")


def test_b_dec_unused_without_apply_b_dec_to_input():
    """apply_b_dec_to_input=False: b_dec takes no part (sae-lens's gradient is all zeros)."""
    ours, theirs = make_pair(apply_b_dec_to_input=False)
    x = make_input(SHAPES["2d"])
    assert_close(ours(x), theirs(x), what="forward")
    assert_close(ours(x), ours.decode(ours.encode(x)), what="sparse vs dense decode")
    ours(x).sum().backward()
    theirs(x).sum().backward()
    assert ours.b_dec.grad is None and not theirs.b_dec.grad.any()
    assert_close(ours.W_dec.grad, theirs.W_dec.grad, what="W_dec.grad")


def test_hooks_and_error_term_match_sae_lens():
    """Only input / recons / output hooks fire (no single pre-activation), as in sae-lens."""
    ours, theirs = make_pair(use_error_term=True)
    x = make_input(SHAPES["3d"])
    out_o, cache_o = ours.run_with_cache(x)
    out_t, cache_t = theirs.run_with_cache(x)
    assert list(cache_o) == list(cache_t)
    assert "hook_sae_acts_post" not in cache_o
    for name in cache_t:
        assert_close(cache_o[name], cache_t[name], what=name)
    assert_close(out_o, x, what="error term gives back x")
    hooks = [("hook_sae_recons", lambda t, hook: t * 0.5)]
    assert_close(ours.run_with_hooks(x, fwd_hooks=hooks), theirs.run_with_hooks(x, fwd_hooks=hooks))


def test_hook_z_reshaping_matches_sae_lens():
    hook_name = "blocks.0.attn.hook_z"
    kw = {"d_in": D_IN, "d_sae": D_SAE, "reshape_activations": "hook_z"}
    ours = MatchingPursuitSAE(MatchingPursuitSAEConfig(**kw, metadata={"hook_name": hook_name}))
    theirs = SLMatchingPursuitSAE(
        SLMatchingPursuitSAEConfig(**kw, metadata=SLMetadata(hook_name=hook_name))
    )
    _unit_rows_(ours, 4)
    theirs.load_state_dict(ours.state_dict())
    x = make_input((3, 4, 3, 4))  # [batch, seq, n_heads, d_head]
    assert_close(ours.encode(x), theirs.encode(x), what="encode")
    out = ours(x)
    assert out.shape == x.shape
    assert_close(out, theirs(x), what="forward")


# --------------------------------------------------------------------------- folding
def test_folding_decoder_norms_or_whitening_is_refused_like_sae_lens():
    ours, theirs = make_pair()
    before = ours.W_dec.detach().clone()
    for sae in (ours, theirs):
        with pytest.raises(NotImplementedError):
            sae.fold_W_dec_norm()
        with pytest.raises(NotImplementedError):
            sae.fold_activation_whitening(torch.zeros(D_IN), torch.eye(D_IN), torch.eye(D_IN))
    with pytest.raises(NotImplementedError, match="tied"):
        ours.fold_and_get_W_dec_norm()
    assert torch.equal(ours.W_dec, before)


def test_loading_with_fold_W_dec_norm_is_refused(tmp_path):
    ours, _ = make_pair()
    ours.save_model(tmp_path / "sae")
    with pytest.raises(NotImplementedError, match="tied"):
        fastsae.SAE.load_from_disk(tmp_path / "sae", fold_W_dec_norm=True)
    assert type(fastsae.SAE.load_from_disk(tmp_path / "sae")) is MatchingPursuitSAE


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_fold_activation_norm_scaling_factor_matches_sae_lens(training):
    kw = {"normalize_activations": "expected_average_only_in", "residual_threshold": 0.2}
    ours, theirs = make_training_pair(**kw) if training else make_pair(**kw)
    scale = 2.5
    x = make_input(SHAPES["2d"])
    expected = ours(scale * x).detach() / scale
    ours.fold_activation_norm_scaling_factor(scale)
    theirs.fold_activation_norm_scaling_factor(scale)
    assert ours.cfg.normalize_activations == theirs.cfg.normalize_activations == "none"
    assert ours.cfg.residual_threshold == pytest.approx(theirs.cfg.residual_threshold)
    assert ours.cfg.residual_threshold == pytest.approx(0.2 / scale)
    for name, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[name], value, what=f"folded {name}")
    assert_close(ours(x), theirs(x), what="folded forward")
    assert_close(ours(x), expected, what="folded(x) == unfolded(scale * x) / scale")


# --------------------------------------------------------------------------- training
def _f(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _step(sae, x, logging: bool):
    if isinstance(sae, SLMatchingPursuitTrainingSAE):
        return sae.training_forward_pass(SLTrainStepInput(x, {}, None, 0, logging))
    return sae.training_forward_pass(TrainStepInput(x, {}, None, 0, logging))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("option", ["defaults", "no-bdec", "capped", "layer-norm"])
def test_training_step_matches_sae_lens(option, dtype):
    kwargs = {"normalize_activations": "layer_norm"} if option == "layer-norm" else OPTIONS[option]
    ours, theirs = make_training_pair(dtype=dtype, **kwargs)
    tol = 1e-5 if dtype == "float32" else 1e-12
    x = (1.3 * make_input((23, D_IN), seed=4)).to(ours.dtype)
    out_o, out_t = _step(ours, x, True), _step(theirs, x, True)
    assert set(out_o.losses) == set(out_t.losses) == {"mse_loss"}
    mse_o, mse_t = _f(out_o.losses["mse_loss"]), _f(out_t.losses["mse_loss"])
    assert mse_o > 0 and mse_o == pytest.approx(mse_t, rel=tol)
    assert _f(out_o.loss) == pytest.approx(_f(out_t.loss), rel=tol)
    assert_close(out_o.sae_out, out_t.sae_out, tol, "sae_out")
    assert_close(out_o.feature_acts, out_t.feature_acts, tol, "feature_acts")
    assert torch.equal(out_o.hidden_pre, torch.zeros_like(out_t.feature_acts))
    assert torch.equal(out_t.hidden_pre, torch.zeros_like(out_t.feature_acts))
    assert (
        set(out_o.metrics)
        == set(out_t.metrics)
        == {
            "max_l0",
            "min_l0",
            "residual_norm",
            "residual_threshold_converged_portion",
        }
    )
    for name, value in out_t.metrics.items():
        assert _f(out_o.metrics[name]) == pytest.approx(_f(value), rel=tol), name
    out_o.loss.backward()
    out_t.loss.backward()
    for name, p_t in theirs.named_parameters():
        p_o = dict(ours.named_parameters())[name]
        if option == "no-bdec" and name == "b_dec":
            assert p_o.grad is None and not p_t.grad.any()
            continue
        assert_close(p_o.grad, p_t.grad, tol, f"grad {name}")


def test_training_step_without_logging_has_no_metrics_and_trains():
    ours, _ = make_training_pair()
    x = make_input((16, D_IN), seed=6)
    out = _step(ours, x, False)
    assert out.metrics == {}
    assert float(out.l0()) > 1
    first = _f(out.loss)
    opt = torch.optim.Adam(ours.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        _step(ours, x, False).loss.backward()
        opt.step()
    assert _f(_step(ours, x, False).loss) < first


def test_training_sae_forward_matches_sae_lens():
    ours, theirs = make_training_pair(residual_threshold=0.3)
    x = make_input(SHAPES["3d"])
    with torch.no_grad():
        assert_close(ours(x), theirs(x), what="training SAE forward")
        assert_close(ours.encode(x), theirs.encode(x), what="training SAE encode")


# --------------------------------------------------------------------------- saving / loading
CUSTOM = {"residual_threshold": 0.05, "max_iterations": 7, "stop_on_duplicate_support": False}


def test_fastsae_folder_loads_in_sae_lens_and_back(tmp_path):
    ours, _ = make_pair(**CUSTOM)
    ours.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == ARCH and {k: cfg[k] for k in CUSTOM} == CUSTOM
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert type(theirs) is SLMatchingPursuitSAE
    assert {k: getattr(theirs.cfg, k) for k in CUSTOM} == CUSTOM
    x = make_input(SHAPES["3d"])
    assert_close(ours(x), theirs(x), what="sae-lens loads fastsae's folder")
    again = fastsae.SAE.load_from_disk(tmp_path / "sae")
    assert type(again) is MatchingPursuitSAE
    assert again.cfg.to_dict() == ours.cfg.to_dict()
    assert_close(again(x), ours(x), tol=0.0, what="fastsae round trip")


def test_sae_lens_folder_loads_in_fastsae(tmp_path):
    _, theirs = make_pair(seed=2, **CUSTOM)
    theirs.save_model(tmp_path / "sae")
    ours = MatchingPursuitSAE.load_from_disk(tmp_path / "sae")
    assert type(ours) is MatchingPursuitSAE
    assert {k: getattr(ours.cfg, k) for k in CUSTOM} == CUSTOM
    assert ours.cfg.metadata.hook_name == METADATA["hook_name"]
    x = make_input(SHAPES["2d"])
    assert_close(ours(x), theirs(x), what="fastsae loads sae-lens's folder")
    assert_close(ours.encode(x), theirs.encode(x), what="encode")


def test_bridge_both_ways():
    ours, theirs = make_pair(**CUSTOM)
    x = make_input(SHAPES["2d"])
    converted = ours.to_sae_lens()
    assert type(converted) is SLMatchingPursuitSAE
    assert_close(converted(x), theirs(x), what="to_sae_lens")
    back = fastsae.SAE.from_sae_lens(theirs)
    assert type(back) is MatchingPursuitSAE and back.cfg.max_iterations == 7
    assert_close(back(x), ours(x), what="from_sae_lens")
    training, sl_training = make_training_pair(**CUSTOM)
    from_training = fastsae.SAE.from_sae_lens(sl_training)
    assert type(from_training) is MatchingPursuitSAE
    with torch.no_grad():
        assert_close(from_training(x), training(x), what="from a sae-lens training SAE")


def test_save_inference_model_cfg_json_equals_sae_lens(tmp_path):
    ours, theirs = make_training_pair(**CUSTOM)
    ours.save_inference_model(tmp_path / "ours")
    theirs.save_inference_model(tmp_path / "theirs")
    cfg_o = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    cfg_t = json.loads((tmp_path / "theirs" / "cfg.json").read_text())
    assert cfg_o["metadata"].pop("fastsae_version") == fastsae.__version__
    assert cfg_o == cfg_t
    assert cfg_t["metadata"]["training_architecture_details"] == {"decoder_init_norm": 1.0}
    x = make_input(SHAPES["2d"])
    with torch.no_grad():
        ref = theirs(x)
        for folder in ("ours", "theirs"):
            for lib in (sae_lens, fastsae):
                loaded = lib.SAE.load_from_disk(tmp_path / folder)
                assert loaded.cfg.architecture() == ARCH
                assert_close(loaded(x), ref, what=f"{lib.__name__} loads {folder}")


def test_training_checkpoint_round_trip(tmp_path):
    ours, _ = make_training_pair(**CUSTOM)
    ours.save_model(tmp_path / "ck")
    loaded = TrainingSAE.load_from_disk(tmp_path / "ck")
    assert type(loaded) is MatchingPursuitTrainingSAE
    assert loaded.cfg.to_dict() == ours.cfg.to_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


# --------------------------------------------------------------------------- configs
def test_config_round_trips_and_reads_in_sae_lens():
    cfg = MatchingPursuitSAEConfig(d_in=D_IN, d_sae=D_SAE, **CUSTOM)
    d = cfg.to_dict()
    assert d["architecture"] == ARCH
    assert type(SAEConfig.from_dict(d)) is MatchingPursuitSAEConfig
    assert SAEConfig.from_dict(d).to_dict() == d
    theirs = SLMatchingPursuitSAEConfig.from_dict(json.loads(json.dumps(d)))
    assert {k: getattr(theirs, k) for k in CUSTOM} == CUSTOM
    their_d = theirs.to_dict()
    for md in (their_d["metadata"], d["metadata"]):
        md.pop("fastsae_version", None)
    assert their_d == d

    training = MatchingPursuitTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **CUSTOM)
    td = training.to_dict()
    again = TrainingSAEConfig.from_dict(td)
    assert type(again) is MatchingPursuitTrainingSAEConfig and again.to_dict() == td
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decoder_init_norm is already 1.0: no warning
        sl_training = SLMatchingPursuitTrainingSAEConfig.from_dict(json.loads(json.dumps(td)))
    assert {k: getattr(sl_training, k) for k in CUSTOM} == CUSTOM
    inference = training.get_inference_sae_cfg_dict()
    assert inference == sl_training.get_inference_sae_cfg_dict() | {
        "metadata": inference["metadata"]
    }
    assert set(inference) >= MP_FIELDS and "decoder_init_norm" not in inference


@pytest.mark.parametrize(
    "field, value",
    [
        ("residual_threshold", -0.1),
        ("residual_threshold", math.nan),
        ("residual_threshold", "0.1"),
        ("residual_threshold", True),
        ("max_iterations", 0),
        ("max_iterations", 2.5),
        ("max_iterations", True),
        ("stop_on_duplicate_support", "yes"),
        ("stop_on_duplicate_support", 1),
    ],
)
@pytest.mark.parametrize(
    "cfg_cls", [MatchingPursuitSAEConfig, MatchingPursuitTrainingSAEConfig], ids=["inf", "train"]
)
def test_bad_config_values_name_the_field(cfg_cls, field, value):
    with pytest.raises(ValueError, match=field):
        cfg_cls(d_in=D_IN, d_sae=D_SAE, **{field: value})


def test_training_config_refuses_whitening_and_forces_unit_decoder_rows():
    with pytest.raises(ValueError, match="covariance_whitening"):
        MatchingPursuitTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, normalize_activations="covariance_whitening"
        )
    # the inference SAE accepts it (the normalisation is folded before inference)
    MatchingPursuitSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="covariance_whitening")
    for value in (0.1, None, 0.0):
        with pytest.warns(UserWarning, match="decoder_init_norm must be 1.0"):
            cfg = MatchingPursuitTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, decoder_init_norm=value)
        assert cfg.decoder_init_norm == 1.0
        sae = MatchingPursuitTrainingSAE(cfg)
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


# --------------------------------------------------------------------------- runner
def test_trains_through_the_runner_and_logs_its_metrics(tmp_path):
    import tiny_runs

    from fastsae.training import SAETrainingRunner

    sae_cfg = MatchingPursuitTrainingSAEConfig(d_in=16, d_sae=32, residual_threshold=0.05)
    cfg = tiny_runs.runner_config(
        tmp_path, sae_cfg, training_tokens=64 * 6, eval_every_n_wandb_logs=10**6,
        wandb_log_frequency=2,
    )  # fmt: skip
    runner = SAETrainingRunner(
        cfg,
        override_model=tiny_runs.tiny_model(),
        override_dataset=tiny_runs.token_rows_dataset(200),
        show_progress=False,
    )
    assert type(runner.run()) is MatchingPursuitTrainingSAE
    saved = fastsae.SAE.load_from_disk(tmp_path / "out")
    assert type(saved) is MatchingPursuitSAE and saved.cfg.residual_threshold == 0.05
    torch.manual_seed(cfg.seed)
    assert not torch.equal(saved.W_dec, MatchingPursuitTrainingSAE(cfg.sae).W_dec)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    logged = [row for row in rows if "metrics/max_l0" in row]
    assert logged, "no logging step recorded the matching pursuit metrics"
    row = logged[-1]
    assert row["metrics/min_l0"] <= row["metrics/l0"] <= row["metrics/max_l0"]
    assert 0 <= row["metrics/residual_threshold_converged_portion"] <= 1
    assert row["metrics/residual_norm"] > 0
    assert sae_lens.SAE.load_from_disk(tmp_path / "out").cfg.architecture() == ARCH
