"""The plan of ``fastsae bench``: its command-line flags and how they, with the
per-device defaults of ``cases``, resolve into the list of problems to run."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from fastsae.bench.cases import (
    ARCHS,
    CPU_BATCHES,
    CPU_SHAPES,
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
    Config,
    K,
)


@dataclasses.dataclass
class Plan:
    device: str
    configs: list[Config]
    providers: list[str]
    ops: list[str]
    repeats: int
    notes: list[str]


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
