"""Pure-PyTorch implementation of every fastsae op.

This is the reference every Triton kernel is tested against and the path CPU
users run. It is written to be obviously right first; where a torch primitive
makes an op sparse for free (``embedding_bag``, ``index_add_``, ``gather``) it
uses it. It never imports Triton.

All ops take 2-D inputs (``[B, ...]``); ``fastsae.ops`` flattens leading
dimensions before calling them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsae.sparse_autograd import SparseBackend, TopKEncodeFunction
from fastsae.sparse_code import SparseCode

# Rows per chunk of the gather fallbacks: small, so the [chunk, K, d_out] buffer stays in
# cache
_BACKWARD_CHUNK_ROWS = 16
# rows whose non-zeros are counted to pick compact()'s first top-k width
_COMPACT_SAMPLE_ROWS = 64


def encoder_preacts(x: Tensor, W_enc: Tensor, b_enc: Tensor | None) -> Tensor:
    """``x @ W_enc + b_enc``: ``x [B, d_in]``, ``W_enc [d_in, d_sae]`` -> ``[B, d_sae]``.

    Written as SAELens writes it (matmul, then add) so that TopK selections agree
    bit for bit with sae-lens on the same weights.
    """
    h = x @ W_enc
    if b_enc is None:
        return h
    if b_enc.dtype == h.dtype:
        # in place: identical numbers to `h + b_enc`, without a second [B, d_sae] buffer
        # (the mm backward does not need its output, so autograd is unaffected)
        return h.add_(b_enc)
    return h + b_enc


def topk_select(h: Tensor, k: int, *, abs_select: bool = False) -> SparseCode:
    """Per-row top-k of ``h [B, N]``.

    ``abs_select=False``: the k largest values, ReLU applied (SAELens TopK).
    ``abs_select=True``: the k largest magnitudes, sign kept (SAELens AbsTopK).
    Returns values ``[B, k]`` (dtype of ``h``) and int64 indices ``[B, k]``.
    """
    if abs_select:
        indices = torch.topk(h.abs(), k, dim=-1, sorted=False).indices
        return SparseCode(h.gather(-1, indices), indices)
    values, indices = torch.topk(h, k, dim=-1, sorted=False)
    return SparseCode(values.relu(), indices)


# working memory of topk_select_chunked's pre-activation chunks (1 GiB: 0.11 of one
# weight matrix at d_sae 1M x d_in 2304 fp32)
TOPK_CHUNK_BYTES = 1 << 30


def _preact_chunks(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, dec_norm: Tensor | None, chunk: int
) -> Iterator[tuple[int, int, Tensor]]:
    """``(n0, n1, (x @ W_enc[:, n0:n1] + b_enc[n0:n1]) * dec_norm[n0:n1])`` for
    consecutive latent chunks; each pre-activation tensor is a fresh buffer."""
    N = W_enc.shape[1]
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        h = encoder_preacts(x, W_enc[:, n0:n1], b_enc[n0:n1])
        if dec_norm is not None:
            dn = dec_norm[n0:n1]
            h = h.mul_(dn) if h.dtype == dn.dtype else h * dn
        yield n0, n1, h


def topk_select_chunked(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dec_norm: Tensor | None = None,
    abs_select: bool = False,
    *,
    max_chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k of ``(x @ W_enc + b_enc) * dec_norm`` without a ``[B, d_sae]`` tensor, no grad.

    The latents go in chunks whose pre-activations take at most ``max_chunk_bytes``
    (``TOPK_CHUNK_BYTES`` by default; counting an fp32 and a half-precision copy);
    each chunk's top-k are candidates, merged at the end. The matmuls are ordinary
    ``x @ W_enc`` calls, so they follow autocast (bf16 tensor cores inside
    ``torch.autocast``) as SAELens's do, and the numbers are SAELens's: matmul, then
    bias, then the decoder-norm scale. Returns values (W_enc's dtype; ReLU applied
    unless ``abs_select``) and int64 indices ``[B, k]``, in no particular order.
    """
    B, N = x.shape[0], W_enc.shape[1]
    budget = TOPK_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    chunk = max(k, min(N, budget // (6 * max(B, 1))))
    cand_values, cand_indices = [], []
    with torch.no_grad():
        for n0, n1, h in _preact_chunks(x, W_enc, b_enc, dec_norm, chunk):
            # raw (signed, pre-ReLU) candidates: the merge must rank them as one topk would
            key = h.abs() if abs_select else h
            pick = torch.topk(key, min(k, n1 - n0), dim=-1, sorted=False).indices
            cand_values.append(h.gather(-1, pick))
            cand_indices.append(pick + n0)
        values, indices = cand_values[0], cand_indices[0]
        if len(cand_values) > 1:
            values, indices = torch.cat(cand_values, -1), torch.cat(cand_indices, -1)
            key = values.abs() if abs_select else values
            pick = torch.topk(key, k, dim=-1, sorted=False).indices
            values, indices = values.gather(-1, pick), indices.gather(-1, pick)
        if not abs_select:
            values = values.relu()
    return values.to(W_enc.dtype), indices


def padded_layout(picked: Tensor, n_tokens: int, n_cols: int) -> tuple[Tensor, Tensor, int]:
    """Where the picked entries of a flattened ``[n_tokens, n_cols]`` matrix go in a
    padded per-token code: ``(rows, slots, width)`` with ``width`` the most entries any
    token got (at least 1). ``picked``: sorted flat positions."""
    rows = picked // n_cols
    counts = torch.bincount(rows, minlength=n_tokens)
    width = max(int(counts.max()) if picked.numel() else 0, 1)
    slot = (
        torch.arange(picked.numel(), device=picked.device)
        - (torch.cumsum(counts, 0) - counts)[rows]
    )
    return rows, slot, width


def _padded_code(values: Tensor, picked: Tensor, n_tokens: int, n_cols: int) -> SparseCode:
    """Picked entries (``values``, sorted flat positions) as a padded ``[n_tokens, K]``
    code; padding has value 0 and index 0."""
    rows, slot, width = padded_layout(picked, n_tokens, n_cols)
    out = values.new_zeros(n_tokens, width).index_put((rows, slot), values)
    indices = torch.zeros(n_tokens, width, dtype=torch.long, device=values.device)
    indices[rows, slot] = picked % n_cols
    return SparseCode(out, indices)


def batch_topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, n_select: int, *, dec_norm: Tensor | None = None
) -> SparseCode:
    """BatchTopK (SAELens): the ``n_select`` largest of ``relu((x @ W_enc + b_enc) *
    dec_norm)`` over the whole batch ``x [B, d_in]``, as a padded code ``[B, K]`` (K = most
    latents any token got). Dense ``[B, d_sae]`` pre-activations; differentiable through
    autograd (the reference; ``ops.batch_topk_encode`` picks the sparse path on CUDA)."""
    h = x @ W_enc + b_enc
    acts = (h * dec_norm if dec_norm is not None else h).relu()
    n_tokens, d_sae = acts.shape
    flat = acts.reshape(-1)
    if n_select == 0:
        empty = torch.zeros(n_tokens, 1, dtype=acts.dtype, device=acts.device)
        return SparseCode(empty * flat[:1], torch.zeros_like(empty, dtype=torch.long))
    picked = torch.topk(flat, n_select, dim=-1, sorted=False).indices.sort().values
    return _padded_code(flat.index_select(0, picked), picked, n_tokens, d_sae)


def batch_topk_select_chunked(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    n_select: int,
    dec_norm: Tensor | None = None,
    abs_select: bool = False,
    *,
    max_chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``batch_topk_encode``'s selection without a ``[B, d_sae]`` tensor, no grad: latents
    in chunks (``TOPK_CHUNK_BYTES`` by default, counting torch.topk's sort of a flattened
    chunk), each chunk's ``n_select`` largest as candidates, merged. Same contract as
    ``topk_select_chunked`` (its ``k`` is ``n_select``): returns the padded code's values
    (W_enc's dtype) and int64 indices."""
    if abs_select:
        raise ValueError("batch_topk_select_chunked: BatchTopK has no abs_select")
    B, N = x.shape[0], W_enc.shape[1]
    budget = TOPK_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    chunk = max(1, min(N, budget // (24 * max(B, 1))))
    cand_values, cand_flat = [], []
    with torch.no_grad():
        for n0, n1, h in _preact_chunks(x, W_enc, b_enc, dec_norm, chunk):
            top = torch.topk(h.relu_().reshape(-1), min(n_select, h.numel()), sorted=False)
            rows = top.indices // (n1 - n0)
            cand_values.append(top.values)
            cand_flat.append(rows * N + (top.indices - rows * (n1 - n0)) + n0)
        values, flat = torch.cat(cand_values), torch.cat(cand_flat)
        if values.numel() > n_select:
            pick = torch.topk(values, n_select, sorted=False).indices
            values, flat = values[pick], flat[pick]
        flat, order = flat.sort()
        code = _padded_code(values[order], flat, B, N)
    return code.values.to(W_enc.dtype), code.indices


def topk_select_dense(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dec_norm: Tensor | None = None,
    abs_select: bool = False,
) -> SparseCode:
    """Top-k of ``(x @ W_enc + b_enc) * dec_norm`` through the dense ``[B, d_sae]``
    pre-activations, no grad: the torch path's selection (``topk_select`` of
    ``encoder_preacts``), with ``topk_select_chunked``'s contract."""
    with torch.no_grad():
        h = encoder_preacts(x, W_enc, b_enc)  # a fresh buffer: scaled in place
        if dec_norm is not None:
            h = h.mul_(dec_norm) if h.dtype == dec_norm.dtype else h * dec_norm
        return topk_select(h, k, abs_select=abs_select)


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    dec_norm: Tensor | None = None,
    abs_select: bool = False,
) -> SparseCode:
    """Top-k of ``(x @ W_enc + b_enc) * dec_norm`` per row, as SAELens's TopK.

    ``x [B, d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``dec_norm [d_sae]`` or None.
    Differentiable in x, W_enc, b_enc and dec_norm through a backward that only
    touches the selected pairs (no ``[B, d_sae]`` gradient): the TopK Function every
    path shares, with ``topk_select_dense`` and this module's primitives.
    """
    values, indices = TopKEncodeFunction.apply(
        x, W_enc, b_enc, dec_norm, k, abs_select, topk_select_dense, TORCH_BACKEND
    )
    return SparseCode(values, indices)


def _chunks(n_rows: int):
    for start in range(0, n_rows, _BACKWARD_CHUNK_ROWS):
        yield slice(start, start + _BACKWARD_CHUNK_ROWS)


def _embedding_bag_grads(
    G: Tensor, indices: Tensor, weights: Tensor, rows: Tensor, need_weights: bool, need_rows: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Both sparse products as the backward of ``embedding_bag(indices, rows, weights)``
    under the output gradient ``G [B, D]``: ``(gather_dot(G, indices, rows) [B, K],
    segment_rows_sum(weights, indices, G, N) [N, D])``, in fp32 or wider.

    torch's embedding_bag backward is a sorted segment sum, one pass for both products
    instead of the chunked gathers.
    """
    dtype = torch.promote_types(torch.promote_types(G.dtype, rows.dtype), torch.float32)
    dtype = torch.promote_types(dtype, weights.dtype)
    with torch.enable_grad():
        rows_l = rows.detach().to(dtype).requires_grad_(need_rows)
        weights_l = weights.detach().to(dtype).requires_grad_(need_weights)
        out = F.embedding_bag(indices.long(), rows_l, per_sample_weights=weights_l, mode="sum")
        wanted = [t for t, need in ((weights_l, need_weights), (rows_l, need_rows)) if need]
        grads = iter(torch.autograd.grad(out, wanted, G.to(dtype)))
    return (next(grads) if need_weights else None), (next(grads) if need_rows else None)


def _contiguous_rows(rows: Tensor) -> bool:
    return rows.stride(-1) == 1 and rows.stride(0) == rows.shape[-1]


def gather_dot(G: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
    """``out[b, j] = <G[b], rows[indices[b, j]]>``: ``G [B, D]``, ``rows [N, D]`` -> ``[B, K]``."""
    dtype = torch.promote_types(G.dtype, rows.dtype)
    if G.device.type == "cpu" and _contiguous_rows(rows) and indices.numel():
        d_w, _ = _embedding_bag_grads(
            G, indices, indices.new_zeros(indices.shape, dtype=dtype), rows, True, False
        )
        assert d_w is not None
        return d_w.to(dtype)
    out = torch.empty(indices.shape, dtype=dtype, device=G.device)
    for rs in _chunks(indices.shape[0]):
        gathered = rows[indices[rs]].to(dtype)  # [b, K, D]
        out[rs] = torch.bmm(gathered, G[rs].to(dtype).unsqueeze(-1)).squeeze(-1)
    return out


def gather_weighted_sum(weights: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
    """``out[b] = sum_j weights[b, j] * rows[indices[b, j]]``: -> ``[B, D]`` (any row strides).

    The sparse decode's primitive (the Triton launcher of the same name adds a bias)."""
    dtype = torch.promote_types(weights.dtype, rows.dtype)
    if _contiguous_rows(rows) and indices.numel() and rows.dtype == dtype:
        # embedding_bag is this op, in one kernel (the chunked loop below is the fallback)
        return F.embedding_bag(
            indices.long(), rows, per_sample_weights=weights.to(dtype), mode="sum"
        )
    out = torch.empty(indices.shape[0], rows.shape[1], dtype=dtype, device=rows.device)
    for rs in _chunks(indices.shape[0]):
        gathered = rows[indices[rs]].to(dtype)  # [b, K, D]
        out[rs] = torch.bmm(weights[rs].to(dtype).unsqueeze(1), gathered).squeeze(1)
    return out


def segment_rows_sum(weights: Tensor, indices: Tensor, X: Tensor, n_rows: int) -> Tensor:
    """``out[n] = sum over (b, j) with indices[b, j] == n of weights[b, j] * X[b]`` -> ``[n_rows, D]``.

    Accumulates in at least fp32: a popular latent sums thousands of rows, which bf16
    ``index_add_`` would round at every step.
    """
    dtype = torch.promote_types(torch.promote_types(weights.dtype, X.dtype), torch.float32)
    if X.device.type == "cpu" and indices.numel():
        # the rows' values do not enter the weight gradient: any [n_rows, D] tensor will do
        dummy = torch.zeros(1, X.shape[1], dtype=dtype, device=X.device).expand(n_rows, -1)
        _, out = _embedding_bag_grads(X, indices, weights, dummy, False, True)
        assert out is not None
        return out
    out = torch.zeros(n_rows, X.shape[1], dtype=dtype, device=X.device)
    for rs in _chunks(indices.shape[0]):
        contrib = weights[rs].to(dtype).unsqueeze(-1) * X[rs].to(dtype).unsqueeze(1)
        out.index_add_(0, indices[rs].reshape(-1), contrib.reshape(-1, X.shape[1]))
    return out


def compact(
    acts: Tensor, *, nonnegative: bool = False, max_k: int | None = None
) -> SparseCode | None:
    """Dense ``acts [B, N]`` -> padded SparseCode holding every non-zero.

    K is the largest number of non-zeros in any row (at least 1); entries past a
    row's own count are padding with value 0. ``nonnegative=True`` promises
    ``acts >= 0`` (ReLU-family codes) and skips the ``abs``. Returns None when K
    would exceed ``max_k``.

    Counting the non-zeros of every row of a [B, N] tensor costs more than a narrow
    top-k, so instead take a top-k of a width guessed from a few rows and double it
    until every row's smallest pick is zero or K reaches N.
    """
    n = acts.shape[-1]
    key = acts if nonnegative else acts.abs()
    # start from the widest of a few rows (cheap), so dense codes bail out at once
    sampled = int((acts[:_COMPACT_SAMPLE_ROWS] != 0).sum(-1).max()) if acts.numel() else 0
    if max_k is not None and sampled > max_k:
        return None
    k = min(n, max(64, 1 << max(sampled - 1, 0).bit_length()))
    while True:
        if max_k is not None and k > max_k:
            return None
        picked, indices = torch.topk(key, k, dim=-1, sorted=False)
        if k == n or acts.shape[0] == 0 or not bool((picked.amin(-1) > 0).any()):
            break
        k = min(n, 2 * k)
    # trim to the widest row: order the [B, k] picks by magnitude (cheap), keep the first K
    width = max(int((picked != 0).sum(-1).max()) if picked.numel() else 0, 1)
    if width < k:
        order = picked.argsort(dim=-1, descending=True)[:, :width]
        indices = indices.gather(-1, order)
    return SparseCode(acts.gather(-1, indices), indices)


def jumprelu(h: Tensor, threshold: Tensor) -> Tensor:
    """``relu(h) * (h > threshold)``, elementwise, dtype of ``h``."""
    return h.relu() * (h > threshold).to(h.dtype)


def jumprelu_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    *,
    sparse: bool = False,
) -> Tensor | SparseCode:
    """``relu(h) * (h > threshold)`` with ``h = x @ W_enc + b_enc``.

    Dense ``[B, d_sae]`` when ``sparse=False``; a padded SparseCode otherwise.
    """
    acts = jumprelu(encoder_preacts(x, W_enc, b_enc), threshold)
    return compact(acts, nonnegative=True) if sparse else acts


class _SparseDecode(torch.autograd.Function):
    """``out[b] = sum_j values[b, j] * W_dec[indices[b, j]]`` with a sparse backward.

    Forward is one ``embedding_bag`` (no [B, d_sae] tensor). Backward computes
    ``d_values[b, j] = <grad[b], W_dec[idx[b, j]]>`` and scatters
    ``values[b, j] * grad[b]`` into the rows of ``dW_dec`` with ``index_add_``,
    in row chunks so the gathered ``[rows, K, d_out]`` buffer stays bounded.
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec)
        compute_dtype = torch.promote_types(values.dtype, W_dec.dtype)
        return F.embedding_bag(
            indices,
            W_dec.to(compute_dtype),
            per_sample_weights=values.to(compute_dtype),
            mode="sum",
        )

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        values, indices, W_dec = ctx.saved_tensors
        need_values, _, need_w = ctx.needs_input_grad[:3]
        if grad_out.device.type == "cpu" and indices.numel() and _contiguous_rows(W_dec):
            d_values, d_w = _embedding_bag_grads(
                grad_out, indices, values, W_dec, need_values, need_w
            )
            return (
                d_values.to(values.dtype) if d_values is not None else None,
                None,
                d_w.to(W_dec.dtype) if d_w is not None else None,
            )
        d_values = gather_dot(grad_out, indices, W_dec).to(values.dtype) if need_values else None
        d_w = None
        if need_w:
            d_w = segment_rows_sum(values, indices, grad_out, W_dec.shape[0]).to(W_dec.dtype)
        return d_values, None, d_w


def sparse_decode(code: SparseCode, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """``sum_j values[b, j] * W_dec[indices[b, j]] (+ b_dec)``.

    ``values [B, K]``, ``indices [B, K]`` (int32/int64), ``W_dec [d_sae, d_out]``,
    ``b_dec [d_out]`` -> ``[B, d_out]`` in the promoted dtype of values and W_dec.
    """
    values, indices = code
    out = _SparseDecode.apply(values, indices.long(), W_dec)
    return out + b_dec if b_dec is not None else out


class TorchBackend(SparseBackend):
    """This module's primitives as a :class:`~fastsae.sparse_autograd.SparseBackend`
    (any device, no Triton)."""

    name = "torch"

    def gather_weighted_sum(self, weights, indices, rows, out_dtype):
        # a strided ``rows`` (``W_enc.T``) is copied to contiguous rows, which
        # embedding_bag gathers, instead of gathering strided columns
        return gather_weighted_sum(weights, indices, rows.contiguous()).to(out_dtype)

    def gather_dot(self, G, indices, rows, out_dtype):
        return gather_dot(G, indices, rows).to(out_dtype)

    def segment_rows_sum(self, weights, indices, X, n_rows, out_dtype, *, transposed=False):
        sums = segment_rows_sum(weights, indices, X, n_rows)
        return sums.T.to(out_dtype) if transposed else sums.to(out_dtype)


TORCH_BACKEND = TorchBackend()
