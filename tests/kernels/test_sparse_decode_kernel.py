"""sparse_decode: Triton and torch against a float64 dense oracle, outputs and gradients."""

import pytest
import torch
from oracles import TOL, leaves64, sparse_decode64
from sae_testing import rel_err

from fastsae import SparseCode, ops


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("w_dtype", ["same", "float32"])
def test_sparse_decode(impl, dtype, k, w_dtype, device, batch_sizes, poison_outputs):
    d_sae, d_out = 1000, 100
    W_dt = dtype if w_dtype == "same" else torch.float32
    for batch in batch_sizes:
        torch.manual_seed(batch * 131 + k)
        values = torch.randn(batch, k, device=device).to(dtype).requires_grad_()
        indices = torch.randint(0, d_sae, (batch, k), device=device, dtype=torch.int32)
        W_dec = (torch.randn(d_sae, d_out, device=device) / 10).to(W_dt).requires_grad_()
        b_dec = torch.randn(d_out, device=device).to(W_dt).requires_grad_()
        out = ops.sparse_decode(SparseCode(values, indices), W_dec, b_dec, impl=impl)
        assert out.dtype == torch.promote_types(dtype, W_dt)

        v64, w64, b64 = leaves64(values, W_dec, b_dec)
        ref = sparse_decode64(v64, indices, w64, b64)
        tol = TOL[dtype]
        assert not out.isnan().any()
        assert rel_err(out, ref) < tol

        grad = torch.randn_like(ref)
        out.backward(grad.to(out.dtype))
        ref.backward(grad)
        for name, mine, theirs in [
            ("values", values, v64),
            ("W_dec", W_dec, w64),
            ("b_dec", b_dec, b64),
        ]:
            assert mine.grad.dtype == mine.dtype, name
            assert not mine.grad.isnan().any(), name
            assert rel_err(mine.grad, theirs.grad) < tol, name


def test_sparse_decode_hot_latent_and_odd_width(device, poison_outputs):
    """Every token selects latent 5 (a hot spot for dW_dec) and d_out is not a power of 2."""
    torch.manual_seed(0)
    batch, k, d_sae, d_out = 40, 3, 50, 77
    indices = torch.randint(0, d_sae, (batch, k), device=device)
    indices[:, 0] = 5
    values = torch.randn(batch, k, device=device, requires_grad=True)
    W_dec = torch.randn(d_sae, d_out, device=device, requires_grad=True)
    out = ops.sparse_decode(SparseCode(values, indices), W_dec, impl="triton")
    out.square().sum().backward()
    v64, w64 = leaves64(values, W_dec)
    ref = sparse_decode64(v64, indices, w64)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-5
    assert rel_err(W_dec.grad, w64.grad) < 1e-5
    assert rel_err(values.grad, v64.grad) < 1e-5


def test_group_by_latent_skips_padding(device):
    """Padding pairs (keep=False) are sorted past the last latent and never summed."""
    from fastsae.kernels.sparse_backward import group_by_latent

    indices = torch.tensor([[3, 0, 0], [1, 3, 0]], device=device)
    keep = torch.tensor([[True, False, False], [True, True, False]], device=device)
    order, offsets = group_by_latent(indices, 5, keep=keep)
    assert offsets.tolist() == [0, 0, 1, 1, 3, 3]
    assert sorted(order[:3].tolist()) == [0, 3, 4]  # pair ids of the kept pairs


def test_gather_offsets_beyond_int32(device):
    """Rows of a decoder with d_sae * d_out > 2**31 elements (4.3 GB in bf16): the gather
    offsets must be computed in int64, or rows past 2**31 / d_out alias earlier ones."""
    from fastsae.kernels.sparse_backward import gather_dot
    from fastsae.kernels.sparse_decode import gather_weighted_sum

    d_out = 1024
    d_sae = 2**31 // d_out + 8
    W = torch.empty(d_sae, d_out, dtype=torch.bfloat16, device=device)
    rows = torch.tensor([[d_sae - 1, 5, d_sae - 3]], device=device)
    torch.manual_seed(0)
    W[rows[0]] = torch.randn(3, d_out, device=device).to(torch.bfloat16)
    values = torch.tensor([[1.0, -2.0, 0.5]], device=device)
    out = gather_weighted_sum(values, rows, W, out_dtype=torch.float32)
    ref = values.double() @ W[rows[0]].double()
    assert rel_err(out, ref) < 1e-5
    g = torch.randn(1, d_out, device=device)
    dots = gather_dot(g, rows, W, torch.float32)
    assert rel_err(dots, g.double() @ W[rows[0]].double().T) < 1e-5
    del W
