"""Dispatch layer: one function per op, ``impl="auto" | "triton" | "torch"``.

``auto`` picks the Triton kernels when the tensors are on a CUDA device, Triton
imports and ``FASTSAE_DISABLE_TRITON`` is unset; otherwise the pure-torch path in
``fastsae.torch_ops``. ``FASTSAE_DISABLE_TRITON=1`` forces torch. ``impl="triton"``
never falls back silently: when Triton is disabled, missing, or cannot run on the
tensors it raises (CPU tensors are allowed under ``TRITON_INTERPRET=1``, for
tests). Leading batch dimensions are flattened here, so the implementations see
2-D inputs. ``topk_encode`` on CUDA picks its pairs with the fused kernel for small
batches and with chunked cuBLAS matmuls for large ones (``topk_selection``).
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

from fastsae import torch_ops
from fastsae.sparse_code import SparseCode

IMPLS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """Triton is importable (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_disabled() -> bool:
    """``FASTSAE_DISABLE_TRITON`` is set to something other than "" or "0"."""
    return os.environ.get("FASTSAE_DISABLE_TRITON", "") not in ("", "0")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


# topk_encode with impl="auto" on CUDA: the fused kernel (no [B, d_sae] tensor, one
# pass over W_enc per 16 rows, fp32 IEEE dots) for up to this many rows; above it,
# cuBLAS matmuls over latent chunks + torch.topk (tensor cores, autocast-aware) pick
# the pairs and the Triton sparse backward stays. A choice made on arithmetic, not
# yet on GPU timings (benchmarks/test_bench_train_step.py times both).
FUSED_TOPK_MAX_ROWS = 256
TOPK_SELECTIONS = ("auto", "fused", "chunked")


def topk_selection(n_rows: int) -> str:
    """``"fused"`` or ``"chunked"``: how ``topk_encode(impl="auto")`` picks a CUDA batch
    of ``n_rows`` rows (``FASTSAE_TOPK_SELECT=fused|chunked`` overrides)."""
    choice = os.environ.get("FASTSAE_TOPK_SELECT", "auto") or "auto"
    if choice not in TOPK_SELECTIONS:
        raise ValueError(f"FASTSAE_TOPK_SELECT must be one of {TOPK_SELECTIONS}, got {choice!r}")
    if choice != "auto":
        return choice
    return "fused" if n_rows <= FUSED_TOPK_MAX_ROWS else "chunked"


def auto_uses_triton(*tensors: Tensor | None) -> bool:
    """Whether ``impl="auto"`` runs a Triton kernel on these tensors."""
    return _use_triton("auto", "auto", tensors, has_kernel=True)


def _use_triton(op: str, impl: str, tensors: tuple[Tensor | None, ...], has_kernel: bool) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "auto":
        return has_kernel and on_cuda and triton_available() and not triton_disabled()
    # impl == "triton": explicit, so every reason it cannot run is an error
    if not has_kernel:
        raise NotImplementedError(f"{op}: no Triton kernel yet; use impl='torch' or 'auto'")
    if not triton_available():
        raise RuntimeError(f"{op}: impl='triton' but Triton is not installed (pip install triton)")
    if triton_disabled():
        raise RuntimeError(f"{op}: impl='triton' but FASTSAE_DISABLE_TRITON is set")
    if not on_cuda and not triton_interpret():
        devices = sorted({str(t.device) for t in tensors if t is not None})
        raise RuntimeError(
            f"{op}: impl='triton' needs CUDA tensors, got {devices} "
            "(set TRITON_INTERPRET=1 to run kernels on CPU for testing)"
        )
    return True


def _n_rows(x: Tensor) -> int:
    """Rows of ``x [..., d]`` once its leading dimensions are flattened."""
    return x.numel() // max(x.shape[-1], 1)


def _check_dec_norm(dec_norm: Tensor | None, W_enc: Tensor, op: str) -> None:
    if dec_norm is not None and tuple(dec_norm.shape) != (W_enc.shape[1],):
        raise ValueError(f"{op}: dec_norm must be [d_sae], got {tuple(dec_norm.shape)}")


def _check_encoder(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, op: str) -> None:
    if W_enc.ndim != 2:
        raise ValueError(f"{op}: W_enc must be [d_in, d_sae], got shape {tuple(W_enc.shape)}")
    if x.shape[-1] != W_enc.shape[0]:
        raise ValueError(
            f"{op}: x has last dimension {x.shape[-1]} but W_enc expects d_in={W_enc.shape[0]}"
        )
    if b_enc is not None and tuple(b_enc.shape) != (W_enc.shape[1],):
        raise ValueError(
            f"{op}: b_enc must be [d_sae]=[{W_enc.shape[1]}], got {tuple(b_enc.shape)}"
        )


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _unflat(code: SparseCode, lead: tuple[int, ...]) -> SparseCode:
    k = code.values.shape[-1]
    return SparseCode(code.values.reshape(*lead, k), code.indices.reshape(*lead, k))


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    dec_norm: Tensor | None = None,
    abs_select: bool = False,
    impl: str = "auto",
) -> SparseCode:
    """Top-k latents of ``(x @ W_enc + b_enc) * dec_norm``, exactly SAELens's TopK.

    ``x [..., d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``dec_norm [d_sae]``
    or None. ``abs_select=True`` ranks by magnitude and keeps the sign (AbsTopK);
    otherwise ReLU is applied to the selected values. Returns values and int64
    indices of shape ``[..., k]``.
    """
    _check_encoder(x, W_enc, b_enc, "topk_encode")
    if not 0 < k <= W_enc.shape[1]:
        raise ValueError(f"topk_encode: k must be in [1, d_sae={W_enc.shape[1]}], got {k}")
    _check_dec_norm(dec_norm, W_enc, "topk_encode")
    # the fused kernel keeps a running top-k in registers: k up to 1024; the chunked
    # selection (impl="auto" only) has no such limit
    chunked = impl == "auto" and topk_selection(_n_rows(x)) == "chunked"
    tensors = (x, W_enc, b_enc, dec_norm)
    if _use_triton("topk_encode", impl, tensors, has_kernel=k <= 1024 or chunked):
        from fastsae.kernels.autograd import TopKEncodeFunction

        select = torch_ops.topk_select_chunked if chunked else None
        code = SparseCode(
            *TopKEncodeFunction.apply(_flat(x), W_enc, b_enc, dec_norm, k, abs_select, select)
        )
    else:
        code = torch_ops.topk_encode(
            _flat(x), W_enc, b_enc, k, dec_norm=dec_norm, abs_select=abs_select
        )
    return _unflat(code, tuple(x.shape[:-1]))


def batch_topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    n_select: int,
    *,
    dec_norm: Tensor | None = None,
    impl: str = "auto",
) -> SparseCode:
    """BatchTopK: the ``n_select`` largest of ``relu((x @ W_enc + b_enc) * dec_norm)``
    over the whole batch ``x [B, d_in]`` (2-D: the batch is its rows), as a padded code
    ``[B, K]`` (K = most latents any token got; padding value 0, index 0).

    Triton path: chunked cuBLAS selection (``torch_ops.batch_topk_select_chunked``, no
    ``[B, d_sae]`` tensor) with the TopK kernels' sparse backward; torch path: the dense
    reference ``torch_ops.batch_topk_encode``.
    """
    _check_encoder(x, W_enc, b_enc, "batch_topk_encode")
    if x.ndim != 2:
        raise ValueError(f"batch_topk_encode: x must be [B, d_in], got {tuple(x.shape)}")
    if not 0 <= n_select <= x.shape[0] * W_enc.shape[1]:
        raise ValueError(
            f"batch_topk_encode: n_select must be in [0, B * d_sae = "
            f"{x.shape[0] * W_enc.shape[1]}], got {n_select}"
        )
    _check_dec_norm(dec_norm, W_enc, "batch_topk_encode")
    tensors = (x, W_enc, b_enc, dec_norm)
    if n_select > 0 and _use_triton("batch_topk_encode", impl, tensors, has_kernel=True):
        from fastsae.kernels.autograd import TopKEncodeFunction

        select = torch_ops.batch_topk_select_chunked
        return SparseCode(
            *TopKEncodeFunction.apply(x, W_enc, b_enc, dec_norm, n_select, False, select)
        )
    return torch_ops.batch_topk_encode(x, W_enc, b_enc, n_select, dec_norm=dec_norm)


def topk_encode_is_fused(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, k: int) -> bool:
    """Whether ``topk_encode(x, W_enc, b_enc, k)`` (``impl="auto"``) takes the Triton
    path on these tensors (the fused kernel, or the chunked selection for large
    batches): either way no ``[batch, d_sae]`` pre-activations are formed."""
    chunked = topk_selection(_n_rows(x)) == "chunked"
    return _use_triton("topk_encode", "auto", (x, W_enc, b_enc), has_kernel=k <= 1024 or chunked)


def jumprelu_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    *,
    sparse: bool = False,
    impl: str = "auto",
) -> Tensor | SparseCode:
    """``relu(h) * (h > threshold)`` with ``h = x @ W_enc + b_enc``.

    ``x [..., d_in]``; dense ``[..., d_sae]`` output when ``sparse=False``, a padded
    SparseCode (K = most active latents in any row, padding values 0) otherwise.
    """
    _check_encoder(x, W_enc, b_enc, "jumprelu_encode")
    if tuple(threshold.shape) != (W_enc.shape[1],):
        raise ValueError(
            f"jumprelu_encode: threshold must be [d_sae], got {tuple(threshold.shape)}"
        )
    if _use_triton("jumprelu_encode", impl, (x, W_enc, b_enc, threshold), has_kernel=True):
        from fastsae.kernels.autograd import JumpReLUEncodeFunction

        out = JumpReLUEncodeFunction.apply(_flat(x), W_enc, b_enc, threshold, sparse)
        out = SparseCode(*out) if sparse else out
    else:
        out = torch_ops.jumprelu_encode(_flat(x), W_enc, b_enc, threshold, sparse=sparse)
    lead = tuple(x.shape[:-1])
    if sparse:
        return _unflat(out, lead)
    return out.reshape(*lead, W_enc.shape[1])


def sparse_decode(
    code: SparseCode, W_dec: Tensor, b_dec: Tensor | None = None, *, impl: str = "auto"
) -> Tensor:
    """``sum_j values[..., j] * W_dec[indices[..., j]] (+ b_dec)`` -> ``[..., d_out]``.

    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``; output in the promoted dtype of values
    and W_dec; the Triton kernel accumulates in fp32. Differentiable in values,
    W_dec and b_dec with a sparse backward.
    """
    values, indices = code
    if values.shape != indices.shape:
        raise ValueError(
            f"sparse_decode: values {tuple(values.shape)} and indices "
            f"{tuple(indices.shape)} must have the same shape"
        )
    if indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise TypeError(f"sparse_decode: indices must be int32 or int64, got {indices.dtype}")
    if W_dec.ndim != 2:
        raise ValueError(f"sparse_decode: W_dec must be [d_sae, d_out], got {tuple(W_dec.shape)}")
    if b_dec is not None and tuple(b_dec.shape) != (W_dec.shape[1],):
        raise ValueError(f"sparse_decode: b_dec must be [d_out], got {tuple(b_dec.shape)}")
    lead = tuple(values.shape[:-1])
    k = values.shape[-1]
    flat = SparseCode(values.reshape(-1, k), indices.reshape(-1, k))
    if _use_triton("sparse_decode", impl, (values, indices, W_dec, b_dec), has_kernel=True):
        from fastsae.kernels.autograd import SparseDecodeFunction

        out = SparseDecodeFunction.apply(flat.values, flat.indices, W_dec, b_dec)
    else:
        out = torch_ops.sparse_decode(flat, W_dec, b_dec)
    return out.reshape(*lead, W_dec.shape[1])
