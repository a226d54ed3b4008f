"""Training SAEs, every architecture: parity with sae-lens's training classes, saving.

For every training architecture, a fastsae and a sae-lens training SAE get the same
random weights (every bias, threshold and buffer randomised), the same
``TrainStepInput``; every loss, the total loss, ``feature_acts``, ``hidden_pre``,
``sae_out`` and every parameter gradient must agree (fp32: 1e-5 relative error,
``||a - b|| / ||b||``). Sizes are deliberately odd (d_in=33, d_sae=300, batch=47; see
``sae_cases``). Also: float64 runs of both libraries agree tightly and bound the fp32
error; the sparse TopK-family step (lazy dense tensors, hooks -> dense path, bitwise
deterministic gradients); ``save_inference_model`` directories load in both libraries
with the training SAE's outputs; configs, decoder init, folding and config errors. Checks
of one architecture live in ``test_<architecture>.py`` beside this file.
"""

from __future__ import annotations

import copy
import json

import pytest
import sae_lens
import torch
from sae_cases import (
    BATCH,
    FP32_TOL,
    FP32_VS_FP64_TOL,
    WIDTHS,
    _assert_grad_close,
    _assert_scalar_close,
    _cfg_kwargs,
    _compare_steps,
    _dead_mask,
    _make_pair,
    _run,
    _x,
)
from sae_cases import TRAIN_D_IN as D_IN
from sae_cases import TRAIN_D_SAE as D_SAE
from sae_cases import TRAIN_K as K
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput as SLTrainStepInput
from sae_testing import assert_close

import fastsae
from fastsae.saes import (
    AbsTopKTrainingSAEConfig,
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
    TrainingSAEConfig,
    TrainStepInput,
    training_config_class_for_architecture,
    training_sae_class_for_architecture,
)

FP64_TOL = 1e-10


# (id, architecture, config kwargs, coefficients, number of dead latents)
CASES = [
    ("standard-l1", "standard", {"lp_norm": 1.0}, {"l1": 0.37}, 50),
    ("standard-l2", "standard", {"lp_norm": 2.0}, {"l1": 1.3}, None),
    # l1 warm-up: the coefficient the scheduler hands out mid and at the start of warm-up
    ("standard-warmup-mid", "standard", {"l1_warm_up_steps": 4}, {"l1": 0.25 * 0.8}, None),
    ("standard-warmup-start", "standard", {"l1_warm_up_steps": 4}, {"l1": 0.0}, None),
    ("standard-no-bdec", "standard", {"apply_b_dec_to_input": False}, {"l1": 0.5}, None),
    ("gated", "gated", {}, {"l1": 0.6}, 40),
    ("gated-no-bdec", "gated", {"apply_b_dec_to_input": False}, {"l1": 0.6}, None),
    ("jumprelu-step", "jumprelu", {}, {"l0": 0.2}, 60),
    (
        "jumprelu-step-preact-ste",
        "jumprelu",
        {"pre_act_loss_coefficient": 0.3, "jumprelu_ste_to_input": True},
        {"l0": 0.2},
        60,
    ),
    (
        "jumprelu-step-preact-nodead",
        "jumprelu",
        {"pre_act_loss_coefficient": 0.3},
        {"l0": 0.2},
        0,
    ),
    ("jumprelu-tanh", "jumprelu", {"jumprelu_sparsity_loss_mode": "tanh"}, {"l0": 0.7}, 60),
    (
        "jumprelu-tanh-preact-ste",
        "jumprelu",
        {
            "jumprelu_sparsity_loss_mode": "tanh",
            "jumprelu_tanh_scale": 2.5,
            "pre_act_loss_coefficient": 0.3,
            "jumprelu_ste_to_input": True,
        },
        {"l0": 0.7},
        60,
    ),
    (
        "jumprelu-quadratic",
        "jumprelu",
        {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": 20.0},
        {"l0": 0.05},
        None,
    ),
    (
        "jumprelu-quadratic-preact-ste",
        "jumprelu",
        {
            "jumprelu_sparsity_loss_mode": "quadratic",
            "target_l0": 20.0,
            "pre_act_loss_coefficient": 0.3,
            "jumprelu_ste_to_input": True,
        },
        {"l0": 0.05},
        60,
    ),
    ("topk-rescale-nodead", "topk", {"k": K}, {}, None),
    ("topk-rescale-zerodead", "topk", {"k": K}, {}, 0),
    ("topk-rescale-fewdead", "topk", {"k": K}, {}, 10),  # 10 < d_in // 2 = 16
    ("topk-rescale-manydead", "topk", {"k": K}, {}, 100),  # 100 > 16
    ("topk-norescale-fewdead", "topk", {"k": K, "rescale_acts_by_decoder_norm": False}, {}, 10),
    (
        "topk-norescale-manydead",
        "topk",
        {"k": K, "rescale_acts_by_decoder_norm": False, "aux_loss_coefficient": 0.4},
        {},
        100,
    ),
    (
        "topk-no-bdec",
        "topk",
        {"k": K, "apply_b_dec_to_input": False},
        {},
        100,
    ),
    ("batchtopk-rescale", "batchtopk", {"k": 4.5}, {}, 100),
    (
        "batchtopk-norescale",
        "batchtopk",
        {"k": 4.5, "rescale_acts_by_decoder_norm": False, "topk_threshold_lr": 0.3},
        {},
        10,
    ),
    (
        "matryoshka",
        "matryoshka_batchtopk",
        {"k": 4.5, "matryoshka_widths": WIDTHS},
        {},
        100,
    ),
    (
        "matryoshka-aux",
        "matryoshka_batchtopk",
        {"k": 4.5, "matryoshka_widths": WIDTHS, "use_matryoshka_aux_loss": True},
        {},
        100,
    ),
    (
        "matryoshka-aux-norescale-fewdead",
        "matryoshka_batchtopk",
        {
            "k": 4.5,
            "matryoshka_widths": WIDTHS,
            "use_matryoshka_aux_loss": True,
            "rescale_acts_by_decoder_norm": False,
        },
        {},
        10,
    ),
    # run-time input normalisation (AuxK refuses these modes, so no dead latents)
    (
        "topk-constant-norm",
        "topk",
        {"k": K, "normalize_activations": "constant_norm_rescale"},
        {},
        None,
    ),
    ("topk-layer-norm", "topk", {"k": K, "normalize_activations": "layer_norm"}, {}, None),
    (
        "topk-expected-average",
        "topk",
        {"k": K, "normalize_activations": "expected_average_only_in"},
        {},
        100,
    ),
    (
        "batchtopk-constant-norm",
        "batchtopk",
        {"k": 4.5, "normalize_activations": "constant_norm_rescale"},
        {},
        None,
    ),
    ("standard-layer-norm", "standard", {"normalize_activations": "layer_norm"}, {"l1": 0.3}, None),
    ("gated-layer-norm", "gated", {"normalize_activations": "layer_norm"}, {"l1": 0.3}, None),
    (
        "gated-constant-norm",
        "gated",
        {"normalize_activations": "constant_norm_rescale"},
        {"l1": 0.3},
        None,
    ),
    ("jumprelu-layer-norm", "jumprelu", {"normalize_activations": "layer_norm"}, {"l0": 0.3}, 60),
    # AbsTopK: TopK's step with the selection (and AuxK's) on |hidden_pre|, sign kept
    ("abstopk-rescale-nodead", "abstopk", {"k": K}, {}, None),
    ("abstopk-rescale-zerodead", "abstopk", {"k": K}, {}, 0),
    ("abstopk-rescale-fewdead", "abstopk", {"k": K}, {}, 10),
    ("abstopk-rescale-manydead", "abstopk", {"k": K}, {}, 100),
    (
        "abstopk-norescale-fewdead",
        "abstopk",
        {"k": K, "rescale_acts_by_decoder_norm": False},
        {},
        10,
    ),
    (
        "abstopk-norescale-manydead",
        "abstopk",
        {"k": K, "rescale_acts_by_decoder_norm": False, "aux_loss_coefficient": 0.4},
        {},
        100,
    ),
    ("abstopk-no-bdec", "abstopk", {"k": K, "apply_b_dec_to_input": False}, {}, 100),
    (
        "abstopk-expected-average",
        "abstopk",
        {"k": K, "normalize_activations": "expected_average_only_in"},
        {},
        100,
    ),
    (
        "abstopk-constant-norm",
        "abstopk",
        {"k": K, "normalize_activations": "constant_norm_rescale"},
        {},
        None,
    ),
    ("abstopk-layer-norm", "abstopk", {"k": K, "normalize_activations": "layer_norm"}, {}, None),
]
CASE_IDS = [c[0] for c in CASES]


def _case(case_id):
    return next(c for c in CASES if c[0] == case_id)


# ---------------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_training_step_matches_sae_lens(case):
    _, arch, kwargs, coefficients, n_dead = case
    ours, theirs = _make_pair(arch, kwargs)
    x, mask = _x(), _dead_mask(n_dead)
    out_o = _run(ours, TrainStepInput, x, coefficients, mask)
    out_t = _run(theirs, SLTrainStepInput, x, coefficients, mask)
    _compare_steps(ours, theirs, out_o, out_t, FP32_TOL)
    # every case exercises what it names: aux losses are non-zero when latents are dead
    if n_dead and arch in ("topk", "abstopk", "batchtopk", "matryoshka_batchtopk"):
        assert float(out_t.losses["auxiliary_reconstruction_loss"].detach()) > 0
    if arch == "abstopk":  # signed codes: the case exercises negative activations
        assert (out_t.feature_acts < 0).any() and (out_t.feature_acts > 0).any()
    if kwargs.get("pre_act_loss_coefficient") and n_dead:
        assert float(out_t.losses["pre_act_loss"].detach()) > 0
    if arch == "jumprelu":
        assert ours.threshold.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- float64
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float64_step_matches_sae_lens_and_bounds_fp32_error(case):
    """Both libraries in float64 agree tightly; fastsae's fp32 step is near the float64 one."""
    _, arch, kwargs, coefficients, n_dead = case
    ours64, theirs64 = _make_pair(arch, kwargs, dtype="float64")
    assert ours64.W_enc.dtype == torch.float64
    x64, mask = _x(torch.float64), _dead_mask(n_dead)
    out_o = _run(ours64, TrainStepInput, x64, coefficients, mask)
    out_t = _run(theirs64, SLTrainStepInput, x64, coefficients, mask)
    ref_losses = {k: float(v.detach()) for k, v in out_t.losses.items()}
    ref_loss = float(out_t.loss.detach())
    _compare_steps(ours64, theirs64, out_o, out_t, FP64_TOL)

    ours32, _ = _make_pair(arch, kwargs)
    out32 = _run(ours32, TrainStepInput, x64.float(), coefficients, mask)
    for name, ref in ref_losses.items():
        _assert_scalar_close(out32.losses[name], ref, FP32_VS_FP64_TOL, f"fp32 {name}")
    _assert_scalar_close(out32.loss, ref_loss, FP32_VS_FP64_TOL, "fp32 total loss")
    out32.loss.backward()
    for name, p in ours32.named_parameters():
        ref_grad = dict(ours64.named_parameters())[name].grad
        _assert_grad_close(p.grad, ref_grad, FP32_VS_FP64_TOL, f"fp32 grad {name}")


# ---------------------------------------------------------------------------- sparse step
SPARSE_ARCHS = [
    ("topk", {"k": K}),
    ("batchtopk", {"k": 4.5}),
    ("matryoshka_batchtopk", {"k": 4.5, "matryoshka_widths": WIDTHS}),
    ("abstopk", {"k": K}),
]


@pytest.mark.parametrize("arch,kwargs", SPARSE_ARCHS, ids=[a for a, _ in SPARSE_ARCHS])
def test_sparse_step_is_lazy_and_hooks_switch_to_the_dense_path(arch, kwargs):
    x, mask = _x(), _dead_mask(100)
    ours, _ = _make_pair(arch, kwargs)
    dense_sae, _ = _make_pair(arch, kwargs)
    out = _run(ours, TrainStepInput, x, {}, mask)
    assert out.code is not None
    assert out.code.values.shape[0] == BATCH
    # nothing [batch, d_sae] was built by the step
    assert out._feature_acts is None and out._hidden_pre is None

    seen = []
    dense_sae.hook_sae_acts_post.add_hook(lambda act, hook: seen.append(act.shape) or act)
    try:
        dense = _run(dense_sae, TrainStepInput, x, {}, mask)
    finally:
        dense_sae.reset_hooks()
    assert dense.code is None and seen == [(BATCH, D_SAE)]

    assert_close(out.feature_acts, dense.feature_acts, FP32_TOL, "feature_acts")
    assert not out.feature_acts.requires_grad
    assert_close(out.hidden_pre, dense.hidden_pre, FP32_TOL, "hidden_pre")
    assert torch.equal(out.fired(), dense.fired())
    assert float(out.l0()) == float(dense.l0())
    assert set(out.losses) == set(dense.losses)
    for name in dense.losses:
        _assert_scalar_close(out.losses[name], dense.losses[name], FP32_TOL, name)
    out.loss.backward()
    dense.loss.backward()
    dense_params = dict(dense_sae.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, dense_params[name].grad, FP32_TOL, f"grad {name}")
    if arch not in ("topk", "abstopk"):
        assert float(ours.topk_threshold) == pytest.approx(float(dense_sae.topk_threshold))


# ---------------------------------------------------------------------------- saving
SAVE_CASES = [
    ("standard", {}),
    ("gated", {}),
    ("jumprelu", {}),
    ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": False}),
    ("batchtopk", {"k": 4.5}),
    ("batchtopk", {"k": 4.5, "rescale_acts_by_decoder_norm": False}),
    ("matryoshka_batchtopk", {"k": 4.5, "matryoshka_widths": WIDTHS}),
    ("abstopk", {"k": K}),
    ("abstopk", {"k": K, "rescale_acts_by_decoder_norm": False}),
]


@pytest.mark.parametrize(
    "arch,kwargs",
    SAVE_CASES,
    ids=[f"{a}-{i}" for i, (a, _) in enumerate(SAVE_CASES)],
)
def test_save_inference_model_loads_in_both_libraries(arch, kwargs, tmp_path):
    ours, theirs = _make_pair(arch, kwargs)
    if arch == "jumprelu":
        with torch.no_grad():  # a raw inference threshold is >= 0
            ours.threshold.clamp_(min=0)
            theirs.threshold.clamp_(min=0)
    x = _x()
    ours.save_inference_model(tmp_path / "ours")
    theirs.save_inference_model(tmp_path / "theirs")
    ours.eval()
    theirs.eval()
    batch_topk = arch in ("batchtopk", "matryoshka_batchtopk")
    with torch.no_grad():
        if batch_topk:
            # batch top-k is not a per-token function: the saved JumpReLU is the reference
            ref_sae = sae_lens.SAE.load_from_disk(tmp_path / "theirs")
            assert ref_sae.cfg.architecture() == "jumprelu"
            ref = ref_sae(x)
        else:
            ref = theirs(x)
            assert_close(ours(x), ref, FP32_TOL, "training SAE forward")
        expected_arch = "jumprelu" if batch_topk else arch
        for folder in ("ours", "theirs"):
            for lib in (sae_lens, fastsae):
                loaded = lib.SAE.load_from_disk(tmp_path / folder)
                assert loaded.cfg.architecture() == expected_arch, (lib.__name__, folder)
                assert_close(loaded(x), ref, FP32_TOL, f"{lib.__name__} loads {folder}")
                if batch_topk:  # the global threshold became a per-latent one
                    assert torch.allclose(loaded.threshold, torch.full((D_SAE,), 0.37))


# ---------------------------------------------------------------------------- init / configs
@pytest.mark.parametrize(
    "arch,kwargs", SAVE_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(SAVE_CASES)]
)
def test_decoder_init_norm(arch, kwargs):
    sae = training_sae_class_for_architecture(arch)(
        training_config_class_for_architecture(arch)(
            d_in=D_IN, d_sae=D_SAE, decoder_init_norm=0.25, **_cfg_kwargs(arch, kwargs)
        )
    )
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((D_SAE,), 0.25))
    assert torch.equal(sae.W_enc, sae.W_dec.T)


@pytest.mark.parametrize(
    "case_id",
    [
        "standard-l2",
        "gated",
        "jumprelu-quadratic-preact-ste",
        "topk-norescale-manydead",
        "batchtopk-norescale",
        "matryoshka-aux",
        "abstopk-norescale-manydead",
    ],
)
def test_config_dict_round_trips_and_reads_in_sae_lens(case_id):
    _, arch, kwargs, _, _ = _case(case_id)
    cfg = training_config_class_for_architecture(arch)(
        d_in=D_IN, d_sae=D_SAE, **_cfg_kwargs(arch, kwargs)
    )
    d = cfg.to_dict()
    assert d["architecture"] == arch
    again = TrainingSAEConfig.from_dict(d)
    assert type(again) is type(cfg)
    assert again.to_dict() == d
    _, sl_cfg_cls = get_sae_training_class(arch)
    theirs = sl_cfg_cls.from_dict(copy.deepcopy(d))
    for name, value in _cfg_kwargs(arch, kwargs).items():
        assert getattr(theirs, name) == value, name


def _raises(match, cls, **kwargs):
    with pytest.raises(ValueError, match=match):
        cls(d_in=D_IN, d_sae=D_SAE, **kwargs)


def test_config_validation_errors():
    _raises(
        "jumprelu_sparsity_loss_mode", JumpReLUTrainingSAEConfig, jumprelu_sparsity_loss_mode="l1"
    )
    _raises("target_l0", JumpReLUTrainingSAEConfig, jumprelu_sparsity_loss_mode="quadratic")
    _raises(
        "target_l0",
        JumpReLUTrainingSAEConfig,
        jumprelu_sparsity_loss_mode="quadratic",
        target_l0=D_SAE + 1,
    )
    _raises(
        "target_l0",
        JumpReLUTrainingSAEConfig,
        jumprelu_sparsity_loss_mode="quadratic",
        target_l0=0,
    )
    _raises("jumprelu_bandwidth", JumpReLUTrainingSAEConfig, jumprelu_bandwidth=0.0)
    _raises("l0_coefficient", JumpReLUTrainingSAEConfig, l0_coefficient=-1.0)
    _raises("l0_warm_up_steps", JumpReLUTrainingSAEConfig, l0_warm_up_steps=-3)
    _raises("pre_act_loss_coefficient", JumpReLUTrainingSAEConfig, pre_act_loss_coefficient=-1e-3)
    _raises("l1_coefficient", StandardTrainingSAEConfig, l1_coefficient=-0.1)
    _raises("l1_warm_up_steps", StandardTrainingSAEConfig, l1_warm_up_steps=-1)
    _raises("l1_coefficient", GatedTrainingSAEConfig, l1_coefficient=-0.1)
    _raises("lp_norm", StandardTrainingSAEConfig, lp_norm=0.0)
    _raises("aux_loss_coefficient", TopKTrainingSAEConfig, aux_loss_coefficient=-1.0)
    _raises("decoder_init_norm", TopKTrainingSAEConfig, decoder_init_norm=0.0)
    _raises(r"\bk\b", TopKTrainingSAEConfig, k=4.5)
    _raises(r"\bk\b", TopKTrainingSAEConfig, k=0)
    _raises(r"\bk\b", TopKTrainingSAEConfig, k=D_SAE + 1)
    _raises(r"\bk\b", AbsTopKTrainingSAEConfig, k=4.5)
    _raises(r"\bk\b", AbsTopKTrainingSAEConfig, k=D_SAE + 1)
    _raises("aux_loss_coefficient", AbsTopKTrainingSAEConfig, aux_loss_coefficient=-1.0)
    _raises(r"\bk\b", BatchTopKTrainingSAEConfig, k=0.0)
    _raises(r"\bk\b", BatchTopKTrainingSAEConfig, k=D_SAE + 0.5)
    _raises("topk_threshold_lr", BatchTopKTrainingSAEConfig, k=4.5, topk_threshold_lr=1.5)
    _raises(
        "strictly increasing",
        MatryoshkaBatchTopKTrainingSAEConfig,
        k=4.5,
        matryoshka_widths=[90, 20, D_SAE],
    )
    _raises(
        "strictly increasing",
        MatryoshkaBatchTopKTrainingSAEConfig,
        k=4.5,
        matryoshka_widths=[20, 20, D_SAE],
    )
    _raises("empty", MatryoshkaBatchTopKTrainingSAEConfig, k=4.5, matryoshka_widths=[])
    _raises("positive", MatryoshkaBatchTopKTrainingSAEConfig, k=4.5, matryoshka_widths=[0, D_SAE])
    with pytest.raises(ValueError, match="unknown training architecture"):
        training_config_class_for_architecture("nope")
    with pytest.raises(ValueError, match="unknown training architecture"):
        training_sae_class_for_architecture("nope")


@pytest.mark.parametrize(
    "arch,kwargs",
    SAVE_CASES,
    ids=[f"{a}-{i}" for i, (a, _) in enumerate(SAVE_CASES)],
)
def test_saved_cfg_json_equals_sae_lens(arch, kwargs, tmp_path):
    ours, theirs = _make_pair(arch, kwargs)
    ours.save_inference_model(tmp_path / "ours")
    theirs.save_inference_model(tmp_path / "theirs")
    cfg_o = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    cfg_t = json.loads((tmp_path / "theirs" / "cfg.json").read_text())
    # the sae-lens versions are the parity target's; fastsae adds its own beside them
    assert cfg_o["metadata"].pop("fastsae_version") == fastsae.__version__
    # fastsae's one extra training field (ghost grads, dropped by SAELens 6)
    assert cfg_o["metadata"]["training_architecture_details"].pop("use_ghost_grads", False) is False
    assert cfg_o == cfg_t


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("topk", {"k": K}),
        ("batchtopk", {"k": 4.5}),
        ("batchtopk", {"k": 4.5, "rescale_acts_by_decoder_norm": False}),
        ("jumprelu", {}),
        ("abstopk", {"k": K}),
    ],
    ids=["topk", "batchtopk", "batchtopk-norescale", "jumprelu", "abstopk"],
)
def test_fold_activation_norm_scaling_factor_matches_sae_lens(arch, kwargs):
    ours, theirs = _make_pair(arch, kwargs)
    ours.fold_activation_norm_scaling_factor(3.7)
    theirs.fold_activation_norm_scaling_factor(3.7)
    theirs_state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        assert_close(value, theirs_state[name], 1e-6, name)
    assert ours.cfg.normalize_activations == "none"


@pytest.mark.parametrize("arch,kwargs", SPARSE_ARCHS[:2], ids=[a for a, _ in SPARSE_ARCHS[:2]])
def test_lazy_hidden_pre_refuses_after_an_optimizer_step(arch, kwargs):
    ours, _ = _make_pair(arch, kwargs)
    reference, _ = _make_pair(arch, kwargs)
    x = _x()
    expected = _run(reference, TrainStepInput, x, {}, None).hidden_pre.detach()
    out = _run(ours, TrainStepInput, x, {}, None)
    out.loss.backward()
    torch.optim.Adam(ours.parameters(), lr=1e-2).step()  # what SAETrainer.step does next
    # built lazily from the weights: after they changed it refuses rather than lie
    with pytest.raises(RuntimeError, match="before updating the weights"):
        _ = out.hidden_pre
    read_first = _run(ours, TrainStepInput, x, {}, None)
    fresh, _ = _make_pair(arch, kwargs)
    fresh.load_state_dict(ours.state_dict())
    assert_close(read_first.hidden_pre, _run(fresh, TrainStepInput, x, {}, None).hidden_pre,
                 FP32_TOL, "hidden_pre")  # fmt: skip
    assert expected.shape == read_first.hidden_pre.shape


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka_batchtopk", "abstopk"])
def test_sparse_step_gradients_are_bitwise_deterministic(arch):
    """Two identical steps give bit-identical gradients (exact resume depends on it; CPU
    advanced-indexing backward accumulates with parallel atomics and would not)."""
    from fastsae.saes import training_sae_class_for_architecture

    extra = {"topk": {"k": 16}, "abstopk": {"k": 16}, "batchtopk": {"k": 16.0},
             "matryoshka_batchtopk": {"k": 16.0, "matryoshka_widths": [256, 1536]}}[arch]  # fmt: skip
    cls = training_sae_class_for_architecture(arch)
    sae = cls(TrainingSAEConfig.from_dict({"architecture": arch, "d_in": 192, "d_sae": 1536,
                                           **extra}))  # fmt: skip
    x = torch.randn(1024, 192, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(1536, dtype=torch.bool)
    dead[::5] = True
    grads = []
    for _ in range(2):
        out = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
        sae.zero_grad()
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("standard", {}),
        ("gated", {}),
        ("jumprelu", {}),
        ("topk", {"k": 4}),
        ("batchtopk", {"k": 4.0}),
        ("matryoshka_batchtopk", {"k": 4.0, "matryoshka_widths": [16, 64]}),
        ("abstopk", {"k": 4}),
    ],
)
def test_training_sae_forward_matches_sae_lens(arch, kw):
    """``training_sae(x)`` (what the runner splices into a model for its CE-loss evals)
    equals SAELens's training SAE forward, ``decode(encode(x))`` with the training
    activation, also for JumpReLU thresholds that went negative."""
    from fastsae.saes import training_sae_class_for_architecture

    kw = dict(d_in=16, d_sae=64, **kw)
    torch.manual_seed(0)
    ours = training_sae_class_for_architecture(arch)(
        fastsae.saes.training_sae.TrainingSAEConfig.from_dict({"architecture": arch, **kw})
    )
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.normal_(0, 0.5)
        if arch == "jumprelu":
            ours.threshold.uniform_(-0.3, 0.2)
    theirs_cls, theirs_cfg_cls = get_sae_training_class(arch)
    theirs = theirs_cls(theirs_cfg_cls(**kw))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(x), theirs(x), 1e-6, "forward")
