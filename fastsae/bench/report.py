"""Report of ``fastsae bench``: fractions of the measured peaks, the target ratios, the
markdown tables and the plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastsae.bench.cases import ARCHS, GEMMA_SCOPE_SHAPES, OPS, PROVIDERS


def add_peak_fractions(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fill ``frac_peak``: TFLOP/s over the best matmul of the dtype, GB/s over the copy."""
    ok = [r for r in rows if r["status"] == "ok"]
    peak_tflops: dict[str, float] = {}
    for r in ok:
        if r["op"] == "matmul":
            peak_tflops[r["dtype"]] = max(peak_tflops.get(r["dtype"], 0.0), r["tflops"])
    copies = [r["gbps"] for r in ok if r["op"] == "copy"]
    peak_gbps = max(copies) if copies else None
    for r in ok:
        if r["op"] == "copy":
            continue
        if r["tflops"] is not None and r["dtype"] in peak_tflops:
            r["frac_peak"] = r["tflops"] / peak_tflops[r["dtype"]]
        elif r["gbps"] is not None and peak_gbps:
            r["frac_peak"] = r["gbps"] / peak_gbps
    return {"tflops": peak_tflops, "gbps": peak_gbps}


# ------------------------------------------------------------------------------ targets
def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if r["status"] == "ok" and all(r.get(key) == v for key, v in match.items()):
            return r
    return None


TARGET_ORDER = [
    "topk_encode time / bare x@W_enc time",
    "topk_encode extra peak memory / (B*d_sae*2 bytes)",
    "sparse_decode speed-up over dense decode (dense-torch)",
    "sparse_decode fraction of copy bandwidth",
    "TopKSAE.forward sae_lens / fastsae",
    "JumpReLUSAE.forward sae_lens / fastsae",
    "TopK sparse backward / encoder matmul",
]


def target_ratios(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """fastsae's GPU targets (the goals in the ``add`` calls below, in ``TARGET_ORDER``),
    measured for fastsae-triton on CUDA; on CPU the same ratios
    for fastsae-torch, labelled CPU (the targets are GPU targets: shown, not judged)."""
    fast = "fastsae-triton" if device == "cuda" else "fastsae-torch"
    on_gpu = device == "cuda"
    out: list[dict[str, Any]] = []

    def add(name: str, r: dict[str, Any], value: float | None, cmp: str, goal: float, note=""):
        if value is None:
            return
        met = value <= goal if cmp == "<=" else value < goal if cmp == "<" else value >= goal
        out.append(
            {
                "ratio": name if on_gpu else f"CPU: {name}",
                "config": f"{r['d_in']}x{r['d_sae']} B={r['batch']} {r['dtype']}",
                "provider": fast,
                "value": value,
                "target": f"{cmp} {goal:g}",
                "met": met if on_gpu else None,
                "note": note,
            }
        )

    for r in rows:
        if r["status"] != "ok" or r["provider"] != fast:
            continue
        same = dict(d_in=r["d_in"], d_sae=r["d_sae"], batch=r["batch"], dtype=r["dtype"])
        if r["arch"] == "topk" and r["op"] == "encode":
            mm = _find(rows, op="matmul", **same)
            if mm:
                add("topk_encode time / bare x@W_enc time", r, r["ms"] / mm["ms"], "<=", 1.15)
            if r["peak_mem_mb"] is not None:
                dense_bytes = r["batch"] * r["d_sae"] * 2
                add("topk_encode extra peak memory / (B*d_sae*2 bytes)", r,
                    r["peak_mem_mb"] * 2**20 / dense_bytes, "<", 0.05)  # fmt: skip
        if r["arch"] == "topk" and r["op"] == "decode":
            dense = _find(rows, arch="topk", op="decode", provider="dense-torch", **same)
            if dense:
                add("sparse_decode speed-up over dense decode (dense-torch)", r,
                    dense["ms"] / r["ms"], ">=", 20)  # fmt: skip
            if r["frac_peak"] is not None:
                add("sparse_decode fraction of copy bandwidth", r, r["frac_peak"], ">=", 0.6)
        if r["op"] == "forward":
            sl = _find(rows, arch=r["arch"], op="forward", provider="sae_lens", **same)
            if sl and r["arch"] == "topk":
                add("TopKSAE.forward sae_lens / fastsae", r, sl["ms"] / r["ms"], ">=", 3)
            if sl and r["arch"] == "jumprelu":
                gemma = (r["d_in"], r["d_sae"]) in GEMMA_SCOPE_SHAPES
                add("JumpReLUSAE.forward sae_lens / fastsae", r, sl["ms"] / r["ms"], ">=", 2,
                    "" if gemma else "not a Gemma Scope shape (target is for those)")  # fmt: skip
        if r["arch"] == "topk" and r["op"] == "forward_backward":
            fwd = _find(rows, arch="topk", op="forward", provider=fast, **same)
            mm = _find(rows, op="matmul", **same)
            if fwd and mm:
                add("TopK sparse backward / encoder matmul", r, (r["ms"] - fwd["ms"]) / mm["ms"],
                    "<", 0.5, "backward = forward_backward - forward (no cleaner split)")  # fmt: skip
    order = list(dict.fromkeys(t["ratio"] for t in out))
    order.sort(key=lambda name: TARGET_ORDER.index(name.removeprefix("CPU: ")))
    return sorted(out, key=lambda t: order.index(t["ratio"]))


# ------------------------------------------------------------------------------ report
def fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.0f}%" if v >= 0.01 else f"{100 * v:.1f}%"
    if kind == "err":
        return f"{v:.1e}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ["arch", "d_in x d_sae", "B", "dtype", "op", "provider", "ms", "TFLOP/s", "GB/s",
            "% peak", "extra MB", "rel err", "L0", "note"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        shape = f"{r['d_in']}x{r['d_sae']}" if r["d_in"] else "-"
        mem = "n/a" if r["device"] == "cpu" else fmt(r["peak_mem_mb"], "num")
        note = ""
        if r["status"] != "ok":
            note = f"**{r['status'].upper()}**: {r['reason']}"
        elif r["sel_diff"]:
            note = f"near-tie selection in {100 * r['sel_diff']:.2g}% of rows"
        elif r["op"] == "copy":
            note = f"{r['bytes'] / 2**20:.0f} MiB buffer"
        l0 = "-"
        if r["k"] is not None:
            l0 = f"{r['k']:g}" + (f" (max {r['l0_max']})" if r["l0_max"] is not None else "")
        cells = [r["arch"], shape, str(r["batch"] or "-"), r["dtype"] or "-", r["op"],
                 r["provider"], fmt(r["ms"], "num"), fmt(r["tflops"], "num"),
                 fmt(r["gbps"], "num"), fmt(r["frac_peak"], "pct"), mem,
                 fmt(r["rel_err"], "err"), l0, note]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| ratio | config | value | target | met | note |", "|---|---|---|---|---|---|"]
    for t in targets:
        met = "n/a (GPU target)" if t["met"] is None else ("yes" if t["met"] else "**no**")
        value = f"{t['value']:.3g}"
        lines.append(
            f"| {t['ratio']} | {t['config']} | {value} | {t['target']} | {met} | {t['note']} |"
        )
    return "\n".join(lines)


PROVIDER_COLORS = {
    "fastsae-triton": "#d62728",
    "fastsae-torch": "#ff7f0e",
    "sae_lens": "#1f77b4",
    "dense-torch": "#7f7f7f",
    "x@W_enc (ref)": "#2ca02c",
}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars, ms per provider (log scale): one panel per (op, arch), one group per
    (shape, batch, dtype); encode panels carry the bare matmul as a reference bar."""
    # optional dependency: matplotlib (the [bench] extra)
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = [r for r in rows if r["status"] == "ok" and r["op"] in OPS]
    panels = [(op, arch) for op in OPS for arch in ARCHS
              if any(r["op"] == op and r["arch"] == arch for r in ok)]  # fmt: skip
    if not panels:
        return
    archs = [a for a in ARCHS if any(p[1] == a for p in panels)]
    n_groups = max(
        len({(r["d_in"], r["d_sae"], r["batch"], r["dtype"]) for r in ok if r["arch"] == a})
        for a in archs
    )
    # a few groups: archs side by side; the GPU grid (12+ groups): one panel per row
    cols = len(archs) if n_groups <= 4 else 1
    n_rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(max(5.0, 1.0 * n_groups + 1.5) * cols, 3.3 * n_rows))
    handles: dict[str, Any] = {}
    for i, (op, arch) in enumerate(panels):
        ax = fig.add_subplot(n_rows, cols, i + 1)
        sel = [r for r in ok if r["op"] == op and r["arch"] == arch]
        keys = sorted({(r["d_in"], r["d_sae"], r["batch"], r["dtype"]) for r in sel},
                      key=lambda g: (g[0] * g[1], g[0], g[2], g[3] != "fp32"))  # fmt: skip
        series = [p for p in PROVIDERS if any(r["provider"] == p for r in sel)]
        if op == "encode":
            series.append("x@W_enc (ref)")
        width = 0.8 / len(series)
        all_ms = []
        for si, name in enumerate(series):
            xs, ys = [], []
            for gi, (d_in, d_sae, batch, dtype) in enumerate(keys):
                same = dict(d_in=d_in, d_sae=d_sae, batch=batch, dtype=dtype)
                if name == "x@W_enc (ref)":
                    r = _find(rows, op="matmul", **same)
                else:
                    r = _find(sel, provider=name, **same)
                if r is not None:
                    xs.append(gi - 0.4 + width * (si + 0.5))
                    ys.append(r["ms"])
            bars = ax.bar(xs, ys, width, color=PROVIDER_COLORS[name], label=name)
            ax.bar_label(bars, [fmt(y, "num") for y in ys], fontsize=6, rotation=90, padding=2)
            handles.setdefault(name, bars)
            all_ms += ys
        ax.set_yscale("log")
        # bars on a log axis start at the bottom edge: put it well below the fastest bar
        ax.set_ylim(min(all_ms) / 4, max(all_ms) * 4)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(-0.6, len(keys) - 0.4)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{d}x{n}\nB={b} {t}" for d, n, b, t in keys], fontsize=8)
        ax.set_ylabel("ms (log scale)")
        ax.set_title(f"{arch} {op}", fontsize=10)
        ax.grid(axis="y", which="major", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles),
               fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    fig.savefig(path, dpi=110, bbox_inches="tight")
