"""``fastsae bench``: the engine end to end at the --quick shapes on CPU, and its parts."""

import json
import os

import pytest
import torch

from fastsae import bench
from fastsae.bench import cases as bench_cases
from fastsae.bench import numerics as bench_check
from fastsae.cli import main

CPU_PROVIDERS = ("fastsae-torch", "sae_lens", "dense-torch")


def test_bench_quick_cpu_writes_table_json_and_png(tmp_path, capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| arch | d_in x d_sae | B | dtype | op | provider | ms |" in printed
    assert "skipped: fastsae-triton: needs a CUDA device" in printed or torch.cuda.is_available()
    assert "## Target ratios (CPU, fastsae-torch)" in printed

    (json_path,) = tmp_path.glob("bench-*.json")
    assert json_path.with_suffix(".png").stat().st_size > 10_000
    data = json.loads(json_path.read_text())
    meta = data["meta"]
    assert meta["device_kind"] == "cpu" and meta["command"].startswith("fastsae bench")
    assert set(meta["versions"]) >= {"fastsae", "torch", "triton", "sae_lens"}
    assert data["skipped"] == [
        {"provider": "fastsae-triton", "reason": bench_cases.skip_reason("fastsae-triton", "cpu")}
    ]

    rows = data["rows"]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    got = {(r["arch"], r["op"], r["provider"]) for r in rows}
    for arch in bench_cases.ARCHS:
        for op in bench_cases.OPS:
            for provider in CPU_PROVIDERS:
                assert (arch, op, provider) in got
    assert ("-", "matmul", "torch") in got and ("-", "copy", "torch") in got
    for r in rows:
        assert r["peak_mem_mb"] is None  # no memory figure on CPU
        if r["op"] in bench_cases.OPS:
            assert 0 <= r["rel_err"] <= 1e-5 and r["frac_peak"] > 0
        if r["op"] == "decode":
            assert r["gbps"] > 0 and r["tflops"] is None
        elif r["op"] != "copy":
            assert r["tflops"] > 0
    l0 = [r["k"] for r in rows if r["arch"] == "jumprelu"]
    assert all(8 <= v <= 48 for v in l0)  # thresholds calibrated to a mean L0 of 1.5k = 24
    ratios = {t["ratio"] for t in data["targets"]}
    assert "CPU: TopKSAE.forward sae_lens / fastsae" in ratios


def test_bench_rejects_bad_flags(capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--shapes", "12by34"]) == 2
    assert "--shapes" in capsys.readouterr().err
    assert main(["bench", "--quick", "--device", "cpu", "--ops", "encode,train"]) == 2


def test_plan_defaults_per_device():
    parser_args = dict(device="cpu", dtype=None, shapes=None, batch=None, ops=None,
                       providers=None, arch=None, k=None, repeats=None, quick=False)  # fmt: skip
    args = type("Args", (), parser_args)
    plan = bench.make_plan(args)
    assert {(c.d_in, c.d_sae, c.batch, c.dtype) for c in plan.configs} == {
        (768, 24576, 2048, torch.float32)
    }
    assert any("CPU" in note for note in plan.notes)
    args.dtype, args.shapes, args.batch = ["fp32,bf16"], ["100x1000"], ["3", "5"]
    plan = bench.make_plan(args)
    assert len(plan.configs) == 2 * 2 * 2  # archs x batches x dtypes


def test_check_tolerates_near_ties_but_not_wrong_selections():
    """A selection that differs from the float32 top-k only at a near-tie passes; a latent
    far from the boundary does not."""
    cfg = bench_cases.Config("topk", 16, 256, 8, torch.float32, "cpu", k=4)
    prob = bench_cases.Problem(cfg)
    x = prob.xs[0]
    p = prob.params
    with torch.no_grad():
        h = x @ p["W_enc"] + p["b_enc"]
        top = h.topk(cfg.k + 1, dim=-1)
        mask = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, top.indices[:, : cfg.k], True)
        assert bench_check._selection_diff(prob, h, mask) == 0.0
        # row 0: swap the k-th for the (k+1)-th after making them a near-tie
        h_tie = h.clone()
        h_tie[0, top.indices[0, cfg.k]] = top.values[0, cfg.k - 1] * (1 - 1e-6)
        swapped = mask.clone()
        swapped[0, top.indices[0, cfg.k - 1]] = False
        swapped[0, top.indices[0, cfg.k]] = True
        assert bench_check._selection_diff(prob, h_tie, swapped) == pytest.approx(1 / 8)
        wrong = mask.clone()
        wrong[0, top.indices[0, cfg.k - 1]] = False
        wrong[0, h[0].argmin()] = True
        with pytest.raises(bench_check.NumericsError, match="not a top-k"):
            bench_check._selection_diff(prob, h, wrong)


def test_provider_env_restores_the_variable(monkeypatch):
    monkeypatch.setenv("FASTSAE_DISABLE_TRITON", "0")
    with bench_cases.provider_env("fastsae-torch"):
        assert os.environ["FASTSAE_DISABLE_TRITON"] == "1"
    with bench_cases.provider_env("fastsae-triton"):
        assert "FASTSAE_DISABLE_TRITON" not in os.environ
    assert os.environ["FASTSAE_DISABLE_TRITON"] == "0"
