"""Benchmark engine behind ``fastsae bench`` (and ``benchmarks/test_bench_kernels.py``).

One command produces the whole report: a markdown table on stdout, the target ratios,
and ``bench-<device>-<date>.json`` / ``.png`` in ``--out``. This module holds the plan
(flags and per-device defaults), the work model and the run; ``cases`` the problems,
the providers' callables and the timers; ``numerics`` the numerics checks; ``report``
the peaks, target ratios, tables and plot.

Providers (the same weights everywhere; SAELens-style layout, ``apply_b_dec_to_input=False``):
  fastsae-triton  ``fastsae.ops`` with ``impl="triton"``; modules with Triton allowed (CUDA only)
  fastsae-torch   ``fastsae.ops`` with ``impl="torch"``; modules under FASTSAE_DISABLE_TRITON=1
  sae_lens        ``sae_lens.TopKSAE`` / ``sae_lens.JumpReLUSAE`` sharing the parameter tensors
  dense-torch     ``h = x @ W_enc + b_enc``; top-k / JumpReLU -> dense acts; ``acts @ W_dec + b_dec``

Ops: ``encode`` (fastsae: the sparse code; sae_lens and dense-torch: dense acts),
``decode`` (a fixed code; dense providers decode its dense form), ``forward`` (module
forward), ``forward_backward`` (forward, then the gradients of ``sum(out * G)`` with
respect to W_enc, b_enc, W_dec, b_dec; x needs no gradient), and the reference rows
``matmul`` (bare ``x @ W_enc``: the encoder's roofline) and ``copy`` (a large device
copy: the bandwidth ceiling). Reference rows always run.

Work model (B tokens, D = d_in, N = d_sae, k = active latents per token: k for TopK,
the measured mean L0 for JumpReLU, whose padded code is wider (its widest row; padding
is not counted); e = element size). Every provider is scored with the same model, the
useful work of the sparse formulation, so a dense provider's TFLOP/s or GB/s is an
effective rate:
  encode            2*B*D*N FLOPs (the encoder matmul; selection is not counted)
  forward           2*B*D*N + 2*B*k*D FLOPs (plus the sparse decode of k rows per token)
  forward_backward  2*B*D*N + 8*B*k*D FLOPs (forward, then d_acts, dW_dec and dW_enc over
                    the B*k active pairs, 2*B*k*D each)
  matmul            2*B*D*N FLOPs
  decode            B*k*D*e (gathered decoder rows) + B*D*e (output) + B*k*(e + 8)
                    (values + int64 indices) bytes
  copy              2 * buffer bytes (read + write)
"% peak" divides TFLOP/s by the best ``matmul`` row of the same dtype in the run, and
GB/s by the ``copy`` row.

Numerics are checked before anything is timed, on the first ``min(B, 1024)`` rows (512
on CPU) of the first batch. The reference is the dense-torch maths in float32 (the
fastsae-torch / sae_lens formula, upcast) evaluated on the provider's own selection, and
the selection itself must be a valid top-k (or above-threshold set) of the float32
pre-activations up to near-ties. A plain comparison against another provider's output is
not usable here: Triton's and cuBLAS's summation orders differ in the last bits, so a
handful of rows per batch pick a different latent at a near-tie (in bf16, most rows do),
and each such swap moves the output by a whole latent. ``rel_err`` (max over outputs,
``||a - b|| / ||b||``) must be <= 1e-5 (fp32) / 2e-2 (bf16); ``sel_diff`` is the
fraction of rows whose selection differs from the float32 one (all near-ties). A failure
marks the row FAILED (an exception in a case, e.g. out of memory, marks it ERROR), the
run goes on, and the exit status is 1.

Timing: on CUDA ``triton.testing.do_bench`` (median of the samples; it warms up and
clears L2 between calls) and ``torch.cuda.max_memory_allocated`` minus what was allocated
before the call (extra peak memory, outputs included). On CPU ``time.perf_counter``
after a warm-up call, median of up to ``--repeats`` calls; no memory figure (tracemalloc
does not see torch's allocator). x rotates between 3 pre-made batches so no call finds
its input in cache. fp32 means IEEE fp32 on both sides: TF32 is switched off for the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fastsae
from fastsae import ops
from fastsae.bench.cases import (
    ARCHS,
    CHECK_ROWS,
    COPY_BYTES,
    CPU_BATCHES,
    CPU_SHAPES,
    DTYPE_NAMES,
    DTYPES,
    GEMMA_SCOPE_SHAPES,
    GPU_BATCHES,
    GPU_SHAPES,
    OPS,
    PROVIDERS,
    QUICK_BATCHES,
    QUICK_K,
    QUICK_SHAPES,
    REFERENCE_OPS,
    REFERENCE_PROVIDER,
    RTOL,
    Config,
    K,
    Problem,
    ieee_fp32,
    make_runner,
    peak_extra_mb,
    provider_env,
    rotating_call,
    skip_reason,
    time_call,
)
from fastsae.bench.numerics import NumericsError, check
from fastsae.bench.report import (
    add_peak_fractions,
    fmt,
    markdown_table,
    plot,
    target_ratios,
    targets_table,
)


@dataclasses.dataclass
class Plan:
    device: str
    configs: list[Config]
    providers: list[str]
    ops: list[str]
    repeats: int
    notes: list[str]


# ------------------------------------------------------------------------------ rows
def _work(cfg: Config, op: str, k_eff: float) -> tuple[float | None, float | None]:
    """(FLOPs, bytes) of one call under the work model of the module docstring."""
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
    }
    row.update(fields)
    return row


def run_case(prob: Problem, provider: str, op: str, repeats: int) -> dict[str, Any]:
    """Check, then time one (provider, op) on ``prob``; returns its row (status ok/failed)."""
    cfg = prob.cfg
    info: dict[str, Any] = {"k": round(prob.k_eff, 1) if op != "matmul" else None}
    if cfg.arch == "jumprelu" and op != "matmul":
        info.update(l0_max=prob.l0_max, code_width=prob.code_width)
    with provider_env(provider):
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
        **numerics,
        **info,
    )


def _guarded_case(prob: Problem, provider: str, op: str, repeats: int) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------ metadata
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name or platform.machine()} ({os.cpu_count()} cores)"


def device_slug(device: str) -> str:
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    name = device_name(device).split(" (")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{slug}-{os.cpu_count()}core"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(plan: Plan, command: str) -> dict[str, Any]:
    meta = {
        "device": device_name(plan.device),
        "device_kind": plan.device,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "versions": {
            "fastsae": fastsae.__version__,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "sae_lens": _version("sae-lens"),
            "python": platform.python_version(),
        },
        "torch_num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "notes": plan.notes,
        "work_model": "see fastsae/bench.py docstring",
        "check_rows": CHECK_ROWS.get(plan.device),
        "tolerances": {DTYPE_NAMES[d]: t for d, t in RTOL.items()},
    }
    if plan.device == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


# ------------------------------------------------------------------------------ plan / CLI
def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def parse_shape(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX*](\d+)", s)
    if not m:
        raise ValueError(f"--shapes: expected D_INxD_SAE like 768x24576, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def _choices(flag: str, values: list[str], allowed: tuple[str, ...]) -> list[str]:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{flag}: unknown {bad}; expected some of {', '.join(allowed)}")
    return values


def make_plan(args: Any) -> Plan:
    """Resolve the CLI's flags and the per-device defaults into the list of problems."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {device!r}")
    notes: list[str] = []
    archs = _choices("--arch", _split(args.arch) or list(ARCHS), ARCHS)
    providers = _choices("--providers", _split(args.providers) or list(PROVIDERS), PROVIDERS)
    ops_ = _choices("--ops", _split(args.ops) or list(OPS), OPS + REFERENCE_OPS)
    dtype_names = _split(args.dtype)
    for d in dtype_names:
        if d not in DTYPES:
            raise ValueError(f"--dtype: unknown {d!r}; expected fp32, bf16 or fp16")
    shapes = [parse_shape(s) for s in _split(args.shapes)]
    batches = [int(b) for b in _split(args.batch)]
    k = args.k or (QUICK_K if args.quick else K)
    if args.quick:
        default_shapes, default_batches, default_dtypes = QUICK_SHAPES, QUICK_BATCHES, ["fp32"]
        quick = ", ".join(f"{d}x{n}" for d, n in QUICK_SHAPES)
        notes.append(f"--quick: tiny defaults ({quick}, B={QUICK_BATCHES[0]}, fp32, k={k}): "
                     "a smoke test, not a measurement")  # fmt: skip
    elif device == "cpu":
        default_shapes, default_batches, default_dtypes = CPU_SHAPES, CPU_BATCHES, ["fp32"]
        notes.append(
            "CPU: only the smallest shape (768x24576), B=2048, fp32 by default; the full grid "
            "(3 shapes + Gemma Scope JumpReLU shapes, B in 4096/8192, fp32 and bf16) is the "
            "GPU default. fastsae-triton needs CUDA."
        )
    else:
        default_shapes, default_batches, default_dtypes = GPU_SHAPES, GPU_BATCHES, ["fp32", "bf16"]
    dtypes = list(dict.fromkeys(DTYPES[d] for d in dtype_names or default_dtypes))
    configs = []
    for arch in archs:
        arch_shapes = shapes or list(default_shapes)
        if not shapes and not args.quick and device == "cuda" and arch == "jumprelu":
            arch_shapes += [s for s in GEMMA_SCOPE_SHAPES if s not in arch_shapes]
        for d_in, d_sae in arch_shapes:
            if not 0 < k <= d_sae:
                raise ValueError(f"--k {k} does not fit d_sae={d_sae}")
            for batch in batches or default_batches:
                for dtype in dtypes:
                    configs.append(Config(arch, d_in, d_sae, batch, dtype, device, k))
    repeats = args.repeats or (2 if args.quick else 5)
    return Plan(device, configs, providers, ops_, repeats, notes)


def command_line(args: Any) -> str:
    parts = ["fastsae", "bench"]
    for flag in ("device", "dtype", "shapes", "batch", "ops", "providers", "arch", "out",
                 "repeats", "k"):  # fmt: skip
        value = getattr(args, flag, None)
        if value in (None, []):
            continue
        value = ",".join(value) if isinstance(value, list) else value
        parts += [f"--{flag}", str(value)]
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)


def add_arguments(p: Any) -> None:
    """The ``fastsae bench`` flags (list flags take repeats or comma lists)."""
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--dtype", action="append", help="fp32, bf16, fp16 (default: fp32,bf16 on "
                   "CUDA, fp32 on CPU)")  # fmt: skip
    p.add_argument("--shapes", action="append", help="D_INxD_SAE, e.g. 768x24576 (default: the "
                   "device's grid)")  # fmt: skip
    p.add_argument("--batch", action="append", help="tokens per batch (default: 4096,8192 on "
                   "CUDA, 2048 on CPU)")  # fmt: skip
    p.add_argument(
        "--ops",
        action="append",
        help=f"some of {', '.join(OPS + REFERENCE_OPS)} (reference rows always run)",
    )
    p.add_argument("--providers", action="append", help=f"some of {', '.join(PROVIDERS)}")
    p.add_argument("--arch", action="append", help=f"some of {', '.join(ARCHS)}")
    p.add_argument("--k", type=int, default=None, help=f"TopK k (default {K}; {QUICK_K} with "
                   "--quick); JumpReLU aims at a mean L0 of 1.5k")  # fmt: skip
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="CPU: at most this many timed calls per row (default 5; 2 with --quick)",
    )
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and PNG")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test (for tests)")


def run(args: Any) -> int:
    """``fastsae bench``: run the plan, print the report, write JSON + PNG. 1 if any row failed."""
    plan = make_plan(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command_line(args)
    meta = metadata(plan, command)
    print(f"# fastsae bench on {meta['device']}")
    print(f"`{command}`; torch {torch.__version__}, triton {meta['versions']['triton']}, "
          f"sae-lens {meta['versions']['sae_lens']}, fastsae {fastsae.__version__}")  # fmt: skip
    for note in plan.notes:
        print(f"note: {note}")
    skipped = []
    providers = []
    for provider in plan.providers:
        reason = skip_reason(provider, plan.device)
        if reason:
            skipped.append({"provider": provider, "reason": reason})
            print(f"skipped: {provider}: {reason}")
        else:
            providers.append(provider)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with ieee_fp32():
        rows.append(copy_row(plan.device, plan.repeats))
        matmuls_done: set[tuple] = set()
        for cfg in plan.configs:
            print(f"... {cfg.label}", file=sys.stderr, flush=True)
            prob = Problem(cfg)
            key = (cfg.d_in, cfg.d_sae, cfg.batch, cfg.dtype)
            if key not in matmuls_done:
                matmuls_done.add(key)
                rows.append(_guarded_case(prob, REFERENCE_PROVIDER, "matmul", plan.repeats))
            for op in (o for o in OPS if o in plan.ops):
                for provider in providers:
                    rows.append(_guarded_case(prob, provider, op, plan.repeats))
                    r = rows[-1]
                    print(f"    {op:16s} {provider:15s} {fmt(r['ms'], 'num'):>8s} ms "
                          f"{r['status']}", file=sys.stderr, flush=True)  # fmt: skip
                if op == "decode":
                    prob.drop_dense()
            del prob
            gc.collect()
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    peaks = add_peak_fractions(rows)
    targets = target_ratios(rows, plan.device)
    elapsed = time.perf_counter() - t_start

    print()
    print(markdown_table(rows))
    timing = ("CUDA: triton.testing.do_bench median" if plan.device == "cuda" else
              f"CPU: median of up to {plan.repeats} calls after a warm-up, "
              f"{torch.get_num_threads()} threads; extra memory n/a on CPU")  # fmt: skip
    print(f"\n{timing}. % peak: TFLOP/s over the best matmul of the dtype "
          f"({', '.join(f'{d} {v:.3g}' for d, v in peaks['tflops'].items())} TFLOP/s), "
          f"GB/s over the copy ({fmt(peaks['gbps'], 'num')} GB/s). rel err: against the "
          f"float32 reference on each provider's own selection. Total {elapsed:.0f} s.")  # fmt: skip
    if targets:
        label = "GPU, fastsae-triton" if plan.device == "cuda" else "CPU, fastsae-torch"
        print(f"\n## Target ratios ({label})\n")
        print(targets_table(targets))
    failed = [r for r in rows if r["status"] != "ok"]

    stem = f"bench-{device_slug(plan.device)}-{_dt.date.today().isoformat()}"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    meta["elapsed_s"] = round(elapsed, 1)
    meta["peaks"] = peaks
    payload = {"meta": meta, "rows": rows, "skipped": skipped, "targets": targets}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    try:
        plot(rows, png_path, f"fastsae bench, {meta['device']}, {meta['date'][:10]}")
        print(f"\nwrote {json_path} and {png_path}")
    except ImportError as e:  # matplotlib is an extra: the JSON is the result, the PNG a view
        print(f"\nwrote {json_path}; no plot ({e}; pip install 'fastsae[bench]')")
    if failed:
        print(f"\n{len(failed)} row(s) failed (numerics) or raised (error):", file=sys.stderr)
        for r in failed:
            print(f"  {r['status'].upper()} {r['arch']} {r['d_in']}x{r['d_sae']} B={r['batch']} "
                  f"{r['dtype']} {r['op']} {r['provider']}: {r['reason']}", file=sys.stderr)  # fmt: skip
        return 1
    return 0
