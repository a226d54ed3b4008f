"""``fastsae`` command line: ``demo``, ``convert`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastsae import bench as bench_engine


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def demo(args: argparse.Namespace) -> int:
    """Build a TopK SAE, save it in SAELens format, reload it, and compare the
    sparse forward with the dense SAELens-style computation on the same batch."""
    from fastsae import SAE, TopKSAE, TopKSAEConfig

    torch.manual_seed(args.seed)
    cfg = TopKSAEConfig(
        d_in=args.d_in,
        d_sae=args.d_sae,
        k=args.k,
        metadata={"model_name": "demo", "hook_name": "blocks.0.hook_resid_pre"},
    )
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1)
        sae.b_dec.normal_(std=0.1)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastsae-demo-"))
    sae.save_model(out_dir)
    sae = SAE.load_from_disk(out_dir)
    print(f"saved and reloaded a {type(sae).__name__} (d_in={cfg.d_in}, d_sae={cfg.d_sae}, "
          f"k={cfg.k}) in SAELens format at {out_dir}")  # fmt: skip

    x = torch.randn(args.batch, cfg.d_in)
    with torch.no_grad():
        code = sae.encode_sparse(x)
        sparse_out = sae(x)
        dense_acts = sae.encode(x)
        dense_out = dense_acts @ sae.W_dec + sae.b_dec
        rel_err = ((sparse_out - dense_out).norm() / dense_out.norm()).item()
        t_sparse = _timeit(lambda: sae(x), args.repeats)
        t_dense = _timeit(lambda: sae.encode(x) @ sae.W_dec + sae.b_dec, args.repeats)
    print(f"encode_sparse: values {tuple(code.values.shape)}, indices {tuple(code.indices.shape)}")
    print(f"L0 per token: {(dense_acts > 0).sum(-1).float().mean().item():.1f}")
    print(f"sparse forward vs dense encode+decode: relative difference {rel_err:.2e}")
    print(f"batch {args.batch}: sparse forward {t_sparse * 1e3:.1f} ms, "
          f"dense encode+decode {t_dense * 1e3:.1f} ms ({t_dense / t_sparse:.2f}x)")  # fmt: skip
    if rel_err > 1e-4:
        print("ERROR: sparse and dense paths disagree", file=sys.stderr)
        return 1
    return 0


def convert(args: argparse.Namespace) -> int:
    """Load any supported SAE folder and write it in the SAELens 6.x format."""
    from fastsae import SAE

    sae = SAE.load_from_disk(args.src, dtype=args.dtype, validate=True)
    weights, cfg = sae.save_model(args.dst)
    print(f"{args.src} -> {type(sae).__name__} (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) "
          f"written to {weights.parent}")  # fmt: skip
    return 0


def bench(args: argparse.Namespace) -> int:
    """Benchmark fastsae (Triton and torch paths) against sae_lens and the dense maths."""
    return bench_engine.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="save/reload a TopK SAE and run its sparse forward")
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory to save the SAE in (default: a temporary one)")
    p.set_defaults(func=demo)

    p = sub.add_parser(
        "convert", help="convert an SAE folder (any supported format) to SAELens format"
    )
    p.add_argument("src", help="folder: SAELens, Gemma Scope, sparsify or dictionary_learning")
    p.add_argument("dst", help="output folder")
    p.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: as stored)")
    p.set_defaults(func=convert)

    p = sub.add_parser(
        "bench",
        help="time encode/decode/forward/backward: fastsae-triton, fastsae-torch, sae_lens, "
        "dense torch; table, JSON and PNG",
    )
    bench_engine.add_arguments(p)
    p.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, NotImplementedError) as e:
        print(f"fastsae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
