"""TopK SAE forward (inference) on CPU: fastsae vs sae-lens 6.x on the same weights.

    pytest benchmarks/test_bench_forward.py --benchmark-json=out.json
    python benchmarks/compare.py out.json

Providers:
  fastsae-torch  ``fastsae.TopKSAE.forward`` (sparse path: topk -> embedding_bag decode)
  sae_lens       ``sae_lens.TopKSAE.forward`` (topk -> dense scatter -> dense decode)
  dense-torch    plain torch: ``x @ W_enc + b_enc``, topk, scatter to dense, ``@ W_dec + b_dec``

Every provider's output is checked against sae-lens's (outside the timed region)
before it is timed, so the table can never compare different computations.
"""

from __future__ import annotations

import pytest
import sae_lens
import torch
from torch import Tensor

import fastsae

BATCH, D_IN, D_SAE, K = 2048, 768, 24576, 64
DTYPE = torch.float32
ROUNDS, WARMUP_ROUNDS = 5, 1
RTOL = 1e-5
GROUP = f"topk-forward cpu fp32 B={BATCH} d_in={D_IN} d_sae={D_SAE} k={K}"
PROVIDERS = ("fastsae-torch", "sae_lens", "dense-torch")


def _state_dict(seed: int = 0) -> dict[str, Tensor]:
    """Random weights with SAELens's layout; non-zero biases so every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(D_SAE, D_IN, generator=g, dtype=DTYPE) / D_IN**0.5
    return {
        "W_enc": (W_dec.T + 0.1 * torch.randn(D_IN, D_SAE, generator=g)).contiguous(),
        "W_dec": W_dec,
        "b_enc": 0.1 * torch.randn(D_SAE, generator=g),
        "b_dec": 0.1 * torch.randn(D_IN, generator=g),
    }


def _dense_torch(sd: dict[str, Tensor]):
    W_enc, b_enc, W_dec, b_dec = sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"]

    def forward(x: Tensor) -> Tensor:
        h = (x - b_dec) @ W_enc + b_enc  # apply_b_dec_to_input=True, as both SAEs
        values, indices = torch.topk(h, K, dim=-1, sorted=False)
        acts = torch.zeros_like(h).scatter_(-1, indices, values.relu())
        return acts @ W_dec + b_dec

    return forward


@pytest.fixture(scope="module")
def setup() -> dict:
    sd = _state_dict()
    fast = fastsae.TopKSAE(fastsae.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float32"))
    ref = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float32"))
    fast.load_state_dict(sd, strict=True)
    ref.load_state_dict(sd, strict=True)
    fast.eval()
    ref.eval()
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    with torch.no_grad():
        expected = ref(x)
    fns = {"fastsae-torch": fast, "sae_lens": ref, "dense-torch": _dense_torch(sd)}
    return {"x": x, "expected": expected, "fns": fns}


def _rel_err(out: Tensor, expected: Tensor) -> float:
    return ((out - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_topk_forward(benchmark, setup, provider, bench_threads):
    fn, x = setup["fns"][provider], setup["x"]
    with torch.no_grad():
        out = fn(x)
        err = _rel_err(out, setup["expected"])
        assert out.shape == setup["expected"].shape and out.dtype == DTYPE
        assert err <= RTOL, f"{provider} differs from sae_lens: relative error {err:.3g}"
        del out

        benchmark.group = GROUP
        benchmark.extra_info.update(
            provider=provider,
            op="forward",
            batch=BATCH,
            d_in=D_IN,
            d_sae=D_SAE,
            k=K,
            dtype="float32",
            device="cpu",
            threads=bench_threads,
            rel_err_vs_sae_lens=err,
        )
        benchmark.pedantic(fn, args=(x,), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
