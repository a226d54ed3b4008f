"""The compile-only kernel check (``python -m fastsae.kernels.check``): its cuobjdump parsers
on fixed text, its violation rules on synthetic rows, its exit status, and one real compile
for sm_90 on this CPU-only machine.

Not under tests/kernels: that lane sets TRITON_INTERPRET=1, under which ``@triton.jit``
makes interpreter functions that cannot be compiled for a GPU target.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from fastsae.kernels import check

INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

needs_compiler = pytest.mark.skipif(
    not HAS_TRITON or INTERPRET or check.find_cuobjdump() is None,
    reason="needs triton with its cuobjdump, and TRITON_INTERPRET unset",
)

# cuobjdump 12.x output, trimmed from real runs on cubins of this project
RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _topk_filter_kernel:
  REG:255 STACK:208 SHARED:0 LOCAL:0 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
\tcode for sm_90a
\t.target\tsm_90a

\t\tFunction : _jumprelu_dense_kernel
\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;              /* 0x00000a00ff017b82 */
                                                                       /* 0x000fe20000000800 */
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0020*/              @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   STL.64 [R1+0x8], R6 ;
        /*0040*/               @P1 LDL.LU R9, [R1+0x4] ;
        /*0050*/                   HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
"""


def test_parse_res_usage_reads_registers_stack_and_shared():
    usage = check.parse_res_usage(RES_USAGE)
    assert usage == {
        "_topk_filter_kernel": {
            "REG": 255, "STACK": 208, "SHARED": 0, "LOCAL": 0, "CONSTANT[0]": 560,
            "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0,
        }
    }  # fmt: skip


def test_count_sass_counts_opcodes_with_predicates_and_modifiers():
    counts = check.count_sass(SASS)["_jumprelu_dense_kernel"]
    assert counts["HGMMA"] == 1
    assert counts["HMMA"] == 2  # one of them predicated (@!P0)
    assert counts["STL"] == 1 and counts["LDL"] == 1  # LDL.LU under @P1
    assert counts["LDC"] == 1 and counts["EXIT"] == 1 and counts["BRA"] == 1
    # the encoding lines (/* 0x... */ alone) are not instructions
    assert sum(counts.values()) == 8


def _row(**fields) -> check.Row:
    base = dict(
        kernel="k", op="op", direction="forward", variant="v", dtype="bf16", arch=90,
        config={}, registers=64, shared=1024, stack=0, hgmma=4, hmma=0, uses_dot=True,
    )  # fmt: skip
    return check.Row(**{**base, **fields})


def test_violations_on_synthetic_rows():
    assert check.find_violations(_row()) == []
    assert "spills" in check.find_violations(_row(spill_instructions=3, stack=16))[0]
    assert "over the sm_90 limit" in check.find_violations(_row(shared=227 * 1024 + 1))[0]
    assert check.find_violations(_row(shared=227 * 1024)) == []
    # on sm_80 the limit is 163 KB
    assert (
        "over the sm_80 limit"
        in check.find_violations(_row(arch=80, hgmma=0, hmma=4, shared=200 * 1024))[0]
    )
    # a 16-bit dot on sm_90 needs HGMMA; HMMA alone (mma.sync) is not enough
    assert "without HGMMA" in check.find_violations(_row(hgmma=0, hmma=8))[0]
    # on sm_80 HMMA is the tensor-core instruction
    assert check.find_violations(_row(arch=80, hgmma=0, hmma=8)) == []
    assert "without HMMA" in check.find_violations(_row(arch=80, hgmma=0, hmma=0))[0]
    # fp32 dots (IEEE on CUDA cores) and kernels without a dot need no tensor cores
    assert check.find_violations(_row(dtype="fp32", hgmma=0)) == []
    assert check.find_violations(_row(uses_dot=False, hgmma=0)) == []
    assert check.find_violations(_row(error="CompilationError: boom\nat line 3")) == [
        "compile error: CompilationError: boom"
    ]


def _main(monkeypatch, rows, *argv, missing=()) -> int:
    monkeypatch.setattr(check, "check", lambda *a, **k: rows)
    monkeypatch.setattr(check, "kernels_without_case", lambda *a: list(missing))
    monkeypatch.setattr(check, "find_cuobjdump", lambda: "cuobjdump")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with contextlib.redirect_stdout(io.StringIO()):
        return check.main(["--quiet", *argv])


def test_exit_status_strict_and_not(monkeypatch):
    spill = _row(spill_instructions=2)
    assert _main(monkeypatch, [_row()], "--strict") == 0
    assert _main(monkeypatch, [spill]) == 0  # reported, not failed
    assert _main(monkeypatch, [spill], "--strict") == 1
    broken = _row(error="CompilationError: boom")
    assert _main(monkeypatch, [broken]) == 1  # a compile error always fails
    assert _main(monkeypatch, []) == 2  # a --kernel filter that matches nothing
    # a kernel that no case launches is a gap in the check itself
    assert _main(monkeypatch, [_row()], missing=["_new_kernel"]) == 0
    assert _main(monkeypatch, [_row()], "--strict", missing=["_new_kernel"]) == 1


@needs_compiler
def test_every_kernel_of_the_package_has_a_case():
    """Each module-level ``*_kernel`` in fastsae/kernels is launched by some case, so a
    new kernel cannot slip past the compile check."""
    assert check.kernels_without_case() == []


@needs_compiler
def test_recording_gives_the_launchers_gpu_parameters_without_launching():
    """Every case reaches a kernel with its own dtype; the top-k op makes two launches (the
    autotuned GEMM filter with SLOTS >= k, then the exact select), and the launchers took
    their CUDA branch (no UPCAST_DOT)."""
    import torch

    cases = check.build_cases(["fp16", "bf16"])
    assert {c.op for c in cases} >= {"topk_encode", "jumprelu_encode", "sparse_decode"}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    for case in cases:
        launches = check.record_case(case)
        assert launches, f"{case.op} {case.variant} recorded no launch"
        # each case launches on tensors of its own dtype (not another case's)
        arg_dtypes = {a.dtype for ln in launches for a in ln.args if isinstance(a, torch.Tensor)}
        assert dtypes[case.dtype] in arg_dtypes, (case.dtype, case.op, case.variant, arg_dtypes)
        # shape-only tensors: nothing was allocated, so nothing could have been launched
        assert all(a.is_meta for ln in launches for a in ln.args if isinstance(a, torch.Tensor))
        if case.op == "topk_encode":
            assert [check.kernel_name(ln.fn) for ln in launches] == [
                "_topk_filter_kernel",
                "_topk_select_kernel",
            ]
            k = int(case.variant.split()[0].removeprefix("k="))
            assert launches[0].kwargs["SLOTS"] >= k and launches[0].kwargs["BLOCK_N"] == 128
            assert len(launches[0].fn.configs) >= 2  # an autotune list
            assert all(c.kwargs["BLOCK_M"] >= 64 for c in launches[0].fn.configs)
            assert launches[0].kwargs["UPCAST_DOT"] is False


@needs_compiler
def test_fp32_dots_follow_torchs_matmul_precision():
    """IEEE fp32 under "highest" (torch's default), TF32 under "high", as cuBLAS does."""
    import torch

    case = next(c for c in check.build_cases(["fp32"]) if c.variant == "k=64")
    tf32 = next(c for c in check.build_cases(["fp32"]) if c.variant == "k=64 tf32")
    assert torch.get_float32_matmul_precision() == "highest"
    assert check.record_case(case)[0].kwargs["IEEE"] is True
    assert check.record_case(tf32)[0].kwargs["IEEE"] is False
    assert torch.get_float32_matmul_precision() == "highest"  # restored


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One real run: the JumpReLU encoders, bf16, sm_90 (a few seconds)."""
    path = tmp_path_factory.mktemp("check") / "out.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = check.main(
            ["--arch", "90", "--dtype", "bf16", "--kernel", "jumprelu_encode", "--quiet",
             "--json", str(path)]
        )  # fmt: skip
    return status, out.getvalue(), json.loads(path.read_text())


@needs_compiler
def test_a_real_compile_for_sm90_has_sane_resources(compiled):
    status, table, doc = compiled
    assert status == 0  # non-strict: violations are reported, not failed
    rows = doc["rows"]
    assert {r["kernel"] for r in rows} == {
        "_jumprelu_dense_kernel",
        "_jumprelu_sparse_kernel",
        "_jumprelu_pack_kernel",
    }
    for r in rows:
        assert r["arch"] == 90 and r["dtype"] == "bf16" and r["error"] is None
        assert 0 < r["registers"] <= 255
        assert r["shared"] <= check.SHARED_LIMIT[90]
        if r["kernel"] == "_jumprelu_pack_kernel":
            assert r["uses_dot"] is False
            continue
        assert r["shared"] > 0
        assert r["uses_dot"] is True
        assert r["hgmma"] > 0 and r["spill_instructions"] == 0  # wgmma, no spills
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= set(r["config"])
        assert r["config"]["BLOCK_M"] >= 64 and r["config"]["BLOCK_N"] >= 128
        assert r["config"]["num_warps"] >= 1
        assert r["violations"] == check.find_violations(check.Row(**r))
        assert r["kernel"] in table
    assert doc["summary"]["variants"] == len(rows)
    assert doc["triton"] and "compile-only" in doc["note"]


def _autotuned_toy_kernel():
    """A two-configuration autotuned copy kernel, defined only when triton imports."""
    import triton
    import triton.language as tl

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK": 64}, num_warps=2, num_stages=2),
            triton.Config({"BLOCK": 256}, num_warps=8, num_stages=3),
        ],
        key=["n"],
    )
    @triton.jit
    def _toy_copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)

    return _toy_copy_kernel


@needs_compiler
def test_every_autotune_configuration_is_compiled():
    """A launch through ``triton.autotune`` is recorded without benchmarking, then compiled
    once per configuration, each row with that configuration's blocks and warps."""
    import torch

    kernel = _autotuned_toy_kernel()
    src = torch.empty(1000, device="meta")
    dst = torch.empty(1000, device="meta")
    case = check.Case("toy", "forward", "copy", "fp32", lambda: kernel[(4,)](src, dst, 1000))
    launches = check.record_case(case)
    assert len(launches) == 1 and check.kernel_name(launches[0].fn) == "_toy_copy_kernel"
    rows = check.compile_rows([(case, launches[0])], archs=[80])
    assert [(r.config["BLOCK"], r.config["num_warps"], r.config["num_stages"]) for r in rows] == [
        (64, 2, 2),
        (256, 8, 3),
    ]
    assert all(r.error is None and r.registers > 0 and r.arch == 80 for r in rows)
    assert not any(r.uses_dot for r in rows)
