"""topk_encode: Triton (fused) and torch against a float64 dense oracle.

The oracle checks (1) the values at the op's own indices, (2) that those indices
are a valid top-k (no unselected key beats a selected one by more than rounding),
and (3) every gradient, computed densely in float64 over the op's selection. This
holds for bf16/fp16 too, where a near-tie at the k-th place may legitimately be
broken differently from float64.
"""

import pytest
import torch
from oracles import TOL, encoder_preacts64, leaves64
from sae_testing import rel_err

from fastsae import ops


def _inputs(batch, d_in, d_sae, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g).to(device, dtype)
    W_enc = (torch.randn(d_in, d_sae, generator=g) / d_in**0.5).to(device, dtype)
    b_enc = (0.1 * torch.randn(d_sae, generator=g)).to(device, dtype)
    dec_norm = (torch.rand(d_sae, generator=g) + 0.5).to(device, dtype)
    return [t.requires_grad_() for t in (x, W_enc, b_enc, dec_norm)]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("abs_select", [False, True])
@pytest.mark.parametrize("use_dec_norm", [False, True])
def test_topk_encode(impl, dtype, k, abs_select, use_dec_norm, device, batch_sizes, poison_outputs):
    d_in, d_sae = 100, 1000
    for batch in batch_sizes:
        x, W_enc, b_enc, dec_norm = _inputs(batch, d_in, d_sae, dtype, device, seed=batch + k)
        dn = dec_norm if use_dec_norm else None
        values, indices = ops.topk_encode(
            x, W_enc, b_enc, k, dec_norm=dn, abs_select=abs_select, impl=impl
        )
        assert values.shape == indices.shape == (batch, k)
        assert indices.dtype == torch.int64 and int(indices.min()) >= 0
        assert int(indices.max()) < d_sae and not values.isnan().any()
        # k distinct latents per row
        assert (indices.sort(-1).values.diff(dim=-1) != 0).all()

        x64, w64, b64, dn64 = leaves64(x, W_enc, b_enc, dec_norm)
        h = encoder_preacts64(x64, w64, b64, dn64 if use_dec_norm else None)
        key = h.abs() if abs_select else h
        chosen = torch.zeros_like(h, dtype=torch.bool).scatter_(1, indices, True)
        kth = key.masked_fill(~chosen, float("inf")).amin(-1)
        best_other = key.masked_fill(chosen, float("-inf")).amax(-1)
        slack = TOL[dtype] * key.abs().amax(-1) * 4
        assert (best_other <= kth + slack).all(), "selection is not a top-k"

        sel = h.gather(1, indices)
        expected = sel if abs_select else sel.relu()
        tol = TOL[dtype]
        assert rel_err(values, expected) < tol

        grad = torch.randn(batch, k, dtype=torch.float64, device=device)
        (values * grad.to(values.dtype)).sum().backward()
        (expected * grad).sum().backward()
        pairs = [("x", x, x64), ("W_enc", W_enc, w64), ("b_enc", b_enc, b64)]
        if use_dec_norm:
            pairs.append(("dec_norm", dec_norm, dn64))
        for name, mine, theirs in pairs:
            assert mine.grad is not None and mine.grad.shape == mine.shape, name
            assert not mine.grad.isnan().any(), name
            if theirs.grad.abs().sum() == 0:
                assert mine.grad.abs().sum() == 0, name
            else:
                assert rel_err(mine.grad, theirs.grad) < tol, name


def test_topk_encode_many_tiles_and_splits(device, poison_outputs):
    """d_sae spanning several tiles and chunk splits, with a non-power-of-2 k."""
    from fastsae.kernels.topk_encode import topk_encode

    x, W_enc, b_enc, _ = _inputs(9, 37, 2500, torch.float32, device, seed=5)
    for splits in (1, 4):
        values, indices = topk_encode(x.detach(), W_enc.detach(), b_enc.detach(), 13, splits=splits)
        h = encoder_preacts64(x.detach(), W_enc.detach(), b_enc.detach())
        ref_vals, ref_idx = h.topk(13, dim=-1)
        assert torch.equal(indices.sort(-1).values, ref_idx.sort(-1).values)
        assert rel_err(values.sort(-1).values, ref_vals.relu().sort(-1).values) < 1e-5


def test_topk_encode_weights_fp32_activations_bf16(device):
    """The common mixed case: bf16 activations into an fp32 SAE (cast to fp32, as SAELens)."""
    x, W_enc, b_enc, _ = _inputs(17, 100, 1000, torch.float32, device, seed=9)
    x_bf16 = x.detach().to(torch.bfloat16)
    mine = ops.topk_encode(x_bf16, W_enc.detach(), b_enc.detach(), 7, impl="triton")
    ref = ops.topk_encode(x_bf16.float(), W_enc.detach(), b_enc.detach(), 7, impl="torch")
    assert mine.values.dtype == torch.float32
    assert rel_err(mine.to_dense(1000), ref.to_dense(1000)) < 1e-5


def _dense_topk_sets(x, W_enc, b_enc, k):
    h = encoder_preacts64(x, W_enc, b_enc)
    return h, h.topk(k, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("capacity", [1, 5])
def test_topk_encode_candidate_overflow_is_exact(device, poison_outputs, capacity):
    """A candidate buffer far too small for the survivors: the overflowing rows run again
    with room for all of them, and the result is still the exact top-k."""
    from fastsae.kernels.topk_encode import topk_encode

    x, W_enc, b_enc, _ = _inputs(21, 40, 700, torch.float32, device, seed=11)
    x, W_enc, b_enc = x.detach(), W_enc.detach(), b_enc.detach()
    values, indices = topk_encode(x, W_enc, b_enc, 9, splits=2, capacity=capacity)
    h, ref = _dense_topk_sets(x, W_enc, b_enc, 9)
    assert torch.equal(indices.sort(-1).values, ref)
    assert rel_err(values, h.gather(1, indices).relu()) < 1e-5


def test_topk_encode_rising_latents(device, poison_outputs):
    """Pre-activations that rise along the latents, the worst order for the running bound
    (each new tile beats it), across two splits."""
    from fastsae.kernels.topk_encode import topk_encode

    n = 1500
    x = torch.ones(3, 2, device=device)
    W_enc = torch.zeros(2, n, device=device)
    W_enc[0] = torch.linspace(-1, 1, n, device=device)
    b_enc = torch.zeros(n, device=device)
    values, indices = topk_encode(x, W_enc, b_enc, 16, splits=2)
    expected = torch.arange(n - 16, n, device=device).expand(3, 16)
    assert torch.equal(indices.sort(-1).values, expected)
    assert rel_err(values.sort(-1).values, W_enc[0, n - 16 :].expand(3, 16)) < 1e-6


def test_topk_encode_all_ties_gives_k_distinct_latents(device, poison_outputs):
    """Every pre-activation equal: any k latents are a top-k, but exactly k distinct ones."""
    from fastsae.kernels.topk_encode import topk_encode

    x = torch.zeros(5, 8, device=device)
    W_enc = torch.randn(8, 600, device=device)
    b_enc = torch.full((600,), 0.5, device=device)
    for abs_select in (False, True):
        values, indices = topk_encode(x, W_enc, b_enc, 33, abs_select=abs_select, splits=4)
        assert (indices.sort(-1).values.diff(dim=-1) != 0).all()
        assert int(indices.min()) >= 0 and int(indices.max()) < 600
        assert torch.equal(values, torch.full_like(values, 0.5))


def test_topk_encode_refuses_k_above_the_fused_limit(device):
    from fastsae.kernels.topk_encode import MAX_K, topk_encode

    x = torch.zeros(2, 4, device=device)
    W_enc = torch.zeros(4, 4 * MAX_K, device=device)
    with pytest.raises(ValueError, match="k must be in"):
        topk_encode(x, W_enc, torch.zeros(4 * MAX_K, device=device), MAX_K + 1)


def test_topk_launch_plan_bounds_candidates():
    """GPU plans: 128-latent tiles, splits only while there are few row blocks, capacity
    under the chunk and a few times the expected survivors."""
    from fastsae.kernels.topk_encode import launch_plan

    small = launch_plan(256, 65536, 64, on_gpu=True)
    large = launch_plan(8192, 65536, 64, on_gpu=True)
    for plan in (small, large):
        assert plan["BLOCK_N"] == 128 and plan["SLOTS"] == 128
        assert plan["chunk"] % plan["BLOCK_N"] == 0
        assert plan["splits"] * plan["chunk"] >= 65536 > (plan["splits"] - 1) * plan["chunk"]
        assert 64 <= plan["cap"] <= plan["chunk"]
    assert small["splits"] > large["splits"]
    assert launch_plan(256, 65536, 32, on_gpu=True)["SLOTS"] == 64


@pytest.mark.parametrize("abs_select", [False, True])
def test_topk_select_in_chunks_matches_whole_rows(device, poison_outputs, monkeypatch, abs_select):
    """Rows with more candidates than one select chunk take the chunked select (32
    counting passes over the chunks); the result is the same exact top-k, ties included."""
    from fastsae.kernels import topk_encode as te

    x, W_enc, b_enc, _ = _inputs(19, 30, 900, torch.float32, device, seed=13)
    x, W_enc, b_enc = x.detach(), W_enc.detach(), b_enc.detach()
    b_enc[::7] = 2.0  # exact ties in every row, some at the k-th place
    whole = te.topk_encode(x, W_enc, b_enc, 24, abs_select=abs_select, splits=4)
    monkeypatch.setattr(te, "SELECT_MAX_BLOCK_W", 32)
    chunked = te.topk_encode(x, W_enc, b_enc, 24, abs_select=abs_select, splits=4)
    h = encoder_preacts64(x, W_enc, b_enc)
    key = h.abs() if abs_select else h
    for code in (whole, chunked):
        assert (code.indices.sort(-1).values.diff(dim=-1) != 0).all()
        kth = key.topk(24, dim=-1).values[:, -1:]
        assert (key.gather(1, code.indices) >= kth - 1e-6).all()
        expected = h.gather(1, code.indices)
        assert rel_err(code.values, expected if abs_select else expected.relu()) < 1e-5


def test_triton_topk_past_the_fused_limit_takes_the_chunked_selection(device):
    """``impl="triton"`` with k above the fused kernel's limit: the chunked cuBLAS selection
    (still no ``[B, d_sae]`` pre-activations kept, Triton backward), the same top-k."""
    from fastsae import tuning
    from fastsae.kernels.topk_encode import MAX_K

    assert ops.FUSED_TOPK_MAX_K == MAX_K
    x, W_enc, b_enc, _ = _inputs(6, 20, 400, torch.float32, device, seed=3)
    k = MAX_K + 20
    with tuning.record_paths() as paths:
        code = ops.topk_encode(x.detach(), W_enc.detach(), b_enc.detach(), k, impl="triton")
    assert paths == {"topk_encode": {"chunked"}}
    h = encoder_preacts64(x.detach(), W_enc.detach(), b_enc.detach())
    assert torch.equal(code.indices.sort(-1).values, h.topk(k, dim=-1).indices.sort(-1).values)
