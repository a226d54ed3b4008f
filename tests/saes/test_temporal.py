"""TemporalSAE against sae-lens 6.54.12's: structure, encode / decode / forward on
sequences, hooks, gradients, dtype moves, folding (refused by both), the saved folder in
both directions, the live bridge, configs, the pretrained loader's output and bad input.

The shared parity suites feed flat ``[tokens, d_in]`` batches and fold weights, neither
of which a temporal SAE takes (``sae_cases.SEQUENCE_ARCHS``); the same checks run here on
``[batch, seq, d_in]`` inputs. Sizes: d_in=20, d_sae=60, 4 heads, bottleneck 3 (query and
key width 20), k=5; outputs equal to 1e-5 relative error in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import sae_lens
import torch
import yaml
from sae_cases import (
    D_IN,
    D_SAE,
    HOOK_NAME,
    K,
    _grad_case,
    assert_close,
    cfg_kwargs,
    check_encode_decode_forward,
    make_input,
    randomize_,
    rel_err,
)
from sae_lens.loading import pretrained_sae_loaders as sl_loaders
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import SAEMetadata as SLMetadata
from sae_lens.saes.temporal_sae import ManualAttention as SLManualAttention
from sae_lens.saes.temporal_sae import get_attention as sl_get_attention
from safetensors.torch import save_file

import fastsae
from fastsae.loading.disk import build_sae, handle_config_defaulting
from fastsae.saes import SAE_CLASSES
from fastsae.saes.config import SAEConfig, SAEMetadata
from fastsae.saes.registry import training_sae_class_for_architecture
from fastsae.saes.temporal import (
    TEMPORAL_NORMALIZE_ACTIVATIONS,
    ManualAttention,
    TemporalSAE,
    TemporalSAEConfig,
    causal_attention_weights,
)
from fastsae.sparse_code import SparseCode

pytestmark = [
    pytest.mark.filterwarnings("ignore:TemporalSAE.decode decodes:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting use_error_term directly:DeprecationWarning"),
]

SEQ_SHAPES = {"b1-s1": (1, 1), "b2-s5": (2, 5), "b3-s8": (3, 8), "b4-s2": (4, 2)}
HOOK_Z_NAME = "blocks.0.attn.hook_z"


_SHARED = ("apply_b_dec_to_input", "normalize_activations", "reshape_activations", "dtype")


def temporal_kwargs(**overrides) -> dict:
    """Config kwargs of the shared cases, with temporal fields overridden."""
    base = {k: overrides.pop(k) for k in list(overrides) if k in _SHARED}
    kwargs = cfg_kwargs("temporal", **base)
    kwargs.update(overrides)
    return kwargs


def make_temporal_pair(seed: int = 0, use_error_term: bool = False, hook_name=HOOK_NAME, **kw):
    """(fastsae TemporalSAE, sae-lens TemporalSAE) with the same random weights."""
    kwargs = temporal_kwargs(**kw)
    metadata = {"hook_name": hook_name, "model_name": "gpt2", "context_size": 128}
    ours = TemporalSAE(TemporalSAEConfig(**kwargs, metadata=SAEMetadata(**metadata)))
    ours.use_error_term = use_error_term
    theirs = sae_lens.TemporalSAE(
        sae_lens.TemporalSAEConfig(**kwargs, metadata=SLMetadata(**metadata))
    )
    randomize_(ours, seed)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def seq_input(batch: int, seq: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return make_input((batch, seq, D_IN), seed=seed, dtype=dtype)


# --------------------------------------------------------------------------- structure
def test_registered_under_sae_lens_name():
    assert SAE_CLASSES["temporal"] is TemporalSAE
    assert TemporalSAEConfig.architecture() == sae_lens.TemporalSAEConfig.architecture()
    assert TemporalSAE.__name__ == sae_lens.TemporalSAE.__name__
    assert TemporalSAEConfig.__name__ == sae_lens.TemporalSAEConfig.__name__
    # sae-lens has no training class for it, so neither do we
    with pytest.raises(KeyError):
        get_sae_training_class("temporal")
    with pytest.raises(ValueError, match="temporal"):
        training_sae_class_for_architecture("temporal")


def test_config_fields_and_defaults_match_sae_lens():
    def defaults(cls):
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = type(f.default_factory()).__name__
            else:
                out[f.name] = "<required>"
        return out

    ours, theirs = defaults(TemporalSAEConfig), defaults(sae_lens.TemporalSAEConfig)
    assert list(ours) == list(theirs)
    assert ours == theirs
    cfg = TemporalSAEConfig(d_in=512, d_sae=1024)
    assert (cfg.n_heads, cfg.n_attn_layers, cfg.bottleneck_factor) == (8, 1, 64)
    assert (cfg.sae_diff_type, cfg.kval_topk, cfg.tied_weights) == ("topk", None, True)
    assert cfg.activation_normalization_factor == 1.0


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tied_weights": False}, {"n_attn_layers": 2}, {"n_attn_layers": 0}],
    ids=["tied", "untied", "2-layers", "no-attention"],
)
def test_state_dict_names_shapes_and_order(overrides):
    ours, theirs = make_temporal_pair(**overrides)
    o = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    t = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert list(o.items()) == list(t.items())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert ("W_enc" in o) == (overrides.get("tied_weights") is False)
    n_layers = overrides.get("n_attn_layers", 1)
    assert len(ours.attn_layers) == n_layers
    if n_layers:
        assert o["attn_layers.0.k_ctx.weight"] == (D_SAE // 3, D_SAE)
        assert o["attn_layers.0.v_ctx.weight"] == (D_SAE, D_SAE)
    assert not list(ours.buffers()) and not list(theirs.buffers())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_gives_sae_lens_initial_weights(tied, dtype):
    kwargs = temporal_kwargs(tied_weights=tied, dtype=dtype, n_attn_layers=2)
    torch.manual_seed(123)
    ours = TemporalSAE(TemporalSAEConfig(**kwargs))
    torch.manual_seed(123)
    theirs = sae_lens.TemporalSAE(sae_lens.TemporalSAEConfig(**kwargs))
    theirs_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == theirs_state[name].dtype, name
        assert torch.equal(tensor, theirs_state[name]), name
    assert ours.lam == theirs.lam == 1 / (4 * D_IN)
    assert ours.eps == theirs.eps
    # attention rows are normalised at initialisation (key rows to 1/sqrt(head width))
    k_rows = ours.attn_layers[0].k_ctx.weight.norm(dim=1)
    expected = torch.full_like(k_rows, (D_SAE // 3 // 4) ** -0.5)
    torch.testing.assert_close(k_rows, expected, rtol=1e-5, atol=0)


def test_meta_device_build_allocates_nothing():
    cfg = TemporalSAEConfig(**temporal_kwargs(tied_weights=False))
    cfg.device = "meta"
    sae = TemporalSAE(cfg)
    assert all(p.device.type == "meta" for p in sae.parameters())
    assert sae.attn_layers[0].v_ctx.weight.shape == (D_SAE, D_SAE)


def test_hook_points_in_sae_lens_order():
    ours, theirs = make_temporal_pair()
    assert list(ours.hook_dict) == list(theirs.hook_dict)


def test_cfg_to_dict_matches_sae_lens():
    ours, theirs = make_temporal_pair(
        normalize_activations="constant_scalar_rescale", activation_normalization_factor=0.25
    )
    d_o, d_t = ours.cfg.to_dict(), theirs.cfg.to_dict()
    assert set(d_o) == set(d_t)
    for key in d_t:
        if key == "metadata":
            md_o = {k: v for k, v in d_o[key].items() if k != "fastsae_version"}
            assert md_o == d_t[key]
        else:
            assert d_o[key] == d_t[key], key
    assert d_o["architecture"] == "temporal"


def test_config_round_trip_both_libraries():
    kwargs = temporal_kwargs(
        tied_weights=False,
        sae_diff_type="relu",
        kval_topk=None,
        n_attn_layers=2,
        normalize_activations="constant_scalar_rescale",
        activation_normalization_factor=3.5,
    )
    cfg = TemporalSAEConfig(**kwargs, metadata=SAEMetadata(hook_name=HOOK_NAME))
    d = json.loads(json.dumps(cfg.to_dict()))
    again = SAEConfig.from_dict(d)
    assert type(again) is TemporalSAEConfig
    assert again.to_dict() == cfg.to_dict()
    assert TemporalSAEConfig.from_dict(d) == again
    theirs = sae_lens.SAEConfig.from_dict(d)
    assert type(theirs) is sae_lens.TemporalSAEConfig
    back = SAEConfig.from_dict(theirs.to_dict())
    for f in dataclasses.fields(TemporalSAEConfig):
        if f.name != "metadata":
            assert getattr(back, f.name) == getattr(cfg, f.name), f.name


# --------------------------------------------------------------------------- maths
@pytest.mark.parametrize("shape", list(SEQ_SHAPES))
@pytest.mark.parametrize("normalize_activations", TEMPORAL_NORMALIZE_ACTIVATIONS)
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_encode_decode_forward_parity(shape, normalize_activations, apply_b_dec_to_input):
    ours, theirs = make_temporal_pair(
        normalize_activations=normalize_activations,
        apply_b_dec_to_input=apply_b_dec_to_input,
        activation_normalization_factor=0.4,
    )
    x = seq_input(*SEQ_SHAPES[shape])
    check_encode_decode_forward(ours, theirs, x)
    z_novel, z_pred = ours.encode_with_predictions(x)
    t_novel, t_pred = theirs.encode_with_predictions(x)
    assert_close(z_novel, t_novel, what="novel codes")
    assert_close(z_pred, t_pred, what="predicted codes")
    if SEQ_SHAPES[shape][1] > 1:
        assert (t_pred != 0).any(), "test setup: the attention predicts nothing"


@pytest.mark.parametrize(
    "overrides",
    [
        {"tied_weights": False},
        {"tied_weights": False, "apply_b_dec_to_input": False},
        {"tied_weights": True, "apply_b_dec_to_input": False},
        {"sae_diff_type": "relu"},
        {"sae_diff_type": "topk", "kval_topk": None},
        {"n_attn_layers": 0},
        {"n_attn_layers": 3},
        {"n_heads": 1, "bottleneck_factor": 1},
        {"n_heads": 2, "bottleneck_factor": 6, "kval_topk": D_SAE},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_config_variants_parity(overrides):
    ours, theirs = make_temporal_pair(**overrides)
    x = seq_input(3, 6)
    check_encode_decode_forward(ours, theirs, x)
    assert_close(ours.encode_with_predictions(x)[1], theirs.encode_with_predictions(x)[1])
    n_active = (theirs.encode(x) != 0).sum(-1)
    if overrides.get("sae_diff_type", "topk") == "topk" and overrides.get("kval_topk", K) == K:
        assert int(n_active.max()) <= K


def test_forward_is_the_decoded_sum_of_both_codes():
    ours, _ = make_temporal_pair(normalize_activations="layer_norm")
    x = seq_input(2, 6)
    z_novel, z_pred = ours.encode_with_predictions(x)
    full = ours.decode(z_novel + z_pred)
    assert_close(ours(x), full, what="forward")
    assert rel_err(ours.decode(z_novel), full) > 1e-3, "the prediction should matter"


def test_causal_a_later_token_changes_nothing_before_it():
    ours, theirs = make_temporal_pair()
    x = seq_input(2, 7)
    y = x.clone()
    y[:, 4] += 3.0
    for sae in (ours, theirs):
        out_x, out_y = sae(x), sae(y)
        torch.testing.assert_close(out_x[:, :4], out_y[:, :4], rtol=0, atol=0)
        assert not torch.allclose(out_x[:, 5:], out_y[:, 5:])
    # a prefix of the sequence encodes as the prefix of the whole
    assert_close(ours(x[:, :3]), ours(x)[:, :3], what="prefix")


@pytest.mark.parametrize("normalize_activations", ["none", "layer_norm"])
def test_hook_z_reshaping(normalize_activations):
    ours, theirs = make_temporal_pair(
        hook_name=HOOK_Z_NAME,
        reshape_activations="hook_z",
        normalize_activations=normalize_activations,
    )
    x = make_input((3, 5, 4, 5))
    acts_t = theirs.encode(x)
    assert acts_t.shape == (3, 5, D_SAE)
    assert_close(ours.encode(x), acts_t, what="encode")
    assert_close(ours.decode(acts_t), theirs.decode(acts_t), what="decode")
    out_t = theirs(x)
    assert out_t.shape == x.shape
    assert_close(ours(x), out_t, what="forward")
    code = ours.encode_sparse(x)
    assert_close(code.to_dense(D_SAE), theirs.encode(x), what="encode_sparse")
    assert_close(ours.decode_sparse(code), theirs.decode(theirs.encode(x)), what="decode_sparse")
    out_o, cache_o = ours.run_with_cache(x)
    _, cache_t = theirs.run_with_cache(x)
    assert_close(out_o, out_t, what="run_with_cache output")
    assert list(cache_o) == list(cache_t)
    for name in cache_t:
        assert_close(cache_o[name], cache_t[name], what=name)
    with pytest.raises(ValueError, match="n_heads, d_head"):
        ours(make_input((5, 4, 5)))


def test_attention_module_matches_sae_lens_with_map():
    torch.manual_seed(5)
    ours = ManualAttention(D_SAE, n_heads=4, bottleneck_factor=3)
    torch.manual_seed(5)
    theirs = SLManualAttention(D_SAE, n_heads=4, bottleneck_factor=3)
    for name, p in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], p), name
    ctx, tgt = make_input((2, 6, D_SAE), seed=2), make_input((2, 6, D_SAE), seed=3)
    out_o, map_o = ours(ctx, tgt, get_attn_map=True)
    out_t, map_t = theirs(ctx, tgt, get_attn_map=True)
    assert_close(out_o, out_t, what="attention output")
    assert_close(map_o, map_t, what="attention map")
    assert ours(ctx, tgt)[1] is None
    # the map is causal and its rows are distributions; it is what the output used
    assert torch.equal(map_o.triu(1), torch.zeros_like(map_o))
    torch.testing.assert_close(map_o.sum(-1), torch.ones(2, 4, 6))
    q = ours.q_target(tgt).view(2, 6, 4, 5).transpose(1, 2)
    k = ours.k_ctx(ctx).view(2, 6, 4, 5).transpose(1, 2)
    assert_close(causal_attention_weights(q, k), sl_get_attention(q, k), what="weights")
    v = ours.v_ctx(ctx).view(2, 6, 4, 15).transpose(1, 2)
    by_hand = ours.c_proj((map_o @ v).transpose(1, 2).reshape(2, 6, D_SAE))
    assert_close(out_o, by_hand, tol=1e-5, what="output from the map")


# --------------------------------------------------------------------------- hooks
def test_run_with_cache_matches_sae_lens():
    ours, theirs = make_temporal_pair()
    x = seq_input(3, 5)
    out_o, cache_o = ours.run_with_cache(x)
    out_t, cache_t = theirs.run_with_cache(x)
    assert_close(out_o, out_t, what="output")
    assert list(cache_o) == list(cache_t)
    for name in cache_t:
        assert_close(cache_o[name], cache_t[name], what=name)


@pytest.mark.parametrize("hook", ["hook_sae_acts_post", "hook_sae_acts_pre", "hook_sae_input"])
def test_hooked_forward_matches_sae_lens(hook):
    ours, theirs = make_temporal_pair()
    x = seq_input(3, 5)
    latent = int(theirs.encode(x).abs().sum(dim=(0, 1)).argmax())

    def edit(t, hook):
        if hook.name == "hook_sae_acts_post":
            t = t.clone()
            t[..., latent] = 0
            return t
        return t * 0.5

    hooks = [(hook, edit)]
    out_t = theirs.run_with_hooks(x, fwd_hooks=hooks)
    assert rel_err(out_t, theirs(x)) > 1e-4, "test setup: the hook changes the output"
    assert_close(ours.run_with_hooks(x, fwd_hooks=hooks), out_t, what=f"hooked at {hook}")
    assert_close(ours(x), theirs(x), what="after the hooks are removed")


# --------------------------------------------------------------------------- error term
def test_use_error_term_gives_the_input_back():
    """Deliberate difference: sae-lens's temporal forward ignores use_error_term."""
    ours, theirs = make_temporal_pair(use_error_term=True)
    theirs.use_error_term = True
    x = seq_input(3, 5)
    assert_close(ours(x), x, what="forward with the error term")
    ours.use_error_term = False
    assert_close(theirs(x), ours(x), what="sae-lens: the reconstruction only")
    ours.use_error_term = True
    _, cache = ours.run_with_cache(x)
    assert_close(cache["hook_sae_error"], x - theirs(x), what="hook_sae_error")
    # a hooked latent moves the output by what it moves the reconstruction
    latent = int(theirs.encode(x).abs().sum(dim=(0, 1)).argmax())

    def zero_latent(acts, hook):
        acts = acts.clone()
        acts[..., latent] = 0
        return acts

    hooks = [("hook_sae_acts_post", zero_latent)]
    expected = x + theirs.run_with_hooks(x, fwd_hooks=hooks) - theirs(x)
    out = ours.run_with_hooks(x, fwd_hooks=hooks)
    assert rel_err(out, x) > 1e-3
    assert_close(out, expected, what="error term + hooked latent")
    # the error term carries no gradient: d out / d x is the reconstruction's
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    g = make_input(x.shape, seed=3)
    (ours(x1) * g).sum().backward()
    (theirs(x2) * g).sum().backward()
    assert_close(x1.grad, x2.grad, what="x.grad")


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("weighted", [False, True], ids=["sum", "weighted"])
@pytest.mark.parametrize("tied", [True, False])
def test_gradients_match_sae_lens(weighted, tied):
    ours, theirs = make_temporal_pair(tied_weights=tied, n_attn_layers=2)
    _grad_case(ours, theirs, seq_input(3, 5), weighted)
    assert ours.attn_layers[1].q_target.weight.grad.abs().sum() > 0


def test_sparse_path_gradients_match_dense():
    ours, theirs = make_temporal_pair()
    x = seq_input(2, 5)
    g = make_input(x.shape, seed=3)
    (ours.decode_sparse(ours.encode_sparse(x)) * g).sum().backward()
    (theirs.decode(theirs.encode(x)) * g).sum().backward()
    ours_params = dict(ours.named_parameters())
    for name, p_t in theirs.named_parameters():
        grad = ours_params[name].grad
        if name.endswith("k_ctx.bias"):
            # a bias on every key shifts a query's scores alike: the softmax ignores it,
            # so its gradient is rounding noise in both
            assert grad.abs().max() < 1e-5 and p_t.grad.abs().max() < 1e-5
        else:  # the sparse decode sums in another order; attention gradients carry it
            assert_close(grad, p_t.grad, tol=1e-4, what=f"{name}.grad")


# --------------------------------------------------------------------------- dtype / device
def test_float64_input_is_cast_like_sae_lens():
    ours, theirs = make_temporal_pair()
    x = seq_input(2, 4, dtype=torch.float64)
    acts_t = theirs.encode(x)
    assert acts_t.dtype == torch.float32
    assert_close(ours.encode(x), acts_t, what="encode")
    assert_close(ours(x), theirs(x), what="forward")


@pytest.mark.parametrize("to_args", [((torch.float64,), {}), (("cpu",), {"dtype": torch.float64})])
def test_to_float64_keeps_cfg_in_sync(to_args):
    args, kwargs = to_args
    ours, theirs = make_temporal_pair()
    assert ours.to(*args, **kwargs) is ours
    theirs.to(*args, **kwargs)
    assert ours.cfg.dtype == theirs.cfg.dtype == "float64"
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    check_encode_decode_forward(ours, theirs, seq_input(2, 4, dtype=torch.float64), tol=1e-12)


def test_float64_at_construction():
    ours, theirs = make_temporal_pair(dtype="float64")
    assert ours.attn_layers[0].c_proj.weight.dtype == torch.float64
    check_encode_decode_forward(ours, theirs, seq_input(2, 4, dtype=torch.float64), tol=1e-12)


# --------------------------------------------------------------------------- folding
def test_folding_is_refused_like_sae_lens():
    ours, theirs = make_temporal_pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    eye = torch.eye(D_IN)
    calls = [
        ("fold_W_dec_norm", ()),
        ("fold_activation_norm_scaling_factor", (2.0,)),
        ("fold_activation_whitening", (torch.zeros(D_IN), eye, eye)),
    ]
    for name, args in calls:
        with pytest.raises(NotImplementedError):
            getattr(theirs, name)(*args)
        with pytest.raises(NotImplementedError, match="TemporalSAE"):
            getattr(ours, name)(*args)
    with pytest.raises(NotImplementedError, match="TemporalSAE"):
        ours.fold_and_get_W_dec_norm()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert ours.cfg.normalize_activations == "none"
    assert_close(ours.get_W_dec_norm(), theirs.get_W_dec_norm(), what="get_W_dec_norm")


# --------------------------------------------------------------------------- decode
def test_decode_warns_that_the_prediction_is_missing():
    ours, _ = make_temporal_pair()
    acts = ours.encode(seq_input(2, 3))
    with pytest.warns(UserWarning, match="predicted from the context is missing"):
        ours.decode(acts)
    # the fast path stays quiet: forward never goes through decode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(seq_input(2, 3))
    # decode takes any leading shape, as sae-lens's matmul does
    flat = acts.reshape(-1, D_SAE)
    assert_close(ours.decode(flat), ours.decode(acts).reshape(-1, D_IN), what="flat decode")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape", [(7, D_IN), (D_IN,), (2, 3, 4, D_IN), (2, 3, D_IN + 1)], ids=str)
def test_inputs_sae_lens_cannot_take_are_value_errors(shape):
    ours, theirs = make_temporal_pair()
    x = torch.randn(*shape)
    with pytest.raises(Exception):  # noqa: B017 (sae-lens fails on the unpacking or matmul)
        theirs(x)
    for fn in (ours.encode, ours.encode_sparse, ours.forward, ours.encode_with_predictions):
        with pytest.raises(ValueError, match=r"\[batch, seq, d_in=20\].*got shape"):
            fn(x)


@pytest.mark.parametrize("batch, seq", [(0, 4), (2, 0)])
def test_empty_batch_or_sequence_like_sae_lens(batch, seq):
    ours, theirs = make_temporal_pair()
    x = torch.randn(batch, seq, D_IN)
    assert ours(x).shape == theirs(x).shape == (batch, seq, D_IN)
    assert ours.encode(x).shape == theirs.encode(x).shape == (batch, seq, D_SAE)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_inputs_and_codes_are_type_errors(dtype):
    ours, _ = make_temporal_pair()
    with pytest.raises(TypeError, match=f"SAE input must be a floating-point.*{dtype}"):
        ours(torch.ones(2, 3, D_IN, dtype=dtype))
    acts = ours.encode(seq_input(2, 3))
    with pytest.raises(TypeError, match=f"decode's feature activations.*{dtype}"):
        ours.decode(acts.to(dtype))
    code = ours.encode_sparse(seq_input(2, 3))
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        ours.decode_sparse(SparseCode(code.values, code.indices.to(torch.float32)))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"normalize_activations": "covariance_whitening"}, "normalize_activations"),
        ({"normalize_activations": "bogus"}, "normalize_activations"),
        ({"sae_diff_type": "jumprelu"}, "sae_diff_type"),
        ({"kval_topk": 0}, "kval_topk"),
        ({"kval_topk": D_SAE + 1}, "kval_topk"),
        ({"kval_topk": 2.5}, "kval_topk"),
        ({"n_heads": 0}, "n_heads"),
        ({"n_attn_layers": -1}, "n_attn_layers"),
        ({"bottleneck_factor": 7}, "bottleneck_factor \\* n_heads"),
        ({"n_heads": 7}, "bottleneck_factor \\* n_heads"),
        ({"tied_weights": "yes"}, "tied_weights"),
        (
            {
                "normalize_activations": "constant_scalar_rescale",
                "activation_normalization_factor": 0,
            },
            "activation_normalization_factor",
        ),
        ({"activation_normalization_factor": "1"}, "activation_normalization_factor"),
        ({"d_sae": 0}, "d_sae"),
    ],
)
def test_bad_configs_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        TemporalSAEConfig(**temporal_kwargs(**overrides))


def test_config_accepts_what_sae_lens_accepts():
    # the attention-width rule applies only when there is an attention layer
    cfg = TemporalSAEConfig(d_in=D_IN, d_sae=D_SAE, n_attn_layers=0)
    sae = TemporalSAE(cfg)
    theirs = sae_lens.TemporalSAE(
        sae_lens.TemporalSAEConfig(d_in=D_IN, d_sae=D_SAE, n_attn_layers=0)
    )
    assert len(sae.attn_layers) == len(theirs.attn_layers) == 0
    for mode in TEMPORAL_NORMALIZE_ACTIVATIONS:  # d_sae=512: the default 8 heads * 64
        sae_lens.TemporalSAEConfig(d_in=D_IN, d_sae=512, normalize_activations=mode)
        cfg = TemporalSAEConfig(d_in=D_IN, d_sae=512, normalize_activations=mode)
        assert cfg.normalize_activations == mode
    with pytest.raises(ValueError):
        sae_lens.TemporalSAEConfig(
            d_in=D_IN, d_sae=D_SAE, normalize_activations="covariance_whitening"
        )


# --------------------------------------------------------------------------- saved folders
@pytest.mark.parametrize(
    "overrides",
    [{}, {"tied_weights": False, "n_attn_layers": 2, "normalize_activations": "layer_norm"}],
    ids=["tied", "untied"],
)
def test_fastsae_folder_loads_in_sae_lens_and_back(overrides, tmp_path):
    ours, _ = make_temporal_pair(
        seed=4,
        activation_normalization_factor=0.5,
        **({"normalize_activations": "constant_scalar_rescale"} | overrides),
    )
    weights_path, cfg_path = ours.save_model(tmp_path / "sae")
    assert weights_path.name == "sae_weights.safetensors" and cfg_path.name == "cfg.json"
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert type(theirs) is sae_lens.TemporalSAE
    assert theirs.cfg.metadata.hook_name == HOOK_NAME
    x = seq_input(2, 5)
    assert_close(ours(x), theirs(x), what="forward")
    assert_close(ours.encode(x), theirs.encode(x), what="encode")
    loaded = fastsae.SAE.load_from_disk(tmp_path / "sae")
    assert type(loaded) is TemporalSAE
    assert loaded.cfg.to_dict() == ours.cfg.to_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert_close(loaded(x), ours(x), tol=0.0, what="round trip")
    assert type(TemporalSAE.load_from_disk(tmp_path / "sae", dtype="float64")) is TemporalSAE


@pytest.mark.parametrize("tied", [True, False])
def test_sae_lens_folder_loads_in_fastsae(tied, tmp_path):
    _, theirs = make_temporal_pair(seed=5, tied_weights=tied)
    theirs.save_model(tmp_path)
    ours = fastsae.SAE.load_from_disk(tmp_path)
    assert type(ours) is TemporalSAE
    assert ours.cfg.tied_weights is tied
    assert ours.cfg.metadata.model_name == "gpt2"
    x = seq_input(3, 4)
    assert_close(ours(x), theirs(x), what="forward")
    assert_close(ours.encode(x), theirs.encode(x), what="encode")


def test_folder_with_missing_attention_weight_names_it(tmp_path):
    ours, _ = make_temporal_pair()
    ours.save_model(tmp_path)
    state = {k: v for k, v in ours.state_dict().items() if k != "attn_layers.0.v_ctx.bias"}
    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['attn_layers.0.v_ctx.bias'\]"):
        fastsae.SAE.load_from_disk(tmp_path)


# --------------------------------------------------------------------------- live bridge
def test_bridge_both_ways():
    _, theirs = make_temporal_pair(seed=6, tied_weights=False)
    ours = fastsae.SAE.from_sae_lens(theirs)
    assert type(ours) is TemporalSAE
    x = seq_input(2, 5)
    assert_close(ours(x), theirs(x), what="from_sae_lens")
    back = ours.to_sae_lens()
    assert type(back) is sae_lens.TemporalSAE
    assert_close(back(x), ours(x), what="to_sae_lens")


# --------------------------------------------------------------------------- pretrained loader
def _write_canrager_folder(root, *, tied: bool, dtype: str = "float32") -> dict:
    """A canrager/temporalSAEs-style folder (``conf.yaml`` + ``latest_ckpt.safetensors``
    with the raw ``D``/``b``/``E`` names) under ``root/layer_3/temporal``."""
    folder = root / "layer_3" / "temporal"
    folder.mkdir(parents=True)
    conf = {
        "llm": {"dimin": D_IN},
        "sae": {
            "exp_factor": D_SAE // D_IN,
            "n_heads": 4,
            "n_attn_layers": 1,
            "bottleneck_factor": 3,
            "sae_diff_type": "topk",
            "kval_topk": K,
            "tied_weights": tied,
            "scaling_factor": 0.3,
        },
        "data": {"dtype": dtype},
    }
    (folder / "conf.yaml").write_text(yaml.safe_dump(conf))
    donor, _ = make_temporal_pair(seed=7, tied_weights=tied)
    raw = {k: v for k, v in donor.state_dict().items() if k.startswith("attn_layers.")}
    raw["D"], raw["b"] = donor.W_dec.detach(), donor.b_dec.detach()
    if not tied:
        raw["E"] = donor.W_enc.detach()
    save_file({k: v.contiguous() for k, v in raw.items()}, str(folder / "latest_ckpt.safetensors"))
    return raw


@pytest.mark.parametrize("tied", [True, False])
def test_builds_from_sae_lens_temporal_loader_output(tied, tmp_path, monkeypatch):
    """sae-lens's ``temporal_sae_huggingface_loader`` (downloads served from a local
    folder): its config and state dict build a TemporalSAE equal to sae-lens's."""
    raw = _write_canrager_folder(tmp_path, tied=tied)

    def local_download(repo_id, filename, **kwargs):
        return str(tmp_path / filename)

    monkeypatch.setattr(sl_loaders, "hf_hub_download", local_download)
    cfg_dict, state_dict, log_sparsity = sl_loaders.temporal_sae_huggingface_loader(
        "canrager/temporalSAEs", "layer_3/temporal", device="cpu"
    )
    assert log_sparsity is None
    assert cfg_dict["normalize_activations"] == "constant_scalar_rescale"
    assert cfg_dict["hook_name"] == "blocks.3.hook_resid_post"
    assert ("W_enc" in state_dict) == (not tied)

    ours = build_sae(handle_config_defaulting(dict(cfg_dict)), dict(state_dict), where="loader")
    assert type(ours) is TemporalSAE
    assert ours.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert ours.cfg.activation_normalization_factor == 0.3
    assert torch.equal(ours.W_dec, raw["D"]) and torch.equal(ours.b_dec, raw["b"])

    sl_cfg = sae_lens.SAEConfig.from_dict(sl_loaders.handle_config_defaulting(dict(cfg_dict)))
    theirs = sae_lens.TemporalSAE(sl_cfg)
    theirs.load_state_dict(state_dict)
    x = seq_input(2, 6) * 20  # activations at the scale the factor expects
    assert_close(ours(x), theirs(x), what="forward")
    assert_close(ours.encode(x), theirs.encode(x), what="encode")


# --------------------------------------------------------------------------- in a model
def test_spliced_into_a_model_sees_whole_sequences():
    from tiny_runs import tiny_config

    from fastsae.hooked import HookedSAETransformer

    model = HookedSAETransformer(tiny_config()).eval()
    d = model.cfg.d_model
    cfg = TemporalSAEConfig(
        d_in=d, d_sae=4 * d, n_heads=2, bottleneck_factor=2, kval_topk=8,
        metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"),
    )  # fmt: skip
    sae = TemporalSAE(cfg)
    tokens = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    clean = model(tokens)
    resid = model.run_with_cache(tokens)[1]["blocks.0.hook_resid_post"]
    assert resid.shape == (2, 9, d)
    spliced, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    assert rel_err(spliced, clean) > 1e-3
    assert_close(cache["blocks.0.hook_resid_post.hook_sae_output"], sae(resid), what="splice")
    model.add_sae(sae, use_error_term=True)
    assert_close(model(tokens), clean, tol=1e-5, what="with the error term")
