"""Benchmark engine behind ``fastsae bench`` (and ``benchmarks/test_bench_kernels.py``).

One command produces the whole report: a markdown table on stdout, the target ratios,
and ``bench-<device>-<date>.json`` / ``.png`` in ``--out``. ``plan`` holds the flags and
per-device defaults; ``cases`` the problems, the providers' callables and the timers;
``numerics`` the numerics checks; ``rows`` one case checked and timed under the work
model; ``meta`` the run's metadata; ``report`` the peaks, target ratios, tables and plot;
``engine`` the run. This package re-exports their public names.

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
from fastsae.bench.engine import run
from fastsae.bench.meta import device_name, device_slug, metadata
from fastsae.bench.numerics import NumericsError, check
from fastsae.bench.plan import Plan, add_arguments, command_line, make_plan, parse_shape
from fastsae.bench.report import (
    add_peak_fractions,
    fmt,
    markdown_table,
    plot,
    target_ratios,
    targets_table,
)
from fastsae.bench.rows import copy_row, run_case

__all__ = [
    # plan
    "Plan",
    "add_arguments",
    "command_line",
    "make_plan",
    "parse_shape",
    # rows
    "copy_row",
    "run_case",
    # meta
    "device_name",
    "device_slug",
    "metadata",
    # engine
    "run",
    # cases
    "ARCHS",
    "CHECK_ROWS",
    "COPY_BYTES",
    "CPU_BATCHES",
    "CPU_SHAPES",
    "DTYPE_NAMES",
    "DTYPES",
    "GEMMA_SCOPE_SHAPES",
    "GPU_BATCHES",
    "GPU_SHAPES",
    "K",
    "OPS",
    "PROVIDERS",
    "QUICK_BATCHES",
    "QUICK_K",
    "QUICK_SHAPES",
    "REFERENCE_OPS",
    "REFERENCE_PROVIDER",
    "RTOL",
    "Config",
    "Problem",
    "ieee_fp32",
    "make_runner",
    "peak_extra_mb",
    "provider_env",
    "rotating_call",
    "skip_reason",
    "time_call",
    # numerics
    "NumericsError",
    "check",
    # report
    "add_peak_fractions",
    "fmt",
    "markdown_table",
    "plot",
    "target_ratios",
    "targets_table",
]
