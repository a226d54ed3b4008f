"""Live conversion between sae_lens and fastsae modules: ``SAE.from_sae_lens`` and
``sae.to_sae_lens``, sharing or copying the parameter tensors."""

from __future__ import annotations

import pytest
import sae_lens
import torch
from sae_testing import assert_close

import fastsae
from fastsae.saes import SAE_CLASSES

pytestmark = [
    pytest.mark.filterwarnings("ignore:Setting use_error_term directly:DeprecationWarning"),
]

D_IN, D_SAE, K, D_OUT = 20, 60, 5, 12
FP32_TOL = 1e-5
# temporal SAEs take only [batch, seq, d_in] and need d_sae % (bottleneck_factor *
# n_heads) == 0: tests/saes/test_temporal.py covers them (disk both ways, bridge, dtypes)
ARCHS = sorted(a for a in SAE_CLASSES if a != "temporal")


def cfg_dict_for(arch: str, **extra) -> dict:
    cfg = {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.2.hook_resid_pre"},
    }
    if "transcoder" in arch:
        cfg.update(apply_b_dec_to_input=False, d_out=D_OUT)
    if "topk" in arch:
        cfg["k"] = K
    cfg.update(extra)
    return cfg


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name in ("threshold", "log_threshold"):
            p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            if name == "log_threshold":
                p.log_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def random_input() -> torch.Tensor:
    return torch.randn(7, D_IN, generator=torch.Generator().manual_seed(7))


def random_sae_lens(arch: str, **extra):
    return randomize_(sae_lens.SAE.from_dict(cfg_dict_for(arch, **extra)), seed=2)


# --------------------------------------------------------------------------- from_sae_lens
@pytest.mark.parametrize("arch", ARCHS)
def test_from_sae_lens_same_outputs(arch):
    theirs = random_sae_lens(arch)
    ours = fastsae.SAE.from_sae_lens(theirs)
    assert type(ours) is SAE_CLASSES[arch]
    assert ours.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    assert ours.cfg.d_in == D_IN and ours.cfg.d_sae == D_SAE
    x = random_input()
    assert_close(ours(x), theirs(x), what=arch)
    assert_close(ours.encode(x), theirs.encode(x), what=f"{arch} encode")


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "gated", "standard", "skip_transcoder"])
def test_from_sae_lens_shares_tensors_by_default(arch):
    theirs = random_sae_lens(arch)
    ours = fastsae.SAE.from_sae_lens(theirs)  # copy=False
    for name, param in theirs.named_parameters():
        assert getattr(ours, name).data_ptr() == param.data_ptr(), name
    with torch.no_grad():
        theirs.W_dec.mul_(3.0)
        theirs.b_dec.add_(1.0)
    assert torch.equal(ours.W_dec, theirs.W_dec)
    assert torch.equal(ours.b_dec, theirs.b_dec)
    with torch.no_grad():
        ours.W_enc.zero_()
    assert torch.count_nonzero(theirs.W_enc) == 0
    x = random_input()
    assert_close(ours(x), theirs(x), what=f"{arch} after in-place edits")


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "gated", "standard"])
def test_from_sae_lens_copy_is_independent(arch):
    theirs = random_sae_lens(arch)
    ours = fastsae.SAE.from_sae_lens(theirs, copy=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        theirs.W_dec.mul_(3.0)
        theirs.b_dec.add_(1.0)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        ours.W_enc.zero_()
    assert torch.count_nonzero(theirs.W_enc) > 0


def test_from_sae_lens_keeps_use_error_term():
    theirs = random_sae_lens("standard")
    theirs.use_error_term = True
    ours = fastsae.SAE.from_sae_lens(theirs)
    assert ours.use_error_term is True
    x = random_input()
    assert_close(ours(x), x, what="error term gives the input back")


def test_from_sae_lens_rejects_other_objects():
    with pytest.raises(TypeError, match="sae_lens SAE"):
        fastsae.SAE.from_sae_lens(torch.nn.Linear(3, 4))


def test_from_sae_lens_float64():
    theirs = random_sae_lens("jumprelu", dtype="float64")
    ours = fastsae.SAE.from_sae_lens(theirs)
    assert ours.cfg.dtype == "float64" and ours.W_enc.dtype == torch.float64
    x = random_input().double()
    assert_close(ours(x), theirs(x), tol=1e-12)


# --------------------------------------------------------------------------- training SAEs
def test_from_sae_lens_topk_training_sae():
    cfg = sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)
    training = randomize_(sae_lens.TopKTrainingSAE(cfg), seed=4)
    ours = fastsae.SAE.from_sae_lens(training)
    assert isinstance(ours, fastsae.TopKSAE)
    assert ours.cfg.k == K
    x = random_input()
    assert_close(ours(x), training(x), what="TopKTrainingSAE")
    # the inference form is always a copy: training goes on without touching ours
    with torch.no_grad():
        training.W_dec.mul_(2.0)
    assert not torch.allclose(ours.W_dec, training.W_dec)


def test_from_sae_lens_topk_training_sae_rescaled_by_decoder_norm():
    cfg = sae_lens.TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True
    )
    training = randomize_(sae_lens.TopKTrainingSAE(cfg), seed=5)
    w_dec_before = training.W_dec.detach().clone()
    ours = fastsae.SAE.from_sae_lens(training)
    assert isinstance(ours, fastsae.TopKSAE)
    x = random_input()
    assert_close(ours(x), training(x), what="rescaled TopKTrainingSAE")
    # folding the norms for the inference form must not edit the training SAE
    assert torch.equal(training.W_dec, w_dec_before)


def test_from_sae_lens_jumprelu_training_sae():
    cfg = sae_lens.JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)
    training = randomize_(sae_lens.JumpReLUTrainingSAE(cfg), seed=6)
    ours = fastsae.SAE.from_sae_lens(training)
    assert isinstance(ours, fastsae.JumpReLUSAE)
    x = random_input()
    assert_close(ours(x), training(x), what="JumpReLUTrainingSAE")


@pytest.mark.parametrize("rescale", [True, False])
def test_from_sae_lens_batch_topk_training_sae_becomes_jumprelu(rescale, tmp_path):
    cfg = sae_lens.BatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale
    )
    training = randomize_(sae_lens.BatchTopKTrainingSAE(cfg), seed=7)
    with torch.no_grad():
        training.topk_threshold.fill_(0.3)
    ours = fastsae.SAE.from_sae_lens(training)
    assert isinstance(ours, fastsae.JumpReLUSAE)
    assert torch.allclose(ours.threshold, torch.full((D_SAE,), 0.3))

    # BatchTopK at inference: keep the (decoder-norm scaled) activations above the threshold
    x = random_input()
    with torch.no_grad():
        acts = torch.relu((x - training.b_dec) @ training.W_enc + training.b_enc)
        norms = training.W_dec.norm(dim=-1) if rescale else torch.ones(D_SAE)
        acts = acts * (acts * norms > 0.3)
        expected = acts @ training.W_dec + training.b_dec
    assert 0 < (acts != 0).float().mean() < 1
    assert_close(ours(x), expected, what="BatchTopK inference")
    # and what sae-lens itself saves for inference agrees
    training.save_inference_model(tmp_path)
    assert_close(ours(x), sae_lens.SAE.load_from_disk(tmp_path)(x), what="vs sae_lens inference")


# --------------------------------------------------------------------------- to_sae_lens
@pytest.mark.parametrize("arch", ARCHS)
def test_to_sae_lens_same_outputs(arch):
    ours = randomize_(fastsae.SAE.from_dict(cfg_dict_for(arch)), seed=8)
    theirs = ours.to_sae_lens()
    assert isinstance(theirs, sae_lens.SAE)
    assert theirs.cfg.architecture() == arch
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    x = random_input()
    assert_close(ours(x), theirs(x), what=arch)
    # and back again
    back = fastsae.SAE.from_sae_lens(theirs)
    assert_close(back(x), ours(x), what=f"{arch} round trip")


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "gated", "standard"])
def test_to_sae_lens_copies_by_default(arch):
    ours = randomize_(fastsae.SAE.from_dict(cfg_dict_for(arch)), seed=9)
    theirs = ours.to_sae_lens()
    with torch.no_grad():
        ours.W_dec.mul_(3.0)
    assert not torch.allclose(theirs.W_dec, ours.W_dec)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "gated", "standard"])
def test_to_sae_lens_shares_with_copy_false(arch):
    ours = randomize_(fastsae.SAE.from_dict(cfg_dict_for(arch)), seed=10)
    theirs = ours.to_sae_lens(copy=False)
    with torch.no_grad():
        ours.W_dec.mul_(3.0)
    assert torch.equal(theirs.W_dec, ours.W_dec)
    x = random_input()
    assert_close(ours(x), theirs(x), what=f"{arch} shared")


def test_to_sae_lens_keeps_cfg_in_float64():
    ours = randomize_(fastsae.SAE.from_dict(cfg_dict_for("topk", dtype="float64")), seed=11)
    theirs = ours.to_sae_lens()
    assert theirs.W_enc.dtype == torch.float64
    assert theirs.cfg.dtype in ("float64", "torch.float64")
    x = random_input().double()
    assert_close(ours(x), theirs(x), tol=1e-12)
