"""Compile every Triton kernel variant for sm_80 / sm_90 without a GPU and report what
the compiler made of it: registers, shared memory, stack, spill instructions, tensor-core
instructions. ``python -m fastsae.kernels.check --help``.

How it works (compile-only; nothing here is measured on a GPU):

1. Record. The kernel launchers in ``fastsae.kernels`` are called the way
   ``fastsae.ops`` and ``fastsae.kernels.autograd`` call them, on shape-only ``meta``
   tensors that say ``is_cuda`` (so every launcher picks its GPU launch parameters),
   while ``JITFunction.run`` and ``Autotuner.run`` are replaced by a recorder. Each
   recorded launch is (kernel, args, constexprs, grid) exactly as the launcher
   computed them, so this check cannot drift from the launchers.
2. Compile. A fake Triton driver whose ``get_current_target()`` is
   ``GPUTarget("cuda", arch, 32)`` is made active and each recorded launch is replayed
   through the real ``JITFunction.run(..., warmup=True)`` (which compiles and never
   launches), so specialisation (alignment, ``== 1`` ints) is Triton's own. A kernel
   with an autotune list is compiled once per configuration.
3. Read. ``cuobjdump -res-usage`` and ``cuobjdump -sass`` (shipped inside the triton
   wheel) on each cubin give registers, stack, and counts of ``HGMMA`` / ``HMMA`` /
   ``STL`` / ``LDL`` instructions; shared memory is the larger of Triton's metadata
   and cuobjdump's.

"Every variant" is every (kernel, constexprs, dtype) the launchers pick for the calls in
``build_cases`` at one representative shape (``ROWS`` x ``D_IN`` -> ``D_SAE``): TopK at
each k of ``TOPK_KS`` and with AbsTopK + decoder-norm rescaling, both JumpReLU outputs, the
sparse decode, and the backward kernels as ``kernels.autograd`` calls them; each for
fp32, fp16 and bf16. Block sizes that depend on k or on small shapes differ elsewhere.

Violations: a compile error; any spill instruction; shared memory over the device
limit; a kernel with a ``tt.dot`` on 16-bit data without ``HGMMA`` on sm_90 or without
``HMMA`` on sm_80; in a full run, a module-level ``*_kernel`` of ``fastsae.kernels`` that
no case launches. ``--strict`` exits 1 on any violation; otherwise only a compile error
does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fastsae import kernels as kernels_package

# Triton is an optional dependency: the cuobjdump parsers and the violation rules work
# without it, so each function that needs Triton (or a kernel module) imports it itself.

ARCHS = (80, 90)
# bytes of shared memory one block may use (opt-in maximum): 227 KB on H100, 163 KB on A100
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPE_NAMES = ("fp32", "fp16", "bf16")
SIXTEEN_BIT = ("fp16", "bf16")

# Representative GPU shapes: a 64k-latent SAE on a 2304-wide model (Gemma 2 2B), a batch
# of 256 rows (the launch plans split the latents more at small batches). The launchers
# derive their plans from these (the top-k filter also its SLOTS from k); the autotuned
# kernels are compiled at every configuration of their lists.
ROWS, D_IN, D_SAE = 256, 2304, 65536
BIG_ROWS = 8192
TOPK_KS = (32, 64, 128)  # the fused kernel's k stops at 128
CODE_K = 64  # active latents per row of the sparse code fed to decode / backward


# ---------------------------------------------------------------------------------------
# parsers (pure functions of cuobjdump's text)

_RES_FUNC = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_RES_FIELD = re.compile(r"\b([A-Z]+(?:\[\d+\])?):(\d+)")
_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INSN = re.compile(
    r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(?:\.|\s|;)"
)


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` output -> {function: {"REG": .., "STACK": .., "SHARED": ..,
    "LOCAL": .., ...}}."""
    out: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in text.splitlines():
        m = _RES_FUNC.match(line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            out[current] = {k: int(v) for k, v in _RES_FIELD.findall(line)}
            current = None
    return out


def count_sass(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -sass`` output -> {function: {opcode without modifiers: count}}."""
    out: dict[str, dict[str, int]] = {}
    counts: dict[str, int] | None = None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            counts = out.setdefault(m.group(1), {})
            continue
        m = _SASS_INSN.match(line)
        if m and counts is not None:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return out


# ---------------------------------------------------------------------------------------
# result rows and their violations


@dataclasses.dataclass
class Row:
    """One compiled kernel variant on one architecture."""

    kernel: str
    op: str
    direction: str  # "forward" | "backward"
    variant: str  # which call of the op (k, flags, which gradient)
    dtype: str  # the op's data dtype (fp32 / fp16 / bf16)
    arch: int
    config: dict[str, Any]  # constexprs, num_warps, num_stages
    registers: int = 0
    shared: int = 0
    stack: int = 0
    local: int = 0
    hgmma: int = 0
    hmma: int = 0
    spill_instructions: int = 0  # STL + LDL
    uses_dot: bool = False  # the TTIR has a tt.dot
    error: str | None = None
    violations: list[str] = dataclasses.field(default_factory=list)


def find_violations(row: Row) -> list[str]:
    """What ``--strict`` fails on, for one row."""
    if row.error is not None:
        return [f"compile error: {row.error.splitlines()[0] if row.error else ''}"]
    found = []
    if row.spill_instructions > 0:
        found.append(f"spills: {row.spill_instructions} STL/LDL, {row.stack}-byte stack")
    limit = SHARED_LIMIT.get(row.arch)
    if limit is not None and row.shared > limit:
        found.append(f"shared memory {row.shared} B over the sm_{row.arch} limit {limit} B")
    if row.uses_dot and row.dtype in SIXTEEN_BIT:
        if row.arch >= 90 and row.hgmma == 0:
            found.append(f"16-bit tl.dot without HGMMA (wgmma) on sm_{row.arch}")
        elif row.arch < 90 and row.hmma == 0 and row.hgmma == 0:
            found.append(f"16-bit tl.dot without HMMA (mma.sync) on sm_{row.arch}")
    return found


# ---------------------------------------------------------------------------------------
# step 1: record the launches the launchers make


@dataclasses.dataclass
class Launch:
    fn: Any  # JITFunction, or an Autotuner / Heuristics wrapping one
    args: tuple
    kwargs: dict[str, Any]
    grid: Any


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a launcher, as an op of ``fastsae.ops`` makes it."""

    op: str
    direction: str
    variant: str
    dtype: str
    call: Callable[[], object]


class FakeCudaTensor(torch.Tensor):
    """A meta tensor that says it is on CUDA, so launchers pick GPU parameters."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_cases(dtypes: Sequence[str] = DTYPE_NAMES) -> list[Case]:
    """Every launcher call the dispatcher makes, forward and backward, per dtype.

    Backward calls mirror ``fastsae.kernels.autograd``: the decoder's gradients
    (``gather_dot``, ``segment_rows_sum`` of the values) in the model dtype, and the
    encoder's sparse gradients (TopK, BatchTopK, sparse JumpReLU) from an fp32 ``d_h``:
    ``dx`` by ``gather_weighted_sum`` through ``W_enc.T`` and ``dW_enc`` by a transposed
    ``segment_rows_sum``.
    """

    def t(*shape: int, dtype) -> Any:
        return torch.empty(*shape, dtype=dtype, device="meta").as_subclass(FakeCudaTensor)

    cases: list[Case] = []
    for name in dtypes:
        cases += _cases_for(name, t)
    return cases


def _cases_for(name: str, t: Callable[..., Any]) -> list[Case]:
    """The cases of one dtype (a function of its own so that each lambda binds the
    tensors of its dtype, not the loop's last ones)."""
    # optional dependency: triton (every kernel module imports it)
    from . import jumprelu_encode as jr
    from . import sparse_backward as sb
    from . import sparse_decode as sd
    from . import topk_encode as te

    cases: list[Case] = []
    dt = DTYPES[name]
    x, w_enc = t(ROWS, D_IN, dtype=dt), t(D_IN, D_SAE, dtype=dt)
    b_enc, thr, dec_norm = t(D_SAE, dtype=dt), t(D_SAE, dtype=dt), t(D_SAE, dtype=dt)
    w_dec, b_dec = t(D_SAE, D_IN, dtype=dt), t(D_IN, dtype=dt)
    vals, idx = t(ROWS, CODE_K, dtype=dt), t(ROWS, CODE_K, dtype=torch.int64)
    grad_out, d_h = t(ROWS, D_IN, dtype=dt), t(ROWS, CODE_K, dtype=torch.float32)
    order, offsets = t(ROWS * CODE_K, dtype=torch.int64), t(D_SAE + 1, dtype=torch.int64)

    def add(op: str, direction: str, variant: str, call: Callable[[], object]) -> None:
        cases.append(Case(op, direction, variant, name, call))

    for k in TOPK_KS:
        add("topk_encode", "forward", f"k={k}", lambda k=k: te.topk_encode(x, w_enc, b_enc, k))
    # a training-size batch: few splits, so each row's candidates fit the select kernel's
    # registers (the whole-row variant)
    x_big = t(BIG_ROWS, D_IN, dtype=dt)
    add(
        "topk_encode",
        "forward",
        f"k=64 B={BIG_ROWS}",
        lambda: te.topk_encode(x_big, w_enc, b_enc, 64),
    )
    add(
        "topk_encode",
        "forward",
        "k=64 abs dec_norm",
        lambda: te.topk_encode(x, w_enc, b_enc, 64, dec_norm=dec_norm, abs_select=True),
    )
    add(
        "jumprelu_encode",
        "forward",
        "dense",
        lambda: jr.jumprelu_encode_dense(x, w_enc, b_enc, thr),
    )
    add(
        "jumprelu_encode",
        "forward",
        "sparse",
        lambda: jr.jumprelu_encode_sparse(x, w_enc, b_enc, thr),
    )
    if name == "fp32":
        # fp32 weights under TF32 (torch's "high" matmul precision) take the tensor cores
        add(
            "topk_encode",
            "forward",
            "k=64 tf32",
            lambda: _tf32(te.topk_encode, x, w_enc, b_enc, 64),
        )
        add(
            "jumprelu_encode",
            "forward",
            "dense tf32",
            lambda: _tf32(jr.jumprelu_encode_dense, x, w_enc, b_enc, thr),
        )
    add(
        "jumprelu_encode",
        "forward",
        "pack",
        lambda: jr.pack_rows(
            t(ROWS, 8, 64, dtype=dt),
            t(ROWS, 8, 64, dtype=torch.int32),
            t(ROWS, 8, dtype=torch.int32),
            CODE_K,
        ),  # fmt: skip
    )
    add("sparse_decode", "forward", "bias", lambda: sd.gather_weighted_sum(vals, idx, w_dec, b_dec))
    add("sparse_decode", "backward", "d_values", lambda: sb.gather_dot(grad_out, idx, w_dec, dt))
    add(
        "sparse_decode",
        "backward",
        "dW_dec",
        lambda: sb.segment_rows_sum(order, offsets, vals, grad_out, CODE_K, dt),
    )
    add(
        "encoders (sparse)",
        "backward",
        "dx",
        lambda: sd.gather_weighted_sum(d_h, idx, w_enc.T, out_dtype=dt),
    )
    add(
        "encoders (sparse)",
        "backward",
        "dW_enc",
        lambda: sb.segment_rows_sum(order, offsets, d_h, x, CODE_K, dt, transposed=True),
    )
    return cases


def _tf32(fn: Callable[..., object], *args: Any) -> object:
    """``fn(*args)`` under torch's "high" float32 matmul precision (TF32 dots)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        return fn(*args)
    finally:
        torch.set_float32_matmul_precision(saved)


@contextlib.contextmanager
def _recording(sink: list[Launch]) -> Iterator[None]:
    """Replace the JIT's and autotuner's ``run`` by a recorder that never launches."""
    from triton.runtime import autotuner, jit  # optional dependency: triton

    def record(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(self, args, dict(kwargs), grid))

    saved = jit.JITFunction.run, autotuner.Autotuner.run

    def record_autotuned(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        sink.append(Launch(self, args, kwargs, grid))

    jit.JITFunction.run = record
    autotuner.Autotuner.run = record_autotuned
    try:
        yield
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = saved


def record_case(case: Case) -> list[Launch]:
    """The launches ``case`` makes (none of them runs)."""
    launches: list[Launch] = []
    with _recording(launches):
        try:
            case.call()
        except RuntimeError as exc:
            # a launcher that reads its output after launching (jumprelu_encode_sparse
            # reads the per-row counts) meets a meta tensor: its launch is recorded already
            if not launches or "meta" not in str(exc):
                raise
    return launches


# ---------------------------------------------------------------------------------------
# step 2: compile each launch for a target


class _TargetOnlyDriver:
    """Enough of a Triton driver for the JIT to compile (never to launch) for one arch."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget  # optional dependency: triton

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> str:
        return f"compile-only-sm{self.arch}"  # the JIT keys its caches by device

    def get_current_stream(self, device: object = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def target_arch(arch: int) -> Iterator[None]:
    """Make a compile-only driver for ``sm_<arch>`` Triton's active driver."""
    import triton.runtime.driver as driver_mod  # optional dependency: triton

    config = getattr(driver_mod, "driver", driver_mod)  # triton >= 3.2 has a DriverConfig
    saved = getattr(config, "_active", None)
    config.set_active(_TargetOnlyDriver(arch))
    try:
        yield
    finally:
        # not reset_active(): that builds the real CUDA driver, which fails without a GPU
        if hasattr(config, "_active"):
            config._active = saved


def _jit_of(fn: Any) -> Any:
    """The ``JITFunction`` under autotuner / heuristics wrappers."""
    from triton.runtime.jit import JITFunction  # optional dependency: triton

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def kernel_name(fn: Any) -> str:
    """The Python name of a recorded kernel (through any autotune wrapper)."""
    return _jit_of(fn).fn.__name__


def _configs(launch: Launch) -> list[dict[str, Any]]:
    """Extra kwargs per configuration: one empty dict, or one per autotune config."""
    configs = getattr(launch.fn, "configs", None)
    if not configs:
        return [{}]
    return [cfg.all_kwargs() for cfg in configs]


def compile_launch(launch: Launch, extra: dict[str, Any]) -> Any:
    """Compile one recorded launch (with ``extra`` kwargs) for the active target."""
    from triton.runtime.autotuner import Autotuner  # optional dependency: triton

    fn = launch.fn.fn if isinstance(launch.fn, Autotuner) else launch.fn
    return fn.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs, **extra)


# ---------------------------------------------------------------------------------------
# step 3: read each cubin


def find_cuobjdump() -> str | None:
    """``cuobjdump`` from the triton wheel, ``$FASTSAE_CUOBJDUMP`` or ``PATH``."""
    env = os.environ.get("FASTSAE_CUOBJDUMP")
    if env:
        return env
    try:
        import triton  # optional dependency: triton
    except ImportError:
        return shutil.which("cuobjdump")
    wheel = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(wheel) if wheel.exists() else shutil.which("cuobjdump")


def read_cubin(cubin: bytes, cuobjdump: str) -> tuple[dict[str, int], dict[str, int]]:
    """(resource usage, SASS opcode counts) of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run(
            [cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = parse_res_usage(res)
    ops = count_sass(sass)
    if len(usage) != 1 or len(ops) != 1:
        raise RuntimeError(
            f"expected one function in the cubin, cuobjdump found {sorted(usage)} / {sorted(ops)}"
        )
    return next(iter(usage.values())), next(iter(ops.values()))


def _config_of(launch: Launch, extra: dict[str, Any], kernel: Any) -> dict[str, Any]:
    jit = _jit_of(launch.fn)
    constexpr_names = {p.name for p in jit.params if p.is_constexpr}
    config = {k: v for k, v in {**launch.kwargs, **extra}.items() if k in constexpr_names}
    config["num_warps"] = kernel.metadata.num_warps
    config["num_stages"] = kernel.metadata.num_stages
    return config


def check(
    archs: Sequence[int] = ARCHS,
    dtypes: Sequence[str] = DTYPE_NAMES,
    kernels: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Compile every selected variant for every arch; one Row per distinct compiled kernel.

    ``kernels``: substrings of kernel or op names to keep (all when empty).
    """
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        raise RuntimeError(
            "fastsae.kernels.check compiles for a GPU target: unset TRITON_INTERPRET (under it "
            "@triton.jit makes interpreter functions)"
        )
    recorded = [(case, launch) for case in build_cases(dtypes) for launch in record_case(case)]
    if kernels:
        recorded = [
            (c, ln)
            for c, ln in recorded
            if any(s in kernel_name(ln.fn) or s in c.op for s in kernels)
        ]
    return compile_rows(recorded, archs, progress)


def kernels_without_case(dtypes: Sequence[str] = DTYPE_NAMES) -> list[str]:
    """Module-level kernels of ``fastsae.kernels`` (names ending in ``_kernel``) that no
    case of ``build_cases`` launches: a new kernel must get a case, or the check would
    silently skip it."""
    from triton.runtime.jit import KernelInterface  # optional dependency: triton

    defined = set()
    for info in pkgutil.iter_modules(kernels_package.__path__):
        if info.name == "check":
            continue
        module = importlib.import_module(f"{kernels_package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, KernelInterface) and name.endswith("_kernel"):
                defined.add(kernel_name(obj))
    launched = {kernel_name(ln.fn) for case in build_cases(dtypes) for ln in record_case(case)}
    return sorted(defined - launched)


def compile_rows(
    recorded: Sequence[tuple[Case, Launch]],
    archs: Sequence[int] = ARCHS,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Compile recorded launches (every autotune configuration of each) for each arch and
    read their cubins; a binary reached from several calls is reported once per arch."""
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError(
            "cuobjdump not found (triton's wheel ships it; or set FASTSAE_CUOBJDUMP)"
        )
    rows: list[Row] = []
    for arch in archs:
        seen: set[tuple[str, str]] = set()
        with target_arch(arch):
            for case, launch in recorded:
                name = kernel_name(launch.fn)
                for extra in _configs(launch):
                    row = Row(name, case.op, case.direction, case.variant, case.dtype, arch, {})
                    try:
                        kernel = compile_launch(launch, extra)
                    except Exception as exc:  # a compile error is a result, not a crash
                        row.error = f"{type(exc).__name__}: {exc}".strip()
                        row.config = {k: v for k, v in {**launch.kwargs, **extra}.items()}
                    else:
                        key = (name, kernel.metadata.hash)
                        if key in seen:  # the same binary reached from another call
                            continue
                        seen.add(key)
                        row.config = _config_of(launch, extra, kernel)
                        usage, ops = read_cubin(kernel.asm["cubin"], cuobjdump)
                        row.registers = usage.get("REG", 0)
                        row.stack = usage.get("STACK", 0)
                        row.local = usage.get("LOCAL", 0)
                        row.shared = max(usage.get("SHARED", 0), kernel.metadata.shared or 0)
                        row.hgmma = ops.get("HGMMA", 0)
                        row.hmma = ops.get("HMMA", 0)
                        row.spill_instructions = ops.get("STL", 0) + ops.get("LDL", 0)
                        row.uses_dot = "tt.dot" in kernel.asm.get("ttir", "")
                    row.violations = find_violations(row)
                    rows.append(row)
                    if progress is not None:
                        progress(_format_row(row))
    return rows


# ---------------------------------------------------------------------------------------
# output

_COLUMNS = (
    ("kernel", 26), ("op", 17), ("dir", 4), ("variant", 17), ("dtype", 5), ("arch", 5),
    ("config", 52), ("regs", 4), ("shared", 6), ("stack", 5), ("HGMMA", 5), ("HMMA", 5),
    ("spills", 6),
)  # fmt: skip


def _config_text(config: dict[str, Any]) -> str:
    parts = [
        f"{k}={v}" for k, v in config.items()
        if isinstance(v, int) and not isinstance(v, bool) and k not in ("num_warps", "num_stages")
    ]  # fmt: skip
    if "num_warps" in config:
        parts.append(f"w{config['num_warps']}")
    if "num_stages" in config:
        parts.append(f"s{config['num_stages']}")
    return " ".join(parts)


def _format_row(row: Row) -> str:
    values = (
        row.kernel, row.op, row.direction[:3], row.variant, row.dtype, f"sm_{row.arch}",
        _config_text(row.config), row.registers, row.shared, row.stack, row.hgmma, row.hmma,
        row.spill_instructions,
    )  # fmt: skip
    text = " ".join(f"{str(v):<{w}}" for v, (_, w) in zip(values, _COLUMNS, strict=True))
    if row.violations:
        text += "  !! " + "; ".join(row.violations)
    return text.rstrip()


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width text table, violations at the end of their line."""
    header = " ".join(f"{name:<{w}}" for name, w in _COLUMNS).rstrip()
    return "\n".join([header, "-" * len(header), *(_format_row(r) for r in rows)])


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """Counts and the kernels behind each kind of violation."""

    found = {id(r): find_violations(r) for r in rows}  # the rules, not a stored copy

    def names(pred: Callable[[Row], bool]) -> list[str]:
        return sorted({f"{r.kernel} {r.dtype} sm_{r.arch}" for r in rows if pred(r)})

    def broke(rule: str) -> Callable[[Row], bool]:
        return lambda r: any(rule in v for v in found[id(r)])

    return {
        "variants": len(rows),
        "compile_errors": names(lambda r: r.error is not None),
        "spilling": names(lambda r: r.spill_instructions > 0),
        "over_shared_limit": names(broke("shared memory")),
        "dot_16bit_without_tensor_cores": names(broke("16-bit tl.dot without")),
        "with_hgmma": names(lambda r: r.hgmma > 0),
        "with_hmma": names(lambda r: r.hmma > 0),
        "violations": sum(len(v) for v in found.values()),
    }


def write_json(
    path: str | Path, rows: Sequence[Row], elapsed_s: float, missing: Sequence[str] = ()
) -> None:
    """Rows, summary and the toolchain they came from, as JSON."""
    import triton  # optional dependency: triton

    doc = {
        "tool": "python -m fastsae.kernels.check",
        "note": "compile-only: cubins built for each target on a machine without a GPU",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "shapes": {
            "rows": ROWS,
            "d_in": D_IN,
            "d_sae": D_SAE,
            "topk_k": list(TOPK_KS),
            "code_k": CODE_K,
        },  # fmt: skip
        "shared_limit_bytes": {f"sm_{a}": v for a, v in SHARED_LIMIT.items()},
        "elapsed_s": round(elapsed_s, 1),
        "summary": {**summarize(rows), "kernels_without_case": list(missing)},
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _csv(values: Sequence[str]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastsae.kernels.check",
        description="Compile every fastsae Triton kernel for sm_80/sm_90 without a GPU and "
        "report registers, shared memory, stack, spills and tensor-core instructions.",
    )
    parser.add_argument("--arch", action="append", default=[], help="80, 90 or both (default)")
    parser.add_argument(
        "--dtype", action="append", default=[], help="fp32, fp16, bf16 (default all)"
    )
    parser.add_argument(
        "--kernel", action="append", default=[], help="substring of a kernel or op name to keep"
    )
    parser.add_argument("--json", metavar="PATH", help="write the rows and summary as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any violation")
    parser.add_argument("--quiet", action="store_true", help="no per-kernel progress on stderr")
    args = parser.parse_args(argv)
    try:
        archs = [int(a.removeprefix("sm_")) for a in _csv(args.arch)] or list(ARCHS)
    except ValueError:
        parser.error(f"--arch takes 80 and/or 90, got {args.arch}")
    dtypes = _csv(args.dtype) or list(DTYPE_NAMES)
    for bad in [a for a in archs if a not in SHARED_LIMIT] + [
        d for d in dtypes if d not in DTYPE_NAMES
    ]:
        parser.error(f"unknown --arch/--dtype {bad!r}: choose from {ARCHS} and {DTYPE_NAMES}")
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: this check compiles for a GPU target; unset it")
    if find_cuobjdump() is None:
        parser.error("cuobjdump not found (triton's wheel ships it; or set FASTSAE_CUOBJDUMP)")
    progress = None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True)
    start = time.perf_counter()
    rows = check(archs, dtypes, _csv(args.kernel), progress=progress)
    elapsed = time.perf_counter() - start
    if not rows:
        print(f"no kernel matches --kernel {args.kernel}", file=sys.stderr)
        return 2
    print(format_table(rows))
    summary = summarize(rows)
    print(f"\n{summary['variants']} variants compiled in {elapsed:.0f} s; "
          f"{summary['violations']} violations")  # fmt: skip
    for key in (
        "compile_errors",
        "spilling",
        "over_shared_limit",
        "dot_16bit_without_tensor_cores",
    ):
        if summary[key]:
            print(f"{key}: {', '.join(summary[key])}")
    # with --kernel the selection is partial on purpose
    missing = [] if args.kernel else kernels_without_case(dtypes)
    if missing:
        print(f"kernels without a case in fastsae.kernels.check.build_cases: {', '.join(missing)}")
    if args.json:
        write_json(args.json, rows, elapsed, missing)
    if summary["compile_errors"]:
        return 1
    return 1 if args.strict and (summary["violations"] or missing) else 0


if __name__ == "__main__":
    raise SystemExit(main())
