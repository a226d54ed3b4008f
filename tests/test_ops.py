"""fastsae.ops on the torch path against float64 dense oracles written here."""

import pytest
import torch

from fastsae import SparseCode, ops, torch_ops

DTYPE_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def oracle_decode(values, indices, W_dec, b_dec):
    dense = torch.zeros(values.shape[0], W_dec.shape[0], dtype=torch.float64)
    dense.scatter_add_(1, indices.long(), values.double())
    return dense @ W_dec.double() + b_dec.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,k", [(1, 1), (333, 7), (33, 64)])
def test_sparse_decode_output_and_grads(dtype, batch, k):
    torch.manual_seed(batch * 100 + k)
    d_sae, d_out = 1000, 100
    values = torch.randn(batch, k, dtype=dtype, requires_grad=True)
    indices = torch.randint(0, d_sae, (batch, k))
    W_dec = torch.randn(d_sae, d_out, dtype=dtype, requires_grad=True)
    b_dec = torch.randn(d_out, dtype=dtype, requires_grad=True)
    out = ops.sparse_decode(SparseCode(values, indices.to(torch.int32)), W_dec, b_dec)
    assert out.shape == (batch, d_out) and out.dtype == dtype

    v64 = values.detach().double().requires_grad_()
    w64 = W_dec.detach().double().requires_grad_()
    b64 = b_dec.detach().double().requires_grad_()
    ref = oracle_decode(v64, indices, w64, b64)
    tol = DTYPE_TOL[dtype]
    assert rel_err(out, ref) < tol
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for mine, theirs in [(values, v64), (W_dec, w64), (b_dec, b64)]:
        assert rel_err(mine.grad, theirs.grad) < tol


def test_sparse_decode_repeated_indices_accumulate():
    W_dec = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    values = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[3, 3, 7]])
    out = ops.sparse_decode(SparseCode(values, indices), W_dec)
    assert torch.allclose(out[0], 3 * W_dec[3])
    out.sum().backward()
    assert torch.allclose(W_dec.grad[3], torch.full((4,), 3.0, dtype=torch.float64))
    assert torch.allclose(W_dec.grad[7], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("abs_select", [False, True])
@pytest.mark.parametrize("use_dec_norm", [False, True])
def test_topk_encode_matches_dense_oracle(abs_select, use_dec_norm):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 100)
    W_enc = torch.randn(100, 1000)
    b_enc = torch.randn(1000)
    dec_norm = torch.rand(1000) + 0.5 if use_dec_norm else None
    code = ops.topk_encode(x, W_enc, b_enc, 7, dec_norm=dec_norm, abs_select=abs_select)
    assert code.values.shape == (2, 5, 7) and code.indices.shape == (2, 5, 7)

    h = x.double() @ W_enc.double() + b_enc.double()
    if dec_norm is not None:
        h = h * dec_norm.double()
    key = h.abs() if abs_select else h
    idx = key.topk(7, dim=-1).indices
    expected = torch.zeros_like(h).scatter_(-1, idx, h.gather(-1, idx))
    if not abs_select:
        expected = expected.relu()
    assert rel_err(code.to_dense(1000), expected) < 1e-5


def test_jumprelu_encode_dense_and_padded_sparse():
    torch.manual_seed(2)
    x = torch.randn(333, 100)
    W_enc = torch.randn(100, 1000) * 0.1
    b_enc = torch.randn(1000) * 0.1
    threshold = torch.rand(1000) * 1.5
    dense = ops.jumprelu_encode(x, W_enc, b_enc, threshold)
    h = x.double() @ W_enc.double() + b_enc.double()
    expected = h.relu() * (h > threshold.double())
    assert dense.shape == (333, 1000)
    assert rel_err(dense, expected) < 1e-5

    code = ops.jumprelu_encode(x, W_enc, b_enc, threshold, sparse=True)
    max_active = int((expected != 0).sum(-1).max())
    assert code.values.shape == (333, max_active)
    # every row keeps all its active latents; the rest is zero padding
    assert torch.equal((code.values != 0).sum(-1), (dense != 0).sum(-1))
    assert rel_err(code.to_dense(1000), expected) < 1e-5


def test_bad_inputs_raise_clear_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    W_enc = torch.randn(10, 20)
    b_enc = torch.randn(20)
    with pytest.raises(ValueError, match="d_in=10"):
        ops.topk_encode(torch.randn(3, 11), W_enc, b_enc, 2)
    with pytest.raises(ValueError, match="k must be"):
        ops.topk_encode(torch.randn(3, 10), W_enc, b_enc, 21)
    with pytest.raises(ValueError, match="b_enc"):
        ops.topk_encode(torch.randn(3, 10), W_enc, torch.randn(19), 2)
    with pytest.raises(ValueError, match="threshold"):
        ops.jumprelu_encode(torch.randn(3, 10), W_enc, b_enc, torch.randn(3))
    with pytest.raises(ValueError, match="same shape"):
        ops.sparse_decode(
            SparseCode(torch.randn(3, 2), torch.zeros(3, 4, dtype=torch.long)), W_enc.T
        )
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.sparse_decode(SparseCode(torch.randn(3, 2), torch.zeros(3, 2)), W_enc.T)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.topk_encode(torch.randn(3, 10), W_enc, b_enc, 2, impl="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ops.topk_encode(torch.randn(3, 10), W_enc, b_enc, 2, impl="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ops.jumprelu_encode(torch.randn(3, 10), W_enc, b_enc, torch.zeros(20), impl="triton")


@pytest.mark.parametrize("nonnegative", [True, False])
def test_compact_keeps_every_nonzero_and_pads_with_zeros(nonnegative):
    from fastsae import torch_ops

    torch.manual_seed(3)
    acts = torch.randn(50, 1000)
    acts[acts.abs() < 2.0] = 0  # ~4.5% active: ~45 per row
    acts[7, :300] = torch.rand(300) + 0.1  # one wide row forces the width search to grow
    acts[11] = 0  # an empty row
    if nonnegative:
        acts = acts.abs()
    code = torch_ops.compact(acts, nonnegative=nonnegative)
    counts = (acts != 0).sum(-1)
    assert code.values.shape == (50, int(counts.max()))
    assert torch.equal((code.values != 0).sum(-1), counts)
    assert torch.equal(code.to_dense(1000), acts)
    assert torch_ops.compact(acts, nonnegative=nonnegative, max_k=100) is None


def test_ops_import_without_transformer_lens():
    """Kernel-only environments (a bare GPU box) need torch and triton, not transformer_lens."""
    import subprocess
    import sys

    code = (
        "import sys; import fastsae; from fastsae import ops, SparseCode; "
        "assert 'transformer_lens' not in sys.modules; "
        "from fastsae import TopKSAE; assert 'transformer_lens' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class _FakeCudaTensor:
    is_cuda = True
    device = "cuda:0"


def test_auto_dispatch_rules(monkeypatch):
    """auto: Triton on CUDA tensors unless FASTSAE_DISABLE_TRITON is set or there is no
    kernel; torch: never; triton: never falls back silently."""
    fake = (_FakeCudaTensor(), _FakeCudaTensor())
    monkeypatch.delenv("FASTSAE_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    assert ops._use_triton("op", "auto", fake, has_kernel=True)
    assert not ops._use_triton("op", "auto", fake, has_kernel=False)
    assert not ops._use_triton("op", "torch", fake, has_kernel=True)
    assert not ops._use_triton("op", "auto", (torch.zeros(1),), has_kernel=True)
    monkeypatch.setenv("FASTSAE_DISABLE_TRITON", "1")
    assert not ops._use_triton("op", "auto", fake, has_kernel=True)
    with pytest.raises(RuntimeError, match="FASTSAE_DISABLE_TRITON"):
        ops._use_triton("op", "triton", fake, has_kernel=True)  # explicit never falls back
    monkeypatch.setenv("FASTSAE_DISABLE_TRITON", "0")
    assert ops._use_triton("op", "auto", fake, has_kernel=True)
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert not ops._use_triton("op", "auto", fake, has_kernel=True)
    with pytest.raises(RuntimeError, match="not installed"):
        ops._use_triton("op", "triton", fake, has_kernel=True)


@pytest.mark.parametrize("abs_select", [False, True])
@pytest.mark.parametrize("use_dec_norm", [False, True])
@pytest.mark.parametrize("max_chunk_bytes", [1 << 30, 40 * 1000, 1])
def test_topk_select_chunked_matches_one_topk(abs_select, use_dec_norm, max_chunk_bytes):
    """The chunked selection (latents in chunks, candidates merged) picks what one
    top-k over all latents picks: one chunk, 17 uneven chunks of 59 latents at this
    budget and batch, and chunks of k latents (the smallest it uses)."""
    torch.manual_seed(2)
    x, W_enc, b_enc = torch.randn(40, 30), torch.randn(30, 1000), torch.randn(1000)
    dec_norm = torch.rand(1000) + 0.5 if use_dec_norm else None
    k = 9
    values, indices = torch_ops.topk_select_chunked(
        x, W_enc, b_enc, k, dec_norm, abs_select, max_chunk_bytes=max_chunk_bytes
    )
    ref = torch_ops.topk_encode(x, W_enc, b_enc, k, dec_norm=dec_norm, abs_select=abs_select)
    assert values.dtype == W_enc.dtype and indices.dtype == torch.int64
    assert torch.equal(indices.sort(-1).values, ref.indices.sort(-1).values)
    order, ref_order = indices.argsort(-1), ref.indices.argsort(-1)
    # values to rounding: a matmul over a slice of W_enc may block its sums differently
    assert rel_err(values.gather(-1, order), ref.values.gather(-1, ref_order)) < 1e-6


def test_topk_selection_rule(monkeypatch):
    """Untuned, every CUDA batch uses the chunked (cuBLAS) selection; FASTSAE_TOPK_SELECT
    overrides, and a bad value is named."""
    monkeypatch.delenv("FASTSAE_TOPK_SELECT", raising=False)
    assert ops.topk_selection(1) == "chunked"
    assert ops.topk_selection(10**6) == "chunked"
    monkeypatch.setenv("FASTSAE_TOPK_SELECT", "fused")
    assert ops.topk_selection(10**6) == "fused"
    monkeypatch.setenv("FASTSAE_TOPK_SELECT", "chunked")
    assert ops.topk_selection(1) == "chunked"
    monkeypatch.setenv("FASTSAE_TOPK_SELECT", "cublas")
    with pytest.raises(ValueError, match="FASTSAE_TOPK_SELECT"):
        ops.topk_selection(1)


@pytest.mark.parametrize("use_dec_norm", [False, True])
@pytest.mark.parametrize("max_chunk_bytes", [1 << 30, 24 * 40 * 70, 1])
def test_batch_topk_select_chunked_matches_dense(use_dec_norm, max_chunk_bytes):
    """BatchTopK's chunked selection picks what the dense reference picks (one chunk,
    15 chunks of 70 latents, chunks of one latent) and lays it out the same way."""
    torch.manual_seed(3)
    x, W_enc, b_enc = torch.randn(40, 30), torch.randn(30, 1000), torch.randn(1000) - 2
    dec_norm = torch.rand(1000) + 0.5 if use_dec_norm else None
    n_select = 7 * 40
    values, indices = torch_ops.batch_topk_select_chunked(
        x, W_enc, b_enc, n_select, dec_norm, max_chunk_bytes=max_chunk_bytes
    )
    ref = torch_ops.batch_topk_encode(x, W_enc, b_enc, n_select, dec_norm=dec_norm)
    assert torch.equal(indices, ref.indices)
    assert rel_err(values, ref.values) < 1e-6
    assert int((values > 0).sum()) == n_select  # every pick positive here: no padding picked


def test_batch_topk_encode_checks_and_empty_selection():
    x, W_enc, b_enc = torch.randn(4, 6), torch.randn(6, 10, requires_grad=True), torch.randn(10)
    with pytest.raises(ValueError, match="n_select"):
        ops.batch_topk_encode(x, W_enc, b_enc, 41)
    with pytest.raises(ValueError, match=r"x must be \[B, d_in\]"):
        ops.batch_topk_encode(x[None], W_enc, b_enc, 4)
    code = ops.batch_topk_encode(x, W_enc, b_enc, 0)
    assert code.values.shape == (4, 1) and not code.values.any()
    code.values.sum().backward()  # still attached to the graph, as SAELens's
    assert W_enc.grad is not None


def test_auto_pointed_at_triton_off_a_tunable_device_runs_the_kernels(monkeypatch):
    """Where a test points ``impl="auto"`` at the kernels on CPU tensors (the interpreter
    lane's fixture patches ``_use_triton``), auto takes the Triton kernels without timing:
    the fused TopK encoder (the chunked selection above its k limit), the JumpReLU and
    decode kernels; FASTSAE_TOPK_SELECT still forces a selection."""
    from fastsae import tuning

    def no_timer(name, fn):
        raise AssertionError(f"timed {name!r}")

    monkeypatch.delenv("FASTSAE_TOPK_SELECT", raising=False)
    monkeypatch.setattr(ops, "_use_triton", lambda op, impl, tensors, has_kernel: True)
    x, W_enc = torch.randn(3, 4), torch.randn(4, 2048)
    with tuning.use_tuner(tuning.Tuner(tuning.DecisionCache(None), no_timer)) as tuner:
        assert ops.topk_auto_path(x, W_enc, torch.zeros(2048), 8) == "fused"
        assert ops.topk_auto_path(x, W_enc, torch.zeros(2048), 1100) == "chunked"
        monkeypatch.setenv("FASTSAE_TOPK_SELECT", "chunked")
        assert ops.topk_auto_path(x, W_enc, torch.zeros(2048), 8) == "chunked"
    assert tuner.cache.memory == {}
