"""The ``fastsae bench`` cases as a pytest-benchmark suite: the same problems, runners
(``fastsae/bench/cases.py``) and numerics checks (``fastsae/bench/numerics.py``) as the engine.

    pytest benchmarks/test_bench_kernels.py --benchmark-json=out.json
    python benchmarks/compare.py out.json

One problem per architecture, set by the environment (defaults: the device's smallest
shape, 768x24576, B=2048 on CPU and 8192 on CUDA, fp32):
  FASTSAE_BENCH_DEVICE  auto | cpu | cuda
  FASTSAE_BENCH_SHAPE   D_INxD_SAE, e.g. 2304x65536
  FASTSAE_BENCH_BATCH   tokens per batch
  FASTSAE_BENCH_DTYPE   fp32 | bf16 | fp16
  FASTSAE_BENCH_QUICK=1 the tiny --quick problem (a smoke test of the suite)

Every case is checked against the float32 reference before it is timed; a provider
that cannot run here (fastsae-triton without CUDA, sae_lens not installed) is skipped
with the reason. On CUDA each timed call ends with a synchronize, since pytest-benchmark
times with the host clock; ``fastsae bench`` (CUDA events) is the better GPU number.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastsae import bench
from fastsae.bench import cases
from fastsae.bench import numerics as bench_check

DEVICE = os.environ.get("FASTSAE_BENCH_DEVICE", "auto")
if DEVICE == "auto":
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("FASTSAE_BENCH_QUICK", "") not in ("", "0")
SHAPE = bench.parse_shape(
    os.environ.get(
        "FASTSAE_BENCH_SHAPE",
        "{}x{}".format(*(cases.QUICK_SHAPES if QUICK else cases.CPU_SHAPES)[0]),
    )
)
BATCH = int(
    os.environ.get(
        "FASTSAE_BENCH_BATCH",
        cases.QUICK_BATCHES[0] if QUICK else (8192 if DEVICE == "cuda" else cases.CPU_BATCHES[0]),
    )
)
DTYPE = cases.DTYPES[os.environ.get("FASTSAE_BENCH_DTYPE", "fp32")]
K = cases.QUICK_K if QUICK else cases.K
ROUNDS, WARMUP_ROUNDS = (2, 1) if QUICK else (5, 1)


def _group(prob: cases.Problem, op: str) -> str:
    return f"{op} {prob.cfg.label} {DEVICE}"


@pytest.fixture(scope="module", params=cases.ARCHS)
def problem(request):
    with cases.ieee_fp32():  # the JumpReLU threshold calibration matmul
        return cases.Problem(cases.Config(request.param, *SHAPE, BATCH, DTYPE, DEVICE, K))


def _timed(call):
    if DEVICE != "cuda":
        return call

    def synced():
        call()
        torch.cuda.synchronize()

    return synced


def _extra_info(prob: cases.Problem, op: str, provider: str, **more) -> dict:
    cfg = prob.cfg
    return dict(
        provider=provider,
        op=op,
        arch=cfg.arch,
        d_in=cfg.d_in,
        d_sae=cfg.d_sae,
        batch=cfg.batch,
        dtype=cfg.dtype_name,
        device=DEVICE,
        k=prob.k_eff,
        **more,
    )


@pytest.mark.parametrize("op", cases.OPS)
@pytest.mark.parametrize("provider", cases.PROVIDERS)
def test_case(benchmark, problem, provider, op):
    reason = cases.skip_reason(provider, DEVICE)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    with cases.ieee_fp32(), cases.provider_env(provider):
        runner = cases.make_runner(problem, provider, op)
        numerics = bench_check.check(problem, provider, op, runner)  # NumericsError fails the test
        benchmark.group = _group(problem, op)
        benchmark.extra_info.update(_extra_info(problem, op, provider, **numerics))
        benchmark.pedantic(
            _timed(cases.rotating_call(runner)),
            rounds=ROUNDS,
            iterations=1,
            warmup_rounds=WARMUP_ROUNDS,
        )
    if op == "decode":
        problem.drop_dense()


def test_reference_matmul(benchmark, problem):
    """Bare ``x @ W_enc``: the roofline of encode (in the encode group for compare.py)."""
    with cases.ieee_fp32():
        runner = cases.make_runner(problem, cases.REFERENCE_PROVIDER, "matmul")
        benchmark.group = _group(problem, "encode")
        benchmark.extra_info.update(_extra_info(problem, "matmul", "x@W_enc (ref)"))
        benchmark.pedantic(
            _timed(cases.rotating_call(runner)),
            rounds=ROUNDS,
            iterations=1,
            warmup_rounds=WARMUP_ROUNDS,
        )
