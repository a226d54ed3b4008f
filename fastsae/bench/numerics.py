"""Numerics of ``fastsae bench``: each provider against the float32 reference on its own
selection, with the selection itself checked to be a top-k / above-threshold set up to
near-ties (see ``fastsae.bench`` for why a plain provider-vs-provider diff cannot work)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fastsae.bench.cases import CHECK_ROWS, RTOL, TIE_RTOL, Problem, Runner, selection_fn
from fastsae.sparse_code import SparseCode


class NumericsError(AssertionError):
    """A provider's output disagrees with the float32 reference."""


# ------------------------------------------------------------------------------ numerics
def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _dense_of(out: Tensor | SparseCode, d_sae: int) -> Tensor:
    if isinstance(out, tuple):
        return SparseCode(*out).to_dense(d_sae).float()
    return out.float()


def _selection_diff(prob: Problem, h: Tensor, mask: Tensor) -> float:
    """Check that ``mask [R, N]`` (the provider's non-zero activations) is a valid top-k /
    above-threshold set of the float32 pre-activations ``h`` up to near-ties; return the
    fraction of rows whose set differs from the float32 reference's own."""
    cfg = prob.cfg
    tie = TIE_RTOL[cfg.dtype]
    if cfg.arch == "topk":
        kth = h.topk(cfg.k, dim=-1).values[:, -1:]
        slack = tie * kth.abs() + 1e-6
        ref = (h >= kth) & (h > 0)
        too_many = mask.sum(-1) > cfg.k
        bad = (mask & (h < kth - slack)) | (~mask & (h > kth + slack) & (h > 0))
        bad = bad.any(-1) | too_many
        what = "a top-k"
    else:
        thr = prob.params["threshold"].detach().float()
        slack = tie * thr.abs() + 1e-6
        ref = (h > thr) & (h > 0)
        bad = (mask & ((h < thr - slack) | (h <= 0))) | (~mask & (h > thr + slack) & (h > 0))
        bad = bad.any(-1)
        what = "the set above the threshold"
    n_bad = int(bad.sum())
    if n_bad:
        raise NumericsError(
            f"{n_bad} of {mask.shape[0]} rows select latents that are not {what} of the "
            f"float32 pre-activations (beyond near-ties of relative size {tie:g})"
        )
    return float((mask != ref).any(-1).float().mean())


def check(prob: Problem, provider: str, op: str, runner: Runner) -> dict[str, float]:
    """Run (provider, op) on the check rows and compare with the float32 reference on the
    provider's own selection. Returns ``rel_err`` and ``sel_diff``; raises NumericsError."""
    cfg, p = prob.cfg, prob.params
    rows = min(cfg.batch, CHECK_ROWS.get(cfg.device, 512))
    tol = RTOL[cfg.dtype]
    f32 = {name: t.detach().float() for name, t in p.items()}
    sel_diff = 0.0
    with torch.no_grad():
        if op == "decode":
            code = SparseCode(prob.codes[0].values[:rows], prob.codes[0].indices[:rows])
            if provider in ("fastsae-triton", "fastsae-torch"):
                inp: Any = code
            else:
                inp = code.to_dense(cfg.d_sae)
            outs = [runner(inp)]
            expected = [code.to_dense(cfg.d_sae).float() @ f32["W_dec"] + f32["b_dec"]]
        else:
            x = prob.xs[0][:rows]
            h = x.float() @ f32["W_enc"] + f32["b_enc"]
            enc = runner(x) if op == "encode" else selection_fn(prob, provider)(x)
            acts_p = _dense_of(enc, cfg.d_sae)
            mask = acts_p != 0
            sel_diff = _selection_diff(prob, h, mask)
            if op == "encode":
                outs, expected = [acts_p], [torch.where(mask, h.relu(), 0.0)]
            elif op == "forward":
                outs = [runner(x)]
                expected = [torch.where(mask, h.relu(), 0.0) @ f32["W_dec"] + f32["b_dec"]]
            else:
                outs = list(runner(x))
                expected = _reference_grads(prob, x, mask, f32)
    errs = [_rel_err(o.float(), e) for o, e in zip(outs, expected, strict=True)]
    rel_err = max(errs)
    if not math.isfinite(rel_err) or rel_err > tol:
        raise NumericsError(
            f"relative error {rel_err:.3g} > {tol:g} against the float32 reference"
            + (f" (per output: {', '.join(f'{e:.2g}' for e in errs)})" if len(errs) > 1 else "")
        )
    return {"rel_err": rel_err, "sel_diff": sel_diff}


def _reference_grads(
    prob: Problem, x: Tensor, mask: Tensor, f32: dict[str, Tensor]
) -> list[Tensor]:
    """float32 gradients of ``sum(out * G)`` w.r.t. W_enc, b_enc, W_dec, b_dec for the
    fixed selection ``mask`` (the selection is piecewise constant, so this is exact)."""
    # detach(): new leaf tensors over the same storage (no copy of fp32 weights)
    leaves = [f32[n].detach().requires_grad_(True) for n in ("W_enc", "b_enc", "W_dec", "b_dec")]
    W_enc, b_enc, W_dec, b_dec = leaves
    with torch.enable_grad():
        h = x.float() @ W_enc + b_enc
        out = torch.where(mask, h.relu(), 0.0) @ W_dec + b_dec
        loss = (out * prob.grad_out[: x.shape[0]].float()).sum()
        return list(torch.autograd.grad(loss, leaves))
