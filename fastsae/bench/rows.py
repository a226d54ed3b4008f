"""The rows of ``fastsae bench``: one (provider, op) case checked, timed and scored under
the work model into a result row, and the ``copy`` row (the bandwidth ceiling)."""

from __future__ import annotations

import gc
import statistics
from typing import Any

import torch

from fastsae import ops, tuning
from fastsae.bench.cases import (
    COPY_BYTES,
    REFERENCE_PROVIDER,
    Config,
    Problem,
    make_runner,
    peak_extra_mb,
    provider_env,
    rotating_call,
    time_call,
)
from fastsae.bench.numerics import NumericsError, check


def _work(cfg: Config, op: str, k_eff: float) -> tuple[float | None, float | None]:
    """(FLOPs, bytes) of one call under the work model of the ``fastsae.bench`` docstring."""
    B, D, N, e = cfg.batch, cfg.d_in, cfg.d_sae, torch.empty(0, dtype=cfg.dtype).element_size()
    if op in ("encode", "matmul"):
        return 2 * B * D * N, None
    if op == "forward":
        return 2 * B * D * N + 2 * B * k_eff * D, None
    if op == "forward_backward":
        return 2 * B * D * N + 8 * B * k_eff * D, None
    if op == "decode":
        return None, B * k_eff * D * e + B * D * e + B * k_eff * (e + 8)
    return None, None


def _row(cfg: Config, op: str, provider: str, **fields: Any) -> dict[str, Any]:
    row = {
        "arch": cfg.arch if op != "matmul" else "-",
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "batch": cfg.batch,
        "dtype": cfg.dtype_name,
        "device": cfg.device,
        "op": op,
        "provider": provider,
        "k": None,
        "l0_max": None,
        "code_width": None,
        "status": "ok",
        "reason": None,
        "ms": None,
        "n_samples": None,
        "tflops": None,
        "gbps": None,
        "frac_peak": None,
        "peak_mem_mb": None,
        "rel_err": None,
        "sel_diff": None,
        "path": None,  # fastsae providers: the ops' paths taken, e.g. "topk_encode=chunked"
    }
    row.update(fields)
    return row


def run_case(prob: Problem, provider: str, op: str, repeats: int) -> dict[str, Any]:
    """Check, then time one (provider, op) on ``prob``; returns its row (status ok/failed)."""
    cfg = prob.cfg
    info: dict[str, Any] = {"k": round(prob.k_eff, 1) if op != "matmul" else None}
    if cfg.arch == "jumprelu" and op != "matmul":
        info.update(l0_max=prob.l0_max, code_width=prob.code_width)
    with provider_env(provider), tuning.record_paths() as taken:
        if provider == "fastsae-triton" and not ops.auto_uses_triton(prob.xs[0]):
            raise RuntimeError("fastsae-triton: ops would not pick the Triton kernels here")
        runner = make_runner(prob, provider, op)
        numerics: dict[str, Any] = {}
        if op != "matmul":
            try:
                numerics = check(prob, provider, op, runner)
            except NumericsError as e:
                return _row(cfg, op, provider, status="failed", reason=str(e), **info)
        call = rotating_call(runner)
        samples = time_call(call, cfg.device, repeats)
        mem = peak_extra_mb(call, cfg.device)
    ms = statistics.median(samples)
    flops, nbytes = _work(cfg, op, prob.k_eff)
    return _row(
        cfg,
        op,
        provider,
        ms=ms,
        n_samples=len(samples),
        tflops=flops / ms / 1e9 if flops else None,
        gbps=nbytes / ms / 1e6 if nbytes else None,
        peak_mem_mb=mem,
        path=tuning.describe_paths(taken) if taken else None,
        **numerics,
        **info,
    )


def run_case_guarded(prob: Problem, provider: str, op: str, repeats: int) -> dict[str, Any]:
    """``run_case``, with any exception (out of memory, a kernel that fails to compile)
    recorded as an ``error`` row: one broken case must not lose a long GPU run's report."""
    try:
        return run_case(prob, provider, op, repeats)
    except Exception as e:
        gc.collect()
        if prob.cfg.device == "cuda":
            torch.cuda.empty_cache()
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return _row(prob.cfg, op, provider, status="error", reason=reason)


def copy_row(device: str, repeats: int) -> dict[str, Any]:
    """Bandwidth ceiling: ``dst.copy_(src)`` of COPY_BYTES (read + write counted)."""
    n = COPY_BYTES[device] // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    samples = time_call(lambda: dst.copy_(src), device, repeats)
    ms = statistics.median(samples)
    cfg = Config("-", 0, 0, 0, torch.float32, device)
    row = _row(cfg, "copy", REFERENCE_PROVIDER, ms=ms, n_samples=len(samples))
    row.update(arch="-", d_in=None, d_sae=None, batch=None, dtype=None, frac_peak=1.0)
    row["gbps"] = 2 * n * 4 / ms / 1e6
    row["bytes"] = n * 4
    return row
