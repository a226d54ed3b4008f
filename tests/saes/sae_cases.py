"""Shared cases for the SAE tests: sizes, random weights and sae-lens twins.

Two halves. Inference (``make_pair``): a fastsae SAE and the sae-lens SAE of the same
architecture with the same random, non-trivial weights, odd sizes (d_in=20, d_sae=60,
k=5, d_out=12), inputs and a dtype-strict ``assert_close``. Training (``_make_pair``): a
fastsae and a sae-lens training SAE with every parameter and buffer randomised (d_in=33,
d_sae=300, batch=47, k=7; the sizes are ``TRAIN_*`` here, test files import them under
their usual names), one training step's output and its comparison. A plain module
(imported as ``from sae_cases import ...``), not a test file.
"""

from __future__ import annotations

import copy
import math

import sae_testing
import torch
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import SAEMetadata as SLMetadata
from sae_lens.saes.sae import TrainStepInput as SLTrainStepInput

from fastsae import SparseCode
from fastsae.saes import (
    SAE_CLASSES,
    TrainStepInput,
    training_config_class_for_architecture,
    training_sae_class_for_architecture,
)
from fastsae.saes.config import SAEMetadata

FP32_TOL = 1e-5

# --------------------------------------------------------------------------- inference
# Sequence SAEs take only [batch, seq, d_in] and, as in sae-lens, fold nothing: the flat
# inputs and folds of the shared suites do not apply. tests/saes/test_temporal.py runs
# the same checks on sequences (make_pair and cfg_kwargs still build its pairs).
SEQUENCE_ARCHS = ["temporal"]
ARCHS = sorted(a for a in SAE_CLASSES if a not in SEQUENCE_ARCHS)
TRANSCODERS = [a for a in ARCHS if "transcoder" in a]
TOPK_ARCHS = ["topk", "abstopk"]
# Matching pursuit, as in sae-lens: its greedy encoder has no single pre-activation, so
# hook_sae_acts_pre / hook_sae_acts_post never fire, and its encoder is tied to W_dec, so
# fold_W_dec_norm and fold_activation_whitening raise NotImplementedError in both.
NO_ACT_HOOK_ARCHS = ["matching_pursuit"]
TIED_ARCHS = ["matching_pursuit"]
D_IN, D_SAE, K, D_OUT = 20, 60, 5, 12
HOOK_NAME = "blocks.0.hook_resid_pre"
SHAPES = {"2d": (7, D_IN), "3d": (3, 5, D_IN)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are exactly zero)."""
    a64, b64 = a.detach().double(), b.detach().double()
    num = (a64 - b64).norm().item()
    den = b64.norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = FP32_TOL, what: str = ""):
    assert isinstance(ours, torch.Tensor), f"{what}: ours is {type(ours)}"
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != {theirs.dtype}"
    err = rel_err(ours, theirs)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def cfg_kwargs(
    arch: str,
    *,
    apply_b_dec_to_input: bool | None = None,
    normalize_activations: str = "none",
    reshape_activations: str = "none",
    rescale_acts_by_decoder_norm: bool = False,
    dtype: str = "float32",
) -> dict:
    kwargs: dict = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": dtype,
        "device": "cpu",
        "normalize_activations": normalize_activations,
        "reshape_activations": reshape_activations,
    }
    if arch in TRANSCODERS:
        kwargs["d_out"] = D_OUT
        kwargs["apply_b_dec_to_input"] = False
    else:
        kwargs["apply_b_dec_to_input"] = (
            True if apply_b_dec_to_input is None else apply_b_dec_to_input
        )
    if arch in TOPK_ARCHS:
        kwargs["k"] = K
        kwargs["rescale_acts_by_decoder_norm"] = rescale_acts_by_decoder_norm
    if arch == "temporal":  # attention widths: D_SAE // 3 = 20 over 4 heads
        kwargs.update(n_heads=4, bottleneck_factor=3, kval_topk=K)
    return kwargs


@torch.no_grad()
def randomize_(sae: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: random biases, positive thresholds, decoder rows of varied norm."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    for name, param in sae.named_parameters():
        shape = tuple(param.shape)
        if name == "threshold":
            value = 0.05 + 0.8 * torch.rand(*shape, generator=gen, dtype=torch.float64)
        elif name == "r_mag":
            value = 0.3 * randn(*shape)
        elif name in ("W_enc", "W_skip"):
            fan_in = shape[0] if name == "W_enc" else shape[1]
            value = randn(*shape) / math.sqrt(fan_in)
        elif name == "W_dec":
            row_scale = 0.5 + torch.rand(shape[0], 1, generator=gen, dtype=torch.float64)
            value = randn(*shape) / math.sqrt(shape[1]) * row_scale
        else:  # b_enc, b_dec, b_gate, b_mag
            value = 0.3 * randn(*shape)
        param.copy_(value.to(param.dtype))


def make_pair(
    arch: str,
    *,
    use_error_term: bool = False,
    hook_name: str = HOOK_NAME,
    seed: int = 0,
    **kwargs,
):
    """(fastsae SAE, sae-lens SAE) of ``arch`` with the same random weights."""
    ck = cfg_kwargs(arch, **kwargs)
    metadata = {"hook_name": hook_name, "model_name": "gpt2", "context_size": 128}
    ours_cls = SAE_CLASSES[arch]
    ours = ours_cls(ours_cls.config_class(**ck, metadata=SAEMetadata(**metadata)), use_error_term)
    their_cls, their_cfg_cls = get_sae_class(arch)
    their_cfg = their_cfg_cls(**ck, metadata=SLMetadata(**metadata))
    if arch in TRANSCODERS:
        # sae-lens transcoders take no use_error_term argument (and ignore the attribute)
        theirs = their_cls(their_cfg)
        theirs.use_error_term = use_error_term
    else:
        theirs = their_cls(their_cfg, use_error_term=use_error_term)
    randomize_(ours, seed)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def make_input(shape: tuple[int, ...], seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # a non-zero mean and per-token scale so every normalisation mode does something
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    scale = 0.5 + 2 * torch.rand(*shape[:-1], 1, generator=gen, dtype=torch.float64)
    return ((x + 0.3) * scale).to(dtype)


def check_encode_decode_forward(ours, theirs, x: torch.Tensor, tol: float = FP32_TOL) -> None:
    """encode, decode, forward and the sparse path of ``ours`` against ``theirs``."""
    d_sae = theirs.cfg.d_sae
    acts_t = theirs.encode(x)
    acts_o = ours.encode(x)
    assert_close(acts_o, acts_t, tol, "encode")
    assert (acts_t != 0).any(), "test setup: no latent is active"
    # decode the same dense activations (each decode right after its own encode:
    # sae-lens keeps the normalisation statistics of the last encode until decode)
    recon_t = theirs.decode(acts_t)
    recon_o = ours.decode(acts_t)
    assert_close(recon_o, recon_t, tol, "decode")
    assert_close(ours(x), theirs(x), tol, "forward")
    # sparse path
    code = ours.encode_sparse(x)
    assert isinstance(code, SparseCode)
    assert code.values.shape[:-1] == acts_t.shape[:-1]
    assert code.indices.shape == code.values.shape
    assert_close(code.to_dense(d_sae), acts_t, tol, "encode_sparse(...).to_dense(d_sae)")
    recon_sparse = ours.decode_sparse(code)
    recon_t = theirs.decode(theirs.encode(x))
    assert_close(recon_sparse, recon_t, tol, "decode_sparse(encode_sparse(x))")


def _grad_case(ours, theirs, x: torch.Tensor, weighted: bool) -> None:
    x_o = x.clone().requires_grad_(True)
    x_t = x.clone().requires_grad_(True)
    out_o = ours(x_o)
    out_t = theirs(x_t)
    assert_close(out_o, out_t, what="forward")
    if weighted:
        g = torch.randn(out_t.shape, generator=torch.Generator().manual_seed(7))
        (out_o * g).sum().backward()
        (out_t * g).sum().backward()
    else:
        out_o.sum().backward()
        out_t.sum().backward()
    assert_close(x_o.grad, x_t.grad, what="x.grad")
    ours_params = dict(ours.named_parameters())
    for name, p_t in theirs.named_parameters():
        p_o = ours_params[name]
        if p_t.grad is None:
            assert p_o.grad is None or not p_o.grad.any(), f"{name}.grad: sae-lens has none"
        else:
            assert p_o.grad is not None, f"{name}.grad is None"
            assert_close(p_o.grad, p_t.grad, what=f"{name}.grad")


# --------------------------------------------------------------------------- training
# (the training comparisons use sae_testing.assert_close: no dtype check, and an
# all-zero reference is refused as vacuous)
TRAIN_D_IN, TRAIN_D_SAE, BATCH, TRAIN_K = 33, 300, 47, 7
# fp32 fastsae against a float64 run: the fp32 rounding of a whole step
FP32_VS_FP64_TOL = 1e-4
WIDTHS = [20, 90, TRAIN_D_SAE]


def _dead_mask(n_dead: int | None, *, low: int = 0) -> torch.Tensor | None:
    """``[d_sae]`` bool with ``n_dead`` dead latents drawn from ``[low, d_sae)``; None for None."""
    if n_dead is None:
        return None
    g = torch.Generator().manual_seed(1234 + n_dead + low)
    mask = torch.zeros(TRAIN_D_SAE, dtype=torch.bool)
    mask[low + torch.randperm(TRAIN_D_SAE - low, generator=g)[:n_dead]] = True
    return mask


def _cfg_kwargs(arch: str, kwargs: dict) -> dict:
    kwargs = copy.deepcopy(kwargs)
    if arch == "jumprelu":
        # wide enough that many pre-activations fall inside the estimator's window
        kwargs.setdefault("jumprelu_bandwidth", 0.4)
    return kwargs


@torch.no_grad()
def _randomize(sae: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: every parameter and buffer random, decoder rows of varied norm."""
    g = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    params = dict(sae.named_parameters())
    d_in = params["W_enc"].shape[0]
    params["W_enc"].copy_(randn(params["W_enc"]) / math.sqrt(d_in))
    row_scale = 0.5 + 1.5 * torch.rand(
        params["W_dec"].shape[0], 1, generator=g, dtype=torch.float64
    )
    params["W_dec"].copy_(randn(params["W_dec"]) * row_scale / math.sqrt(d_in))
    params["b_dec"].copy_(0.3 * randn(params["b_dec"]))
    for name in ("b_enc", "b_gate", "b_mag"):
        if name in params:
            params[name].copy_(0.5 * randn(params[name]))
    if "r_mag" in params:
        params["r_mag"].copy_(0.2 * randn(params["r_mag"]))
    if "threshold" in params:
        t = params["threshold"]
        t.copy_((0.1 + 0.9 * torch.rand(t.shape, generator=g, dtype=torch.float64)).to(t.dtype))
        t[:5] = -0.2  # the step projects these to 0 first
    buffers = dict(sae.named_buffers())
    if "topk_threshold" in buffers:
        buffers["topk_threshold"].fill_(0.37)


def _make_pair(arch: str, kwargs: dict, dtype: str = "float32", seed: int = 0):
    """(fastsae training SAE, sae-lens training SAE) with the same random weights."""
    kwargs = _cfg_kwargs(arch, kwargs)
    ours_cfg = training_config_class_for_architecture(arch)(
        d_in=TRAIN_D_IN, d_sae=TRAIN_D_SAE, dtype=dtype, **copy.deepcopy(kwargs)
    )
    ours = training_sae_class_for_architecture(arch)(ours_cfg)
    sl_cls, sl_cfg_cls = get_sae_training_class(arch)
    theirs = sl_cls(
        sl_cfg_cls(d_in=TRAIN_D_IN, d_sae=TRAIN_D_SAE, dtype=dtype, **copy.deepcopy(kwargs))
    )
    _randomize(ours, seed)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _x(dtype: torch.dtype = torch.float32, batch: int = BATCH, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1.3 * torch.randn(batch, TRAIN_D_IN, generator=g, dtype=torch.float64) + 0.2).to(dtype)


def _run(sae, step_input_cls, x, coefficients, mask):
    """One training step's output (graph kept) on a fastsae or sae-lens SAE."""
    if step_input_cls is SLTrainStepInput:
        step_input = SLTrainStepInput(x, dict(coefficients), mask, 0, False)
    else:
        step_input = TrainStepInput(x, dict(coefficients), mask, 0)
    return sae.training_forward_pass(step_input)


def _scalar(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _assert_scalar_close(ours, ref, tol, what):
    ours, ref = _scalar(ours), _scalar(ref)
    if ref == 0.0:
        assert ours == 0.0, f"{what}: {ours} != 0"
        return
    err = abs(ours - ref) / abs(ref)
    assert err <= tol, f"{what}: {ours} vs {ref}, relative error {err:.3e} > {tol:.0e}"


def _assert_grad_close(ours, ref, tol, what):
    assert ours is not None and ref is not None, f"{what}: a gradient is missing"
    if ref.abs().sum() == 0:
        assert ours.abs().sum() == 0, f"{what}: reference gradient is zero, ours is not"
        return
    sae_testing.assert_close(ours, ref, tol, what)


def _compare_steps(ours, theirs, out_o, out_t, tol):
    assert set(out_o.losses) == set(out_t.losses)
    for name in out_t.losses:
        _assert_scalar_close(out_o.losses[name], out_t.losses[name], tol, name)
    _assert_scalar_close(out_o.loss, out_t.loss, tol, "total loss")
    sae_testing.assert_close(out_o.sae_out, out_t.sae_out, tol, "sae_out")
    sae_testing.assert_close(out_o.feature_acts, out_t.feature_acts, tol, "feature_acts")
    sae_testing.assert_close(out_o.hidden_pre, out_t.hidden_pre, tol, "hidden_pre")
    out_o.loss.backward()
    out_t.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(theirs_params)
    for name, p in ours_params.items():
        _assert_grad_close(p.grad, theirs_params[name].grad, tol, f"grad {name}")
        # the step's in-place projections (JumpReLU threshold >= 0) match too
        assert torch.equal(p.detach(), theirs_params[name].detach()), name
