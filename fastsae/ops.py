"""Dispatch layer: one function per op, ``impl="auto" | "triton" | "torch"``.

``auto`` may take a Triton path when the tensors are on a CUDA device, Triton imports
and ``FASTSAE_DISABLE_TRITON`` is unset; otherwise (CPU tensors included) it takes the
pure-torch path in ``fastsae.torch_ops``, untimed. ``FASTSAE_DISABLE_TRITON=1`` forces
torch. ``impl="triton"`` never falls back silently: when Triton is disabled, missing, or cannot run on the
tensors it raises (CPU tensors are allowed under ``TRITON_INTERPRET=1``, for
tests). Leading batch dimensions are flattened here, so the implementations see
2-D inputs.

On CUDA, ``auto`` chooses among an op's paths by measurement (``fastsae.tuning``): the
first call for a (device, op, dtype, shape bucket) times them and caches the fastest.
The torch path is always a candidate, so ``auto`` is slower than it by at most the
measurement noise (and the bucket's spread).
The paths, and the default taken when tuning is off (``FASTSAE_TUNE=0``) or impossible
(inside a CUDA graph capture or a ``torch.compile`` trace, before a decision is cached):

- ``topk_encode``: ``"fused"`` (the fused Triton encoder, k <= 128), ``"chunked"`` (cuBLAS
  matmuls over latent chunks + ``torch.topk`` + the Triton sparse backward) and ``"torch"``
  (dense pre-activations). Default ``"chunked"``: its speed is cuBLAS's (tensor cores,
  autocast-aware), never far from SAELens's dense path, and it forms no ``[B, d_sae]``
  tensor, while the fused encoder has not been timed on any GPU yet.
  ``FASTSAE_TOPK_SELECT=fused|chunked`` forces a selection (no tuning).
- ``jumprelu_encode``: ``"triton"`` (fused encoder + threshold) and ``"torch"`` (a cuBLAS
  matmul + threshold, SAELens's own maths). Default ``"torch"``, for the same reason.
- ``sparse_decode``: ``"triton"`` and ``"torch"``. Default ``"triton"``: a gather bound by
  memory bandwidth, where the kernel reads each selected row once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastsae import torch_ops, tuning
from fastsae.sparse_autograd import TRITON_BACKEND, TopKEncodeFunction
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


TOPK_SELECTIONS = ("auto", "fused", "chunked")
TOPK_PATHS = ("fused", "chunked", "torch")
# the fused TopK kernel keeps a running top-k in registers: k up to this
# the fused kernel's k limit (fastsae.kernels.topk_encode.MAX_K; a test keeps them equal)
FUSED_TOPK_MAX_K = 128
# the untuned defaults (see the module docstring for why)
DEFAULT_PATHS = {"topk_encode": "chunked", "jumprelu_encode": "torch", "sparse_decode": "triton"}


def topk_selection_override() -> str | None:
    """``"fused"`` or ``"chunked"`` when ``FASTSAE_TOPK_SELECT`` forces one, else None."""
    choice = os.environ.get("FASTSAE_TOPK_SELECT", "auto") or "auto"
    if choice not in TOPK_SELECTIONS:
        raise ValueError(f"FASTSAE_TOPK_SELECT must be one of {TOPK_SELECTIONS}, got {choice!r}")
    return None if choice == "auto" else choice


def topk_selection(n_rows: int) -> str:
    """``"fused"`` or ``"chunked"``: the Triton selection ``topk_encode(impl="auto")`` takes
    on a CUDA batch of ``n_rows`` rows without a tuned decision (``FASTSAE_TOPK_SELECT``
    overrides; ``n_rows`` is kept for callers that ask per batch)."""
    return topk_selection_override() or DEFAULT_PATHS["topk_encode"]


def auto_uses_triton(*tensors: Tensor | None) -> bool:
    """Whether ``impl="auto"`` runs a Triton kernel on these tensors."""
    return _use_triton("auto", "auto", tensors, has_kernel=True)


def _use_triton(op: str, impl: str, tensors: tuple[Tensor | None, ...], has_kernel: bool) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "auto":
        # the active tuner says which devices count as CUDA (injectable for tests)
        on_device = tuning.active_tuner().device_name(tensors) is not None
        return has_kernel and on_device and triton_available() and not triton_disabled()
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
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


def _detached(*tensors: Tensor | None) -> tuple[Any, ...]:
    return tuple(t.detach() if t is not None else None for t in tensors)


# what _auto_target returns when Triton may run but not on a tunable device: only where a
# test points impl="auto" at the kernels on CPU tensors (the interpreter lane patches
# _use_triton); nothing can be timed there, so the Triton kernel itself runs
UNTUNABLE = "untunable"


def _auto_target(op: str, tensors: tuple[Tensor | None, ...]) -> str | None:
    """For ``impl="auto"``: None when the torch path must run (CPU tensors, Triton missing
    or disabled), without any timing; else the tunable device's name (or ``UNTUNABLE``)."""
    if not _use_triton(op, "auto", tensors, has_kernel=True):
        return None
    return tuning.active_tuner().device_name(tensors) or UNTUNABLE


def _choose(key: tuning.TuneKey, candidates: dict[str, Callable[[], Any]], default: str) -> str:
    return tuning.active_tuner().choose(key, candidates, default)


def _topk_run(
    path: str,
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dec_norm: Tensor | None,
    abs_select: bool,
) -> SparseCode:
    """One ``topk_encode`` path on 2-D ``x``."""
    if path == "torch":
        return torch_ops.topk_encode(x, W_enc, b_enc, k, dec_norm=dec_norm, abs_select=abs_select)
    if path == "chunked":
        select = torch_ops.topk_select_chunked
    else:
        # optional dependency: triton
        from fastsae.kernels.topk_encode import topk_encode as select
    values, indices = TopKEncodeFunction.apply(
        x, W_enc, b_enc, dec_norm, k, abs_select, select, TRITON_BACKEND
    )
    return SparseCode(values, indices)


def topk_auto_path(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    dec_norm: Tensor | None = None,
    abs_select: bool = False,
) -> str:
    """The path ``topk_encode(impl="auto")`` takes on these tensors (``TOPK_PATHS``),
    tuning it first when the key has no decision yet (``x`` is 2-D or batched)."""
    device = _auto_target("topk_encode", (x, W_enc, b_enc, dec_norm))
    if device is None:
        return "torch"
    forced = topk_selection_override()
    if forced is not None:
        # the fused kernel stops at FUSED_TOPK_MAX_K; past it the chunked selection
        return "chunked" if forced == "fused" and k > FUSED_TOPK_MAX_K else forced
    if device == UNTUNABLE:
        return "fused" if k <= FUSED_TOPK_MAX_K else "chunked"
    xf, W, b, dn = _detached(_flat(x), W_enc, b_enc, dec_norm)
    names = [p for p in TOPK_PATHS if p != "fused" or k <= FUSED_TOPK_MAX_K]
    candidates = {n: (lambda n=n: _topk_run(n, xf, W, b, k, dn, abs_select)) for n in names}
    key = tuning.TuneKey.make(
        device, "topk_encode", tuning.dtype_tag(x.dtype, W_enc.dtype), xf.shape[0],
        tuple(W_enc.shape), k,
    )  # fmt: skip
    return _choose(key, candidates, DEFAULT_PATHS["topk_encode"])


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
    if impl == "auto":
        path = topk_auto_path(x, W_enc, b_enc, k, dec_norm=dec_norm, abs_select=abs_select)
    else:
        tensors = (x, W_enc, b_enc, dec_norm)
        on_triton = _use_triton("topk_encode", impl, tensors, has_kernel=True)
        # past the fused kernel's k, the chunked cuBLAS selection (Triton backward)
        path = ("fused" if k <= FUSED_TOPK_MAX_K else "chunked") if on_triton else "torch"
    tuning.note_path("topk_encode", path)
    code = _topk_run(path, _flat(x), W_enc, b_enc, k, dec_norm, abs_select)
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
        tuning.note_path("batch_topk_encode", "chunked")
        select = torch_ops.batch_topk_select_chunked
        values, indices = TopKEncodeFunction.apply(
            x, W_enc, b_enc, dec_norm, n_select, False, select, TRITON_BACKEND
        )
        return SparseCode(values, indices)
    tuning.note_path("batch_topk_encode", "torch")
    return torch_ops.batch_topk_encode(x, W_enc, b_enc, n_select, dec_norm=dec_norm)


def topk_encode_is_fused(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, k: int) -> bool:
    """Whether ``topk_encode(x, W_enc, b_enc, k)`` (``impl="auto"``) may take a Triton path
    on these tensors (the fused kernel or the chunked selection, neither of which forms
    ``[batch, d_sae]`` pre-activations). Tuning may still pick the torch path for a shape
    where it measured faster; it returns the same code."""
    return _use_triton("topk_encode", "auto", (x, W_enc, b_enc), has_kernel=True)


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
    tensors = (x, W_enc, b_enc, threshold)
    if impl == "auto":
        path = "torch"
        device = _auto_target("jumprelu_encode", tensors)
        if device == UNTUNABLE:
            path = "triton"
        elif device is not None:
            xf, W, b, thr = _detached(_flat(x), W_enc, b_enc, threshold)
            candidates = {
                n: (lambda n=n: _jumprelu_run(n, xf, W, b, thr, sparse))
                for n in ("triton", "torch")
            }
            op = "jumprelu_encode:" + ("sparse" if sparse else "dense")
            dtype = tuning.dtype_tag(x.dtype, W_enc.dtype)
            key = tuning.TuneKey.make(device, op, dtype, xf.shape[0], tuple(W_enc.shape))
            path = _choose(key, candidates, DEFAULT_PATHS["jumprelu_encode"])
    else:
        path = "triton" if _use_triton("jumprelu_encode", impl, tensors, True) else "torch"
    tuning.note_path("jumprelu_encode", path)
    out = _jumprelu_run(path, _flat(x), W_enc, b_enc, threshold, sparse)
    lead = tuple(x.shape[:-1])
    if sparse:
        return _unflat(out, lead)
    return out.reshape(*lead, W_enc.shape[1])


def _jumprelu_run(
    path: str, x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, sparse: bool
) -> Tensor | SparseCode:
    """One ``jumprelu_encode`` path on 2-D ``x``."""
    if path == "torch":
        return torch_ops.jumprelu_encode(x, W_enc, b_enc, threshold, sparse=sparse)
    from fastsae.kernels.autograd import JumpReLUEncodeFunction  # optional dependency: triton

    out = JumpReLUEncodeFunction.apply(x, W_enc, b_enc, threshold, sparse)
    return SparseCode(*out) if sparse else out


def _decode_run(path: str, code: SparseCode, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """One ``sparse_decode`` path on a 2-D code."""
    if path == "torch":
        return torch_ops.sparse_decode(code, W_dec, b_dec)
    from fastsae.kernels.autograd import SparseDecodeFunction  # optional dependency: triton

    return SparseDecodeFunction.apply(code.values, code.indices, W_dec, b_dec)


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
    tensors = (values, indices, W_dec, b_dec)
    if impl == "auto":
        path = "torch"
        device = _auto_target("sparse_decode", tensors)
        if device == UNTUNABLE:
            path = "triton"
        elif device is not None:
            v, i, W, b = _detached(flat.values, flat.indices, W_dec, b_dec)
            candidates = {
                n: (lambda n=n: _decode_run(n, SparseCode(v, i), W, b)) for n in ("triton", "torch")
            }
            dtype = tuning.dtype_tag(values.dtype, W_dec.dtype)
            # a JumpReLU code's width follows the data: bucket it like the rows
            key = tuning.TuneKey.make(
                device, "sparse_decode", dtype, v.shape[0], tuple(W_dec.shape), tuning.bucket(k)
            )
            path = _choose(key, candidates, DEFAULT_PATHS["sparse_decode"])
    else:
        path = "triton" if _use_triton("sparse_decode", impl, tensors, has_kernel=True) else "torch"
    tuning.note_path("sparse_decode", path)
    out = _decode_run(path, flat, W_dec, b_dec)
    return out.reshape(*lead, W_dec.shape[1])


# ------------------------------------------------------------------------------ pre-tuning
@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One shape of ``fastsae tune``: encoder ``[d_in, d_sae]``, ``rows`` tokens, TopK's ``k``
    (JumpReLU thresholds aim at a mean L0 of ``1.5 * k``, as in ``fastsae bench``)."""

    d_in: int
    d_sae: int
    rows: int
    k: int
    dtype: torch.dtype


def pretune(point: GridPoint, device: str = "cuda") -> dict[str, set[str]]:
    """Tune ``topk_encode``, ``jumprelu_encode`` (sparse, as the modules call it) and
    ``sparse_decode`` at ``point`` (nothing is timed again for a cached key); returns the
    paths ``impl="auto"`` takes there, ``{op: {path}}``."""
    gen = torch.Generator(device=device).manual_seed(0)
    D, N, B = point.d_in, point.d_sae, point.rows

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(point.dtype)

    x = randn(B, D)
    W_enc, b_enc, W_dec = randn(D, N, scale=D**-0.5), randn(N, scale=0.1), randn(N, D)
    # h ~ N(0, ~1): a common threshold firing on a 1.5 k / N fraction of latents
    fire = min(1.0, 1.5 * point.k / N)
    threshold = torch.full((N,), float(torch.special.ndtri(torch.tensor(1 - fire))), device=device)
    threshold = threshold.to(point.dtype)
    with tuning.record_paths() as log, torch.no_grad():
        code = topk_encode(x, W_enc, b_enc, point.k)
        jumprelu_encode(x, W_enc, b_enc, threshold, sparse=True)
        sparse_decode(code, W_dec)
    return log
