"""The cases of ``fastsae bench``: problems (weights, inputs, modules), the four
providers' callables per op, and the timers. See ``fastsae.bench`` for the model."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

import fastsae
from fastsae import ops
from fastsae.sparse_code import SparseCode

PROVIDERS = ("fastsae-triton", "fastsae-torch", "sae_lens", "dense-torch")
OPS = ("encode", "decode", "forward", "forward_backward")
REFERENCE_OPS = ("matmul", "copy")
ARCHS = ("topk", "jumprelu")
REFERENCE_PROVIDER = "torch"  # provider name of the matmul / copy rows

K = 64
GPU_SHAPES = ((768, 24576), (2304, 65536), (4096, 131072))
GEMMA_SCOPE_SHAPES = ((2304, 16384), (2304, 65536))
GPU_BATCHES = (4096, 8192)
CPU_SHAPES, CPU_BATCHES = ((768, 24576),), (2048,)
QUICK_SHAPES, QUICK_BATCHES, QUICK_K = ((64, 1024),), (256,), 16

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# relative error of a whole output, ||a - b|| / ||b||
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# how far (relative to the k-th value / threshold) a selected latent may sit on the wrong
# side of the boundary: a near-tie, decided differently by a different summation order
TIE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

N_ROTATE = 3  # pre-made x batches, used in turn
DENSE_ROTATE_MAX_BYTES = 256 * 2**20  # dense decode inputs above this are not rotated
CHECK_ROWS = {"cuda": 1024, "cpu": 512}
COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}
CPU_MIN_SAMPLES, CPU_BUDGET_S = 3, 10.0  # per row: stop after the budget once 3 samples exist
CUDA_REP_MS = (100.0, 2000.0)  # do_bench rep: ~10 samples, at most 2 s per row


# ------------------------------------------------------------------------------ configs
@dataclasses.dataclass(frozen=True)
class Config:
    """One problem: architecture, shape, batch, dtype and device."""

    arch: str
    d_in: int
    d_sae: int
    batch: int
    dtype: torch.dtype
    device: str
    k: int = K  # TopK's k; JumpReLU thresholds aim at a mean L0 of 1.5 * k

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.arch} {self.d_in}x{self.d_sae} B={self.batch} {self.dtype_name}"


def skip_reason(provider: str, device: str) -> str | None:
    """Why ``provider`` cannot run on ``device`` (None when it can)."""
    if provider == "fastsae-triton":
        if device != "cuda":
            return "needs a CUDA device (TRITON_INTERPRET is a test mode, not a benchmark)"
        if not ops.triton_available():
            return "Triton is not installed (pip install triton)"
    if provider == "sae_lens":
        try:
            import sae_lens  # noqa: F401  # optional dependency: sae-lens (the [dev] extra)
        except ImportError as e:
            return f"sae-lens is not importable ({e}); pip install 'fastsae[dev]'"
    return None


@contextlib.contextmanager
def provider_env(provider: str) -> Iterator[None]:
    """fastsae-torch: FASTSAE_DISABLE_TRITON=1, so the modules take the torch path (ops read
    it at call time); fastsae-triton: unset, so ``impl="auto"`` picks the kernels on CUDA."""
    if provider not in ("fastsae-triton", "fastsae-torch"):
        yield
        return
    old = os.environ.get("FASTSAE_DISABLE_TRITON")
    if provider == "fastsae-torch":
        os.environ["FASTSAE_DISABLE_TRITON"] = "1"
    else:
        os.environ.pop("FASTSAE_DISABLE_TRITON", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTSAE_DISABLE_TRITON", None)
        else:
            os.environ["FASTSAE_DISABLE_TRITON"] = old


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 matmuls in IEEE fp32 (no TF32), as the Triton kernels compute them."""
    old = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cuda.matmul.allow_tf32 = old[1]


# ------------------------------------------------------------------------------ problem
class Problem:
    """Weights, input batches and modules of one Config, shared by every provider.

    ``params`` are the fastsae module's parameters (all require grad); the sae_lens module
    is built on first use with the same Parameter objects, so nothing is copied. JumpReLU
    thresholds are per-latent quantiles of ``h`` on a calibration batch, chosen so that
    each latent fires on a 1.5k/N fraction of tokens (mean L0 ~ 1.5k).
    """

    def __init__(self, cfg: Config, seed: int = 0) -> None:
        self.cfg = cfg
        dev = torch.device(cfg.device)
        gen = torch.Generator(device=dev).manual_seed(seed)

        def randn(*shape: int, scale: float = 1.0) -> Tensor:
            return torch.randn(*shape, generator=gen, device=dev) * scale

        D, N = cfg.d_in, cfg.d_sae
        weights = {
            "W_enc": randn(D, N, scale=D**-0.5),  # h ~ N(b_enc, 1) for x ~ N(0, 1)
            "W_dec": randn(N, D, scale=D**-0.5),
            "b_enc": randn(N, scale=0.1),
            "b_dec": randn(D, scale=0.1),
        }
        common = dict(d_in=D, d_sae=N, dtype=_dtype_str(cfg.dtype), device=cfg.device)
        if cfg.arch == "topk":
            module_cfg = fastsae.TopKSAEConfig(k=cfg.k, apply_b_dec_to_input=False, **common)
            self.module = fastsae.TopKSAE(module_cfg)
        elif cfg.arch == "jumprelu":
            weights["threshold"] = self._calibrate(weights, gen)
            module_cfg = fastsae.JumpReLUSAEConfig(apply_b_dec_to_input=False, **common)
            self.module = fastsae.JumpReLUSAE(module_cfg)
        else:
            raise ValueError(f"unknown architecture {cfg.arch!r}; expected one of {ARCHS}")
        with torch.no_grad():
            for name, w in weights.items():
                getattr(self.module, name).copy_(w)
        del weights
        self.module.eval().requires_grad_(True)
        self.params: dict[str, torch.nn.Parameter] = dict(self.module.named_parameters())
        self.grad_params = [self.params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")]
        self.xs = [randn(cfg.batch, D).to(cfg.dtype) for _ in range(N_ROTATE)]
        self.grad_out = randn(cfg.batch, D).to(cfg.dtype)  # G of the loss sum(out * G)
        self._sae_lens: Any = None
        self._dense: dict[int, Tensor] = {}
        # the decode inputs: each batch's code, from the torch path
        p = self.params
        with torch.no_grad():
            if cfg.arch == "topk":
                self.codes = [ops.topk_encode(x, p["W_enc"], p["b_enc"], cfg.k, impl="torch")
                              for x in self.xs]  # fmt: skip
            else:
                self.codes = [
                    ops.jumprelu_encode(
                        x, p["W_enc"], p["b_enc"], p["threshold"], sparse=True, impl="torch"
                    )
                    for x in self.xs
                ]
        l0 = (self.codes[0].values != 0).sum(-1).float()
        self.l0_mean, self.l0_max = float(l0.mean()), int(l0.max())
        self.code_width = int(self.codes[0].values.shape[-1])
        self.k_eff = float(cfg.k) if cfg.arch == "topk" else self.l0_mean

    def _calibrate(self, weights: dict[str, Tensor], gen: torch.Generator) -> Tensor:
        """Per-latent thresholds: the m-th largest ``h[:, n]`` over a calibration batch."""
        cfg = self.cfg
        D, N = cfg.d_in, cfg.d_sae
        target_l0 = 1.5 * cfg.k
        n_cal = min(32768, max(2048, math.ceil(16 * N / target_l0)))
        m = max(1, round(n_cal * target_l0 / N))
        x = torch.randn(n_cal, D, generator=gen, device=weights["W_enc"].device)
        x = x.to(cfg.dtype).float()
        W, b = weights["W_enc"].to(cfg.dtype).float(), weights["b_enc"].to(cfg.dtype).float()
        chunk = max(1, (2**27) // n_cal)  # [n_cal, chunk] fp32 <= 512 MB
        thr = torch.empty(N, device=W.device)
        for c in range(0, N, chunk):
            h = x @ W[:, c : c + chunk] + b[c : c + chunk]
            thr[c : c + chunk] = h.topk(m, dim=0).values[-1]
        return thr

    def sae_lens_module(self) -> Any:
        """``sae_lens.TopKSAE`` / ``JumpReLUSAE`` sharing this problem's Parameters."""
        if self._sae_lens is None:
            import sae_lens  # optional dependency: sae-lens (the [dev] extra)

            cfg = self.cfg
            common = dict(
                d_in=cfg.d_in,
                d_sae=cfg.d_sae,
                dtype=_dtype_str(cfg.dtype),
                device=cfg.device,
                apply_b_dec_to_input=False,
            )
            if cfg.arch == "topk":
                module = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(k=cfg.k, **common))
            else:
                module = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common))
            for name, param in self.params.items():
                setattr(module, name, param)
            self._sae_lens = module.eval()
        return self._sae_lens

    def dense_acts(self, i: int) -> Tensor:
        """Dense ``[B, d_sae]`` form of code ``i`` (cached: the dense providers share it)."""
        if i not in self._dense:
            self._dense[i] = self.codes[i].to_dense(self.cfg.d_sae)
        return self._dense[i]

    def n_dense_inputs(self) -> int:
        nbytes = self.cfg.batch * self.cfg.d_sae * self.xs[0].element_size()
        return N_ROTATE if nbytes <= DENSE_ROTATE_MAX_BYTES else 1

    def drop_dense(self) -> None:
        self._dense.clear()


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------ runners
@dataclasses.dataclass
class Runner:
    """``fn(input)`` for one (provider, op) and the inputs it is timed on, in turn."""

    fn: Callable[[Any], Any]
    inputs: list[Any]
    grad: bool

    def __call__(self, inp: Any) -> Any:
        if self.grad:
            with torch.enable_grad():
                return self.fn(inp)
        with torch.no_grad():
            return self.fn(inp)


def _impl(provider: str) -> str:
    return "triton" if provider == "fastsae-triton" else "torch"


def _dense_torch_acts(prob: Problem, x: Tensor) -> Tensor:
    """dense-torch: ``h = x @ W_enc + b_enc``, then top-k (ReLU) or JumpReLU, dense ``[B, N]``."""
    p, cfg = prob.params, prob.cfg
    h = x @ p["W_enc"] + p["b_enc"]
    if cfg.arch == "topk":
        values, indices = torch.topk(h, cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(h).scatter(-1, indices, values.relu())
    return h.relu() * (h > p["threshold"]).to(h.dtype)


def encoder_fn(prob: Problem, provider: str) -> Callable[[Tensor], Tensor | SparseCode]:
    p, cfg = prob.params, prob.cfg
    if provider in ("fastsae-triton", "fastsae-torch"):
        impl = _impl(provider)
        if cfg.arch == "topk":
            return lambda x: ops.topk_encode(x, p["W_enc"], p["b_enc"], cfg.k, impl=impl)
        return lambda x: ops.jumprelu_encode(
            x, p["W_enc"], p["b_enc"], p["threshold"], sparse=True, impl=impl
        )
    if provider == "sae_lens":
        return prob.sae_lens_module().encode
    return lambda x: _dense_torch_acts(prob, x)


def selection_fn(prob: Problem, provider: str) -> Callable[[Tensor], Tensor | SparseCode]:
    """The code (or dense acts) that the provider's forward decodes, by the forward's own
    path: the module's ``encode_sparse`` for fastsae, ``encode`` for sae_lens."""
    if provider in ("fastsae-triton", "fastsae-torch"):
        return prob.module.encode_sparse
    return encoder_fn(prob, provider)


def forward_fn(prob: Problem, provider: str) -> Callable[[Tensor], Tensor]:
    if provider in ("fastsae-triton", "fastsae-torch"):
        return prob.module  # the path is chosen by provider_env
    if provider == "sae_lens":
        return prob.sae_lens_module()
    p = prob.params
    return lambda x: _dense_torch_acts(prob, x) @ p["W_dec"] + p["b_dec"]


def make_runner(prob: Problem, provider: str, op: str) -> Runner:
    """The timed callable of (provider, op) on ``prob``; call it inside ``provider_env``."""
    p = prob.params
    if op == "encode":
        return Runner(encoder_fn(prob, provider), list(prob.xs), grad=False)
    if op == "forward":
        return Runner(forward_fn(prob, provider), list(prob.xs), grad=False)
    if op == "forward_backward":
        fwd = forward_fn(prob, provider)

        def forward_backward(x: Tensor) -> tuple[Tensor, ...]:
            out = fwd(x)
            loss = (out * prob.grad_out[: out.shape[0]]).sum()
            return torch.autograd.grad(loss, prob.grad_params)

        return Runner(forward_backward, list(prob.xs), grad=True)
    if op == "decode":
        if provider in ("fastsae-triton", "fastsae-torch"):
            impl = _impl(provider)
            fn = lambda code: ops.sparse_decode(code, p["W_dec"], p["b_dec"], impl=impl)  # noqa: E731
            return Runner(fn, list(prob.codes), grad=False)
        dense = [prob.dense_acts(i) for i in range(prob.n_dense_inputs())]
        if provider == "sae_lens":
            return Runner(prob.sae_lens_module().decode, dense, grad=False)
        return Runner(lambda acts: acts @ p["W_dec"] + p["b_dec"], dense, grad=False)
    if op == "matmul":
        return Runner(lambda x: x @ p["W_enc"], list(prob.xs), grad=False)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS + ('matmul',)}")


# ------------------------------------------------------------------------------ timing
def rotating_call(runner: Runner) -> Callable[[], Any]:
    """A no-argument call that feeds the runner its inputs in turn."""
    state = {"i": 0}

    def call() -> Any:
        inp = runner.inputs[state["i"] % len(runner.inputs)]
        state["i"] += 1
        return runner(inp)

    return call


def time_call(call: Callable[[], Any], device: str, repeats: int) -> list[float]:
    """Per-call times in ms: do_bench's samples on CUDA, perf_counter samples on CPU."""
    if device == "cuda":
        import triton.testing  # optional dependency: triton

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        call()
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        rep = min(max(CUDA_REP_MS[0], 10 * start.elapsed_time(end)), CUDA_REP_MS[1])
        return list(triton.testing.do_bench(call, warmup=25, rep=rep, return_mode="all"))
    t0 = time.perf_counter()
    call()  # warm-up
    warm = time.perf_counter() - t0
    n = min(repeats, max(CPU_MIN_SAMPLES, int(CPU_BUDGET_S / max(warm, 1e-9))))
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def peak_extra_mb(call: Callable[[], Any], device: str) -> float | None:
    """Peak CUDA memory of one call beyond what was allocated before it (None on CPU)."""
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20
