"""Latent-sharded standard, JumpReLU and BatchTopK SAEs on CPU (gloo, 2 and 4 spawned
processes): every loss, every gradient, one clipped Adam step and BatchTopK's threshold
EMA equal the unsharded SAE's, for each sparsity penalty (L1, Lp, JumpReLU step / tanh /
quadratic, pre-activation loss) and BatchTopK's batch-wide selection with AuxK."""

from __future__ import annotations

import pytest
import torch
from spawn_ranks import run_ranks

from fastsae.saes.jumprelu import ShardedJumpReLUTrainingSAE
from fastsae.saes.standard import ShardedStandardTrainingSAE
from fastsae.saes.training_sae import TrainStepInput
from fastsae.training import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
)
from fastsae.training.parallel.latent import SHARD_DIMS, clip_grad_norm_sharded, shard_sae

D_IN, D_SAE, BATCH, LR, MAX_NORM = 12, 48, 20, 1e-2, 0.5
DEAD = [1, 3, 4, 7, 10, 12, 15, 19, 22, 23, 29, 31, 33, 36, 40, 44, 47]
CASES = {
    "standard-l1": ("standard", dict(l1_coefficient=0.3)),
    "standard-l2-no-bdec-in": (
        "standard",
        dict(l1_coefficient=0.3, lp_norm=2.0, apply_b_dec_to_input=False),
    ),
    "jumprelu-step-preact": ("jumprelu", dict(l0_coefficient=0.2, pre_act_loss_coefficient=0.5)),
    "jumprelu-tanh": ("jumprelu", dict(jumprelu_sparsity_loss_mode="tanh", l0_coefficient=0.2)),
    "batchtopk-rescale": ("batchtopk", dict(k=3.0, aux_loss_coefficient=0.5)),
    "batchtopk-plain": (
        "batchtopk",
        dict(k=2.5, rescale_acts_by_decoder_norm=False, topk_threshold_lr=0.3),
    ),
    "jumprelu-quadratic-ste": (
        "jumprelu",
        dict(
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=6.0,
            l0_coefficient=0.2,
            jumprelu_ste_to_input=True,
        ),
    ),
}


def _full_sae(case: str):
    arch, kwargs = CASES[case]
    torch.manual_seed(0)
    if arch == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kwargs))
    elif arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kwargs))
    else:
        cfg = JumpReLUTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, jumprelu_init_threshold=0.2, jumprelu_bandwidth=0.5, **kwargs
        )
        sae = JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # unequal decoder norms
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 0.4)
    return sae


def _step_input(coefficients: dict[str, float]) -> TrainStepInput:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[DEAD] = True
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))
    return TrainStepInput(
        sae_in=x, coefficients=coefficients, dead_neuron_mask=mask, n_training_steps=0
    )


def _run(sae, clip) -> dict:
    coefficients = {k: float(v.value) for k, v in sae.get_coefficients().items()}
    output = sae.training_forward_pass(_step_input(coefficients))
    output.loss.backward()
    rec = {k: v.detach() for k, v in output.losses.items()}
    rec["loss"] = output.loss.detach()
    rec["fired"] = output.fired()
    rec["grads"] = {n: p.grad.clone() for n, p in sae.named_parameters()}
    clip()
    torch.optim.Adam(sae.parameters(), lr=LR).step()
    rec["params"] = {n: p.detach().clone() for n, p in sae.named_parameters()}
    rec["buffers"] = {n: b.clone() for n, b in sae.named_buffers()}
    return rec


def _worker(rank: int, world: int) -> dict:
    out = {}
    for case in CASES:
        shard = shard_sae(_full_sae(case), rank, world)
        out[case] = _run(shard, lambda s=shard: clip_grad_norm_sharded(s, MAX_NORM))
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    return run_ranks(_worker, world, tmp_path_factory.mktemp(f"dense{world}"))


def _reference(case: str) -> dict:
    sae = _full_sae(case)
    return _run(sae, lambda: torch.nn.utils.clip_grad_norm_(sae.parameters(), MAX_NORM))


def _gathered(per_rank: list[dict], name: str) -> torch.Tensor:
    dim = SHARD_DIMS.get(name)
    if dim is None:
        for other in per_rank[1:]:
            assert torch.equal(other[name], per_rank[0][name]), f"{name} replicas differ"
        return per_rank[0][name]
    return torch.cat([r[name] for r in per_rank], dim=dim)


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_equals_unsharded(ranks, case):
    ref = _reference(case)
    got = [r[case] for r in ranks]
    assert set(got[0]) == set(ref), "the same loss terms"
    for key in ref:
        if key in ("grads", "params", "fired", "buffers"):
            continue
        for other in got[1:]:
            assert torch.equal(other[key], got[0][key]), f"{key} differs between ranks"
        _close(got[0][key], ref[key], key)
    assert ref["loss"] > ref["mse_loss"], "the sparsity penalty (or AuxK) must be exercised"
    if "pre_act_loss" in ref:
        assert ref["pre_act_loss"] > 0, "the pre-activation loss must be exercised"
    assert torch.equal(torch.cat([r["fired"] for r in got]), ref["fired"])
    for name, grad in ref["grads"].items():
        assert grad.abs().sum() > 0, f"grad {name} must be exercised"
        _close(_gathered([r["grads"] for r in got], name), grad, f"grad {name}")
    for name, value in ref["params"].items():
        _close(_gathered([r["params"] for r in got], name), value, f"param {name}")
    for name, value in ref["buffers"].items():
        assert value != 0, f"buffer {name} must be exercised"
        for r in got:
            _close(r["buffers"][name], value, f"buffer {name}")


def test_round_trip_and_errors():
    for case in ("standard-l1", "jumprelu-step-preact"):
        full = _full_sae(case)
        shards = [shard_sae(full, r, 4) for r in range(4)]
        for name, value in full.named_parameters():
            parts = [dict(s.named_parameters())[name].detach() for s in shards]
            assert torch.equal(_gathered([{name: p} for p in parts], name), value)
    assert shards[0].threshold.dtype == torch.float32
    assert isinstance(shards[0], ShardedJumpReLUTrainingSAE)
    with pytest.raises(NotImplementedError, match="use_ghost_grads"):
        ShardedStandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=4, d_sae=8, use_ghost_grads=True), 0, 2
        )
    with pytest.raises(TypeError, match="needs a StandardTrainingSAE"):
        ShardedStandardTrainingSAE.from_full(_full_sae("jumprelu-tanh"), 0, 2)
    from fastsae.training import GatedTrainingSAE, GatedTrainingSAEConfig

    with pytest.raises(NotImplementedError, match="not 'gated'"):
        shard_sae(GatedTrainingSAE(GatedTrainingSAEConfig(d_in=4, d_sae=8)), 0, 2)
