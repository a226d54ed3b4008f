"""jumprelu_encode (dense and compacted): Triton and torch against a float64 oracle.

Values and gradients are checked on the op's own active set; the active set must
match the float64 one except for latents within rounding of a threshold (or of 0),
where bf16/fp16 may legitimately decide differently.
"""

import pytest
import torch
from oracles import TOL, dense_code64, encoder_preacts64, jumprelu_active64, leaves64
from sae_testing import rel_err

from fastsae import ops


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparse", [False, True])
def test_jumprelu_encode(impl, dtype, sparse, device, batch_sizes, poison_outputs):
    d_in, d_sae = 100, 1000
    for batch in batch_sizes:
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, d_in, generator=g).to(device, dtype).requires_grad_()
        W_enc = (torch.randn(d_in, d_sae, generator=g) / 10).to(device, dtype).requires_grad_()
        b_enc = (0.1 * torch.randn(d_sae, generator=g)).to(device, dtype).requires_grad_()
        threshold = (1.5 * torch.rand(d_sae, generator=g)).to(device, dtype)
        out = ops.jumprelu_encode(x, W_enc, b_enc, threshold, sparse=sparse, impl=impl)
        if sparse:
            values, indices = out
            assert values.shape == indices.shape and indices.dtype == torch.int64
            counts = (values != 0).sum(-1)
            assert values.shape[1] == max(int(counts.max()), 1)
            dense = torch.zeros(batch, d_sae, dtype=values.dtype, device=device)
            dense = dense.scatter_add(1, indices, values)
        else:
            dense = out
            assert dense.shape == (batch, d_sae)
        assert not dense.isnan().any()

        x64, w64, b64 = leaves64(x, W_enc, b_enc)
        h = encoder_preacts64(x64, w64, b64)
        thr = threshold.double()
        active = dense != 0
        ref_active = jumprelu_active64(h, threshold)
        slack = TOL[dtype] * h.detach().abs().amax() * 4
        near = torch.minimum((h - thr).abs(), h.abs()) <= slack
        assert not (active ^ ref_active)[~near].any(), "active set differs away from a threshold"
        expected = torch.where(active, h, torch.zeros_like(h))
        tol = TOL[dtype]
        assert rel_err(dense, expected) < tol

        grad = torch.randn(batch, d_sae, dtype=torch.float64, device=device)
        (dense * grad.to(dense.dtype)).sum().backward()
        (expected * grad).sum().backward()
        for name, mine, theirs in [("x", x, x64), ("W_enc", W_enc, w64), ("b_enc", b_enc, b64)]:
            assert mine.grad is not None and not mine.grad.isnan().any(), name
            assert rel_err(mine.grad, theirs.grad) < tol, name


def test_jumprelu_sparse_overflowing_capacity(device):
    """Rows wider than the first buffer: the launcher reruns with room for every row."""
    from fastsae.kernels.jumprelu_encode import jumprelu_encode_sparse

    torch.manual_seed(4)
    x = torch.randn(21, 30, device=device)
    W_enc = torch.randn(30, 300, device=device)
    b_enc = torch.randn(300, device=device)
    threshold = torch.zeros(300, device=device)
    values, indices = jumprelu_encode_sparse(x, W_enc, b_enc, threshold, capacity=3)
    expected = encoder_preacts64(x, W_enc, b_enc).relu()
    assert values.shape[1] == int((expected > 0).sum(-1).max()) > 3
    assert rel_err(dense_code64(values, indices, 300), expected) < 1e-5


@pytest.mark.parametrize("splits", [2, 4])
def test_jumprelu_sparse_splits_pack_rows_in_latent_order(device, poison_outputs, splits):
    """Several latent splits, rows of very different widths (one row all inactive): each
    row's pairs are packed side by side, in latent order, padding value 0 / latent 0."""
    from fastsae.kernels.jumprelu_encode import jumprelu_encode_sparse

    torch.manual_seed(6)
    x = torch.randn(13, 20, device=device)
    x[3] = 0.0
    W_enc = torch.randn(20, 2100, device=device)
    b_enc = torch.zeros(2100, device=device)
    threshold = torch.rand(2100, device=device) * 3
    code = jumprelu_encode_sparse(x, W_enc, b_enc, threshold, capacity=8, splits=splits)
    h = encoder_preacts64(x, W_enc, b_enc)
    expected = torch.where(h > threshold.double(), h, 0.0).relu()
    counts = (expected > 0).sum(-1)
    assert code.values.shape[1] == int(counts.max())
    assert rel_err(dense_code64(code.values, code.indices, 2100), expected) < 1e-5
    for row in range(13):
        n = int(counts[row])
        assert (code.indices[row, :n].diff() > 0).all()
        assert (code.values[row, n:] == 0).all() and (code.indices[row, n:] == 0).all()
    assert int(counts[3]) == 0


def test_jumprelu_dense_many_tiles(device, poison_outputs):
    """Row and latent blocks in grouped order with ragged edges."""
    from fastsae.kernels.jumprelu_encode import jumprelu_encode_dense

    torch.manual_seed(8)
    x = torch.randn(150, 24, device=device)
    W_enc = torch.randn(24, 2500, device=device)
    b_enc = torch.randn(2500, device=device)
    threshold = torch.rand(2500, device=device)
    out = jumprelu_encode_dense(x, W_enc, b_enc, threshold)
    h = encoder_preacts64(x, W_enc, b_enc)
    assert rel_err(out, torch.where(h > threshold.double(), h, 0.0).relu()) < 1e-5
