"""The run of ``fastsae bench``: the plan's cases in turn, then the report on stdout and
the JSON and PNG in ``--out``."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fastsae
from fastsae.bench.cases import OPS, REFERENCE_PROVIDER, Problem, ieee_fp32, skip_reason
from fastsae.bench.meta import device_slug, metadata
from fastsae.bench.plan import command_line, make_plan
from fastsae.bench.report import (
    add_peak_fractions,
    fmt,
    markdown_table,
    plot,
    target_ratios,
    targets_table,
)
from fastsae.bench.rows import copy_row, run_case_guarded


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
                rows.append(run_case_guarded(prob, REFERENCE_PROVIDER, "matmul", plan.repeats))
            for op in (o for o in OPS if o in plan.ops):
                for provider in providers:
                    rows.append(run_case_guarded(prob, provider, op, plan.repeats))
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
