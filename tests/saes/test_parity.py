"""SAELens parity: every fastsae SAE against the sae-lens class of the same architecture.

The suites every architecture (or several) goes through: structure, encode / decode /
forward, hooks, the error term, gradients, folding, device and dtype moves, sparse codes
and bad input. Same weights (random, non-trivial, copied from ours into theirs with
``load_state_dict``), same inputs, outputs equal to 1e-5 relative error
(``||a - b|| / ||b||``) in fp32. Sizes are deliberately odd (d_in=20, d_sae=60, k=5,
d_out=12, 7 tokens; see ``sae_cases``). Checks of one architecture live in
``test_<architecture>.py`` beside this file.
"""

from __future__ import annotations

import pytest
import torch
from sae_cases import (
    ARCHS,
    D_IN,
    D_OUT,
    D_SAE,
    HOOK_NAME,
    NO_ACT_HOOK_ARCHS,
    SHAPES,
    TIED_ARCHS,
    TOPK_ARCHS,
    TRANSCODERS,
    _grad_case,
    assert_close,
    cfg_kwargs,
    check_encode_decode_forward,
    make_input,
    make_pair,
    rel_err,
)
from sae_lens.registry import get_sae_class

from fastsae import SparseCode
from fastsae.saes import SAE_CLASSES
from fastsae.saes.config import config_class_for_architecture

pytestmark = [
    # sae-lens deprecates setting use_error_term on the SAE itself; we still test it.
    pytest.mark.filterwarnings("ignore:Setting use_error_term directly:DeprecationWarning"),
]

PLAIN_SAES = [a for a in ARCHS if a not in TRANSCODERS]
# architectures whose activation hooks fire (sae-lens's matching pursuit fires none)
ACT_HOOK_ARCHS = [a for a in ARCHS if a not in NO_ACT_HOOK_ARCHS]
NORMALIZE_MODES = [
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
]
N_HEADS, D_HEAD = 4, 5  # hook_z: D_IN = N_HEADS * D_HEAD
HOOK_Z_NAME = "blocks.0.attn.hook_z"
HOOK_NAMES = [
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_output",
    "hook_sae_recons",
    "hook_sae_error",
]

FP64_TOL = 1e-12


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_names_match_sae_lens(arch):
    their_cls, their_cfg_cls = get_sae_class(arch)
    assert SAE_CLASSES[arch].config_class.architecture() == their_cfg_cls.architecture() == arch
    assert SAE_CLASSES[arch].__name__ == their_cls.__name__


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_names_and_shapes(arch):
    ours, theirs = make_pair(arch)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == their_shapes
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_init_has_sae_lens_structure(arch):
    """Untouched SAEs: same parameters, zero biases/thresholds, tied W_enc for SAEs."""
    ck = cfg_kwargs(arch)
    ours = SAE_CLASSES[arch](SAE_CLASSES[arch].config_class(**ck))
    their_cls, their_cfg_cls = get_sae_class(arch)
    theirs = their_cls(their_cfg_cls(**ck))
    for name, p in theirs.named_parameters():
        q = getattr(ours, name)
        assert q.shape == p.shape and q.dtype == p.dtype, name
        if name not in ("W_enc", "W_dec"):
            assert bool((q == 0).all()) == bool((p == 0).all()), name
    if arch in PLAIN_SAES:
        assert torch.equal(ours.W_enc, ours.W_dec.T)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_sae_lens_initial_weights(arch):
    """Initialisation consumes the RNG as sae-lens does: same seed, same weights."""
    ck = cfg_kwargs(arch)
    torch.manual_seed(123)
    ours = SAE_CLASSES[arch](SAE_CLASSES[arch].config_class(**ck))
    their_cls, their_cfg_cls = get_sae_class(arch)
    torch.manual_seed(123)
    theirs = their_cls(their_cfg_cls(**ck))
    for name, p_t in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], p_t), name


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_points_in_sae_lens_order(arch):
    ours, theirs = make_pair(arch)
    assert list(theirs.hook_dict) == HOOK_NAMES
    assert list(ours.hook_dict) == list(theirs.hook_dict)


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_hook_name_and_flat_access(arch):
    ours, theirs = make_pair(arch)
    assert ours.cfg.metadata.hook_name == theirs.cfg.metadata.hook_name == HOOK_NAME
    assert ours.cfg.metadata["hook_name"] == HOOK_NAME
    assert ours.cfg.hook_name == HOOK_NAME  # flat spelling of SAELens < 6
    assert ours.cfg.model_name == "gpt2"
    assert ours.cfg.metadata.neuronpedia_id is None  # unset keys read as None
    ours.cfg.hook_name = "blocks.1.hook_resid_pre"
    assert ours.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"


@pytest.mark.parametrize("arch", ARCHS)
def test_cfg_to_dict_matches_sae_lens(arch):
    ours, theirs = make_pair(arch)
    d_o, d_t = ours.cfg.to_dict(), theirs.cfg.to_dict()
    assert set(d_o) == set(d_t)
    version_keys = {"fastsae_version"}  # the sae-lens versions match too
    for key in d_t:
        if key == "metadata":
            md_o = {k: v for k, v in d_o[key].items() if k not in version_keys}
            md_t = {k: v for k, v in d_t[key].items() if k not in version_keys}
            assert md_o == md_t
        else:
            assert d_o[key] == d_t[key], key


# --------------------------------------------------------------------------- maths
def _option_cases():
    cases = []
    for arch in ARCHS:
        b_dec_options = [False] if arch in TRANSCODERS else [True, False]
        for apply_b_dec in b_dec_options:
            for mode in NORMALIZE_MODES:
                for shape in SHAPES:
                    cases.append(pytest.param(arch, apply_b_dec, mode, shape))
    return cases


@pytest.mark.parametrize(
    "arch, apply_b_dec_to_input, normalize_activations, shape", _option_cases()
)
def test_encode_decode_forward_parity(arch, apply_b_dec_to_input, normalize_activations, shape):
    ours, theirs = make_pair(
        arch,
        apply_b_dec_to_input=apply_b_dec_to_input,
        normalize_activations=normalize_activations,
    )
    check_encode_decode_forward(ours, theirs, make_input(SHAPES[shape]))


@pytest.mark.parametrize("arch", PLAIN_SAES)
@pytest.mark.parametrize("normalize_activations", ["none", "layer_norm"])
def test_hook_z_reshaping(arch, normalize_activations):
    kwargs = {"reshape_activations": "hook_z", "normalize_activations": normalize_activations}
    if arch in TOPK_ARCHS:
        kwargs["rescale_acts_by_decoder_norm"] = True
    ours, theirs = make_pair(arch, hook_name=HOOK_Z_NAME, **kwargs)
    assert ours.hook_z_reshaping_mode and theirs.hook_z_reshaping_mode
    x = make_input((3, 5, N_HEADS, D_HEAD))
    acts_t = theirs.encode(x)
    assert acts_t.shape == (3, 5, D_SAE)
    assert_close(ours.encode(x), acts_t, what="encode")
    recon_t = theirs.decode(acts_t)
    assert recon_t.shape == x.shape
    assert_close(ours.decode(acts_t), recon_t, what="decode")
    out_t = theirs(x)
    assert_close(ours(x), out_t, what="forward")
    code = ours.encode_sparse(x)
    assert code.values.shape[:2] == (3, 5)
    assert_close(code.to_dense(D_SAE), theirs.encode(x), what="encode_sparse")
    assert_close(ours.decode_sparse(code), theirs.decode(theirs.encode(x)), what="decode_sparse")
    # run_with_cache sees the flattened input at hook_sae_input, as in sae-lens
    out_o, cache_o = ours.run_with_cache(x)
    _, cache_t = theirs.run_with_cache(x)
    assert_close(out_o, out_t, what="run_with_cache output")
    assert list(cache_o.keys()) == list(cache_t.keys())
    assert cache_o["hook_sae_input"].shape == (3, 5, D_IN)
    for name in cache_t:
        assert_close(cache_o[name], cache_t[name], what=name)
    # error term: the output is the input again
    ours.use_error_term = theirs.use_error_term = True
    out_t = theirs(x)
    assert_close(ours(x), out_t, what="forward with error term")
    assert_close(ours(x), x, what="error term gives back x")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("normalize_activations", NORMALIZE_MODES)
def test_process_sae_in_and_misc_api(arch, normalize_activations):
    ours, theirs = make_pair(arch, normalize_activations=normalize_activations)
    x = make_input(SHAPES["3d"])
    assert_close(ours.process_sae_in(x), theirs.process_sae_in(x), what="process_sae_in")
    assert_close(ours.get_W_dec_norm(), theirs.get_W_dec_norm(), what="get_W_dec_norm")
    assert ours.get_name() == theirs.get_name()
    if arch in TRANSCODERS:
        assert ours.d_out == theirs.d_out == D_OUT
        out_o, acts_o = ours.forward_with_activations(x)
        out_t, acts_t = theirs.forward_with_activations(x)
        assert_close(out_o, out_t, what="forward_with_activations output")
        assert_close(acts_o, acts_t, what="forward_with_activations acts")


@pytest.mark.parametrize("arch", ARCHS)
def test_input_dtype_is_cast_like_sae_lens(arch):
    ours, theirs = make_pair(arch)
    x = make_input(SHAPES["2d"], dtype=torch.float64)
    acts_t = theirs.encode(x)
    assert acts_t.dtype == torch.float32
    assert_close(ours.encode(x), acts_t, what="encode of float64 input")
    code = ours.encode_sparse(x)
    assert code.values.dtype == torch.float32
    assert_close(ours.decode_sparse(code), theirs.decode(theirs.encode(x)), what="decode_sparse")
    if "skip" not in arch:  # sae-lens skip transcoders matmul x with W_skip uncast
        assert_close(ours(x), theirs(x), what="forward of float64 input")


# --------------------------------------------------------------------------- error term
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("normalize_activations", ["none", "constant_norm_rescale", "layer_norm"])
def test_use_error_term(arch, shape, normalize_activations):
    ours, theirs = make_pair(arch, use_error_term=True, normalize_activations=normalize_activations)
    assert ours.use_error_term and theirs.use_error_term
    x = make_input(SHAPES[shape])
    out_t = theirs(x)
    out_o = ours(x)
    assert_close(out_o, out_t, what="forward with use_error_term")
    if arch in PLAIN_SAES:
        assert_close(out_o, x, what="forward with error term equals input")
        # the error term is what sae-lens computes
        _, cache_o = ours.run_with_cache(x)
        _, cache_t = theirs.run_with_cache(x)
        assert_close(cache_o["hook_sae_error"], cache_t["hook_sae_error"], what="hook_sae_error")


@pytest.mark.parametrize("arch", [a for a in PLAIN_SAES if a in ACT_HOOK_ARCHS])
def test_use_error_term_with_hooked_latent(arch):
    """A hook that zeroes a latent changes the output by the same amount in both."""
    ours, theirs = make_pair(arch, use_error_term=True)
    x = make_input(SHAPES["3d"])
    latent = int(theirs.encode(x).abs().sum(dim=(0, 1)).argmax())

    def zero_latent(acts, hook):
        acts = acts.clone()
        acts[..., latent] = 0
        return acts

    hooks = [("hook_sae_acts_post", zero_latent)]
    out_t = theirs.run_with_hooks(x, fwd_hooks=hooks)
    out_o = ours.run_with_hooks(x, fwd_hooks=hooks)
    assert rel_err(out_t, x) > 1e-3, "test setup: the hook should change the output"
    assert_close(out_o, out_t, what="error term + hooked latent")


# --------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_run_with_cache_matches_sae_lens(arch, shape):
    ours, theirs = make_pair(arch)
    x = make_input(SHAPES[shape])
    out_o, cache_o = ours.run_with_cache(x)
    out_t, cache_t = theirs.run_with_cache(x)
    assert_close(out_o, out_t, what="run_with_cache output")
    assert list(cache_o.keys()) == list(cache_t.keys())
    for name in cache_t:
        assert_close(cache_o[name], cache_t[name], what=name)


@pytest.mark.parametrize("arch", ACT_HOOK_ARCHS)
def test_hook_on_acts_post_zeroing_a_latent(arch):
    ours, theirs = make_pair(arch)
    x = make_input(SHAPES["3d"])
    acts = theirs.encode(x)
    latent = int(acts.abs().sum(dim=(0, 1)).argmax())
    assert acts[..., latent].abs().sum() > 0

    def zero_latent(acts, hook):
        acts = acts.clone()
        acts[..., latent] = 0
        return acts

    hooks = [("hook_sae_acts_post", zero_latent)]
    out_t = theirs.run_with_hooks(x, fwd_hooks=hooks)
    out_o = ours.run_with_hooks(x, fwd_hooks=hooks)
    assert rel_err(out_t, theirs(x)) > 1e-4, "test setup: zeroing the latent changes the output"
    assert_close(out_o, out_t, what="hooked forward")
    # hooks are removed afterwards, and the plain forward is back
    assert not ours._acts_hooked()
    assert_close(ours(x), theirs(x), what="forward after hooks removed")


@pytest.mark.parametrize("arch", ACT_HOOK_ARCHS)
def test_hook_on_acts_pre(arch):
    ours, theirs = make_pair(arch)
    x = make_input(SHAPES["2d"])

    def halve(acts, hook):
        return acts * 0.5

    hooks = [("hook_sae_acts_pre", halve)]
    out_t = theirs.run_with_hooks(x, fwd_hooks=hooks)
    out_o = ours.run_with_hooks(x, fwd_hooks=hooks)
    assert rel_err(out_t, theirs(x)) > 1e-4
    assert_close(out_o, out_t, what="forward with hook on hook_sae_acts_pre")


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_hook_on_recons_and_input(arch):
    ours, theirs = make_pair(arch)
    x = make_input(SHAPES["2d"])
    hooks = [
        ("hook_sae_input", lambda t, hook: t * 1.5),
        ("hook_sae_recons", lambda t, hook: t + 0.25),
    ]
    out_t = theirs.run_with_hooks(x, fwd_hooks=hooks)
    assert rel_err(out_t, theirs(x)) > 1e-4
    assert_close(ours.run_with_hooks(x, fwd_hooks=hooks), out_t, what="input/recons hooks")


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("weighted", [False, True], ids=["sum", "weighted"])
def test_gradients_match_sae_lens(arch, shape, weighted):
    ours, theirs = make_pair(arch)
    _grad_case(ours, theirs, make_input(SHAPES[shape]), weighted)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
@pytest.mark.parametrize("normalize_activations", ["constant_norm_rescale", "layer_norm"])
def test_gradients_with_normalization(arch, normalize_activations):
    ours, theirs = make_pair(arch, normalize_activations=normalize_activations)
    _grad_case(ours, theirs, make_input(SHAPES["2d"]), weighted=True)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_gradients_of_sparse_path_match_dense(arch):
    """decode_sparse(encode_sparse(x)) backpropagates like sae-lens decode(encode(x))."""
    ours, theirs = make_pair(arch)
    x = make_input(SHAPES["2d"])
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (ours.decode_sparse(ours.encode_sparse(x)) * g).sum().backward()
    (theirs.decode(theirs.encode(x)) * g).sum().backward()
    ours_params = dict(ours.named_parameters())
    for name, p_t in theirs.named_parameters():
        if p_t.grad is not None:
            assert_close(ours_params[name].grad, p_t.grad, what=f"{name}.grad")


# --------------------------------------------------------------------------- folding
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale"])
def test_fold_W_dec_norm(arch, rescale):
    if rescale and arch not in TOPK_ARCHS:
        pytest.skip("rescale_acts_by_decoder_norm is a TopK option")
    ours, theirs = make_pair(arch, rescale_acts_by_decoder_norm=rescale)
    x = make_input(SHAPES["3d"])
    if (arch in TOPK_ARCHS and not rescale) or arch in TIED_ARCHS:
        with pytest.raises(NotImplementedError):
            theirs.fold_W_dec_norm()
        with pytest.raises(NotImplementedError):
            ours.fold_W_dec_norm()
        assert torch.equal(ours.W_dec, theirs.W_dec)  # nothing was changed
        return
    before = ours(x).detach()
    ours.fold_W_dec_norm()
    theirs.fold_W_dec_norm()
    torch.testing.assert_close(ours.W_dec.norm(dim=-1), torch.ones(D_SAE))
    for name, p_t in theirs.state_dict().items():
        assert_close(ours.state_dict()[name], p_t, what=f"folded {name}")
    assert_close(ours(x), before, what="forward unchanged by folding")
    check_encode_decode_forward(ours, theirs, x)


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_activation_norm_scaling_factor(arch):
    ours, theirs = make_pair(arch, normalize_activations="expected_average_only_in")
    x = make_input(SHAPES["2d"])
    scale = 2.5
    ours_before = SAE_CLASSES[arch](ours.cfg.__class__(**cfg_kwargs(arch)))
    ours_before.load_state_dict(ours.state_dict())
    ours.fold_activation_norm_scaling_factor(scale)
    theirs.fold_activation_norm_scaling_factor(scale)
    assert ours.cfg.normalize_activations == theirs.cfg.normalize_activations == "none"
    for name, p_t in theirs.state_dict().items():
        assert_close(ours.state_dict()[name], p_t, what=f"folded {name}")
    check_encode_decode_forward(ours, theirs, x)
    if arch in PLAIN_SAES:
        # folded(x) == unfolded(scale * x) / scale
        assert_close(ours(x), ours_before(scale * x) / scale, what="folded scaling")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_fold_activation_whitening(arch, apply_b_dec_to_input):
    """SAELens's ``fold_activation_whitening`` (used for covariance_whitening SAEs)."""
    if arch in TRANSCODERS and apply_b_dec_to_input:
        pytest.skip("transcoders require apply_b_dec_to_input=False")
    kwargs = {
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "covariance_whitening",
    }
    if arch in TOPK_ARCHS:
        kwargs["rescale_acts_by_decoder_norm"] = True
    ours, theirs = make_pair(arch, **kwargs)
    gen = torch.Generator().manual_seed(11)
    mean = torch.randn(D_IN, generator=gen)
    whitening = torch.eye(D_IN) + 0.1 * torch.randn(D_IN, D_IN, generator=gen)
    unwhitening = torch.linalg.inv(whitening)
    if arch in TIED_ARCHS:  # the whitening cannot be folded into a tied encoder
        for sae in (ours, theirs):
            with pytest.raises(NotImplementedError):
                sae.fold_activation_whitening(mean, whitening, unwhitening)
        assert torch.equal(ours.W_dec, theirs.W_dec)  # nothing was changed
        return
    if arch in TRANSCODERS:
        # d_out != d_in: sae-lens fails on the shapes, fastsae says why
        with pytest.raises(RuntimeError):
            theirs.fold_activation_whitening(mean, whitening, unwhitening)
        with pytest.raises(NotImplementedError, match="transcoders"):
            ours.fold_activation_whitening(mean, whitening, unwhitening)
        return
    ours.fold_activation_whitening(mean, whitening, unwhitening)
    theirs.fold_activation_whitening(mean, whitening, unwhitening)
    assert ours.cfg.normalize_activations == theirs.cfg.normalize_activations == "none"
    for name, p_t in theirs.state_dict().items():
        assert_close(ours.state_dict()[name], p_t, what=f"folded {name}")
    check_encode_decode_forward(ours, theirs, make_input(SHAPES["2d"]))


# --------------------------------------------------------------------------- device / dtype
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "to_args",
    [
        pytest.param(((), {"dtype": torch.float64}), id="dtype-kwarg"),
        pytest.param(((torch.float64,), {}), id="dtype-positional"),
        pytest.param((("cpu", torch.float64), {}), id="device-and-dtype"),
        pytest.param(((torch.zeros(1, dtype=torch.float64),), {}), id="tensor"),
    ],
)
def test_to_float64_keeps_cfg_in_sync(arch, to_args):
    args, kwargs = to_args
    ours, theirs = make_pair(arch)
    assert ours.to(*args, **kwargs) is ours
    theirs.to(*args, **kwargs)
    assert ours.dtype == theirs.dtype == torch.float64
    assert ours.cfg.dtype == theirs.cfg.dtype == "float64"
    assert ours.cfg.device == theirs.cfg.device == "cpu"
    assert ours.device == theirs.device == torch.device("cpu")
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    x = make_input(SHAPES["3d"], dtype=torch.float64)
    out_o = ours(x)
    assert out_o.dtype == torch.float64
    check_encode_decode_forward(ours, theirs, x, tol=FP64_TOL)
    # and back
    ours.to(torch.float32)
    theirs.to(torch.float32)
    assert ours.cfg.dtype == theirs.cfg.dtype == "float32"
    assert ours.dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_to_device_keeps_cfg_in_sync(arch, device):
    ours, theirs = make_pair(arch)
    ours.to(device)
    theirs.to(device)
    assert ours.cfg.device == theirs.cfg.device == "cpu"
    assert ours.device == theirs.device == torch.device("cpu")
    assert ours.cfg.dtype == theirs.cfg.dtype == "float32"
    ours.to(device=device)
    assert ours.cfg.device == "cpu"
    check_encode_decode_forward(ours, theirs, make_input(SHAPES["2d"]))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_float64_cfg_dtype_at_construction(arch):
    ours, theirs = make_pair(arch, dtype="float64")
    assert ours.dtype == theirs.dtype == torch.float64
    assert ours.W_enc.dtype == torch.float64
    check_encode_decode_forward(
        ours, theirs, make_input(SHAPES["2d"], dtype=torch.float64), FP64_TOL
    )


# --------------------------------------------------------------------------- sparse codes
@pytest.mark.parametrize("arch", ["jumprelu", "standard", "gated", "jumprelu_transcoder"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_variable_sparse_code_is_zero_padded(arch, shape):
    ours, theirs = make_pair(arch)
    x = make_input(SHAPES[shape])
    code = ours.encode_sparse(x)
    dense_t = theirs.encode(x).reshape(-1, D_SAE)
    n_active = (dense_t != 0).sum(-1)
    assert n_active.min() < n_active.max(), "test setup: rows should differ in active count"
    width = code.values.shape[-1]
    assert width == int(n_active.max())
    assert code.values.shape == (*SHAPES[shape][:-1], width)
    values = code.values.reshape(-1, width)
    indices = code.indices.reshape(-1, width)
    assert int(indices.min()) >= 0 and int(indices.max()) < D_SAE
    for row in range(dense_t.shape[0]):
        nonzero = values[row] != 0
        assert int(nonzero.sum()) == int(n_active[row])  # the rest is zero padding
        active_latents = indices[row][nonzero]
        assert set(active_latents.tolist()) == set(dense_t[row].nonzero().flatten().tolist())
        torch.testing.assert_close(values[row][nonzero], dense_t[row][active_latents])


def test_sparse_code_to_dense_ignores_padding():
    values = torch.tensor([[1.5, 0.0, 0.0], [2.0, -1.0, 0.0]])
    indices = torch.tensor([[3, 3, 0], [1, 4, 1]])
    dense = SparseCode(values, indices).to_dense(5)
    expected = torch.tensor([[0.0, 0.0, 0.0, 1.5, 0.0], [0.0, 2.0, 0.0, 0.0, -1.0]])
    torch.testing.assert_close(dense, expected)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_d_in_raises_value_error(arch):
    ours, _ = make_pair(arch)
    x = torch.randn(4, D_IN + 1)
    for fn in (ours.encode, ours.encode_sparse, ours.forward):
        with pytest.raises(ValueError, match="d_in"):
            fn(x)


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ValueError, match="no_such_arch") as info:
        config_class_for_architecture("no_such_arch")
    for arch in ARCHS:
        assert repr(arch) in str(info.value)
    for arch in ARCHS:
        assert config_class_for_architecture(arch) is SAE_CLASSES[arch].config_class


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in TRANSCODERS and a != "gated"])
def test_error_term_gradient_matches_sae_lens(arch):
    """With use_error_term the error carries no gradient (SAELens computes it in no_grad):
    d forward / d x goes through the reconstruction only."""
    ours, theirs = make_pair(arch, use_error_term=True)
    x1 = make_input((5, 7, ours.cfg.d_in)).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = make_input((5, 7, ours.cfg.d_in), seed=3)
    (ours(x1) * g).sum().backward()
    (theirs(x2) * g).sum().backward()
    assert_close(x1.grad, x2.grad, what=f"{arch} x.grad with use_error_term")
