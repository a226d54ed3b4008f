"""Forward of the variable-width architectures (standard, JumpReLU, gated) on CPU:
fastsae vs sae-lens 6.x on the same weights, at an L0 like trained SAEs have.

    pytest benchmarks/test_bench_forward_variable_width.py --benchmark-json=out.json
    python benchmarks/compare.py out.json

fastsae decodes these codes sparsely (compacted to the widest row, then
``embedding_bag``) while the widest row is at most d_sae/32, else densely; sae-lens
always multiplies the dense ``[B, d_sae]`` activations by ``W_dec``. Outputs are
checked equal to 1e-5 before timing.
"""

from __future__ import annotations

import pytest
import sae_lens
import torch

import fastsae

BATCH, D_IN, D_SAE = 2048, 768, 24576
ROUNDS, WARMUP_ROUNDS = 5, 1
RTOL = 1e-5
ARCHS = ("standard", "jumprelu", "gated")
PROVIDERS = ("fastsae-torch", "sae_lens")


def _pair(arch: str):
    """Same random weights in both libraries; biases / thresholds put L0 near 30-150."""
    g = torch.Generator().manual_seed(0)
    ours = fastsae.SAE.from_dict({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE})
    with torch.no_grad():
        ours.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        ours.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5)
        ours.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
        if arch == "gated":
            ours.b_gate.fill_(-3.0)
            ours.b_mag.fill_(-3.0)
            ours.r_mag.copy_(0.1 * torch.randn(D_SAE, generator=g))
        else:
            ours.b_enc.fill_(-3.0 if arch == "standard" else 0.0)
        if arch == "jumprelu":
            ours.threshold.fill_(2.5)
    sae_cls, cfg_cls = sae_lens.registry.get_sae_class(arch)
    theirs = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


@pytest.fixture(scope="module", params=ARCHS)
def setup(request) -> dict:
    ours, theirs = _pair(request.param)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(x)
        l0 = (theirs.encode(x) > 0).sum(-1).float()
    return {
        "arch": request.param,
        "x": x,
        "expected": expected,
        "l0_mean": l0.mean().item(),
        "l0_max": l0.max().item(),
        "fns": {"fastsae-torch": ours, "sae_lens": theirs},
    }


@pytest.mark.parametrize("provider", PROVIDERS)
def test_variable_width_forward(benchmark, setup, provider, bench_threads):
    fn, x = setup["fns"][provider], setup["x"]
    with torch.no_grad():
        out = fn(x)
        err = ((out - setup["expected"]).norm() / setup["expected"].norm()).item()
        assert err <= RTOL, f"{provider} differs from sae_lens: relative error {err:.3g}"
        del out
        benchmark.group = (
            f"{setup['arch']}-forward cpu fp32 B={BATCH} d_in={D_IN} d_sae={D_SAE} "
            f"L0~{setup['l0_mean']:.0f}"
        )
        benchmark.extra_info.update(
            provider=provider,
            arch=setup["arch"],
            op="forward",
            batch=BATCH,
            d_in=D_IN,
            d_sae=D_SAE,
            l0_mean=setup["l0_mean"],
            l0_max=setup["l0_max"],
            dtype="float32",
            device="cpu",
            threads=bench_threads,
            rel_err_vs_sae_lens=err,
        )
        benchmark.pedantic(fn, args=(x,), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
