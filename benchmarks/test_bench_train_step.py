"""One TopK SAE training step: fastsae vs sae-lens 6.x on the same weights.

    pytest benchmarks/test_bench_train_step.py --benchmark-json=out.json
    python benchmarks/compare.py out.json --target fastsae

A step is ``training_forward_pass`` + ``loss.backward()`` + Adam step + zero_grad.
CPU: batch 2048, d_in 768, d_sae 24576, k 64, fp32 (the CPU target shape).
CUDA (when present): batch 8192, d_in 2304, d_sae 65536 and 131072, k 64, bf16
autocast for both libraries (SAELens's ``autocast=True``), and fastsae alone at
d_sae 1,048,576 / batch 4096 (the width target); timed with CUDA synchronisation.

Providers:
  fastsae        ``fastsae.training.TopKTrainingSAE``: sparse step (encode + top-k without a
                 ``[batch, d_sae]`` tensor, sparse decode, sparse backward), fused Adam
                 (what SAETrainer uses); on CUDA the pairs are picked by the path
                 ``impl="auto"`` measured fastest at this shape (``fastsae.tuning``: fused
                 kernel, cuBLAS matmuls over latent chunks, or dense torch)
  fastsae-fused  the same with the fused Triton encode+top-k kernel forced
                 (``FASTSAE_TOPK_SELECT=fused``; CUDA only), to compare the two selections
  fastsae-trainer  ``SAETrainer.step``: the same plus gradient clipping, LR/coefficient
                 schedules and dead-latent bookkeeping
  sae_lens       ``sae_lens.TopKTrainingSAE`` + ``torch.optim.Adam`` as sae-lens's trainer
                 builds it (default implementation)
  sparsify       EleutherAI ``sparsify.SparseCoder`` (CUDA only: its decoder is a Triton
                 kernel) with its decoder-norm handling and fused Adam

Groups: no dead latents (AuxK off) and 10% dead latents (AuxK on). Before timing, the
losses and every gradient of fastsae are checked against sae-lens on the same batch.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import Tensor

from fastsae.training import (
    LanguageModelSAERunnerConfig,
    SAETrainer,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainStepInput,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, d_in, d_sae, k, providers)
CUDA_ONLY = ("fastsae-fused", "sparsify")
ALL = ("fastsae", "fastsae-trainer", "sae_lens") + (CUDA_ONLY if DEVICE == "cuda" else ())
SHAPES = (
    [(8192, 2304, 65536, 64, ALL), (8192, 2304, 131072, 64, ALL),
     (4096, 2304, 1_048_576, 64, ("fastsae", "fastsae-trainer"))]
    if DEVICE == "cuda"
    else [(2048, 768, 24576, 64, ALL)]
)  # fmt: skip
AUTOCAST = DEVICE == "cuda"
ROUNDS, WARMUP_ROUNDS = 5, 1
PROVIDERS = ALL
DEAD_FRACTIONS = (0.0, 0.1)
BATCH, D_IN, D_SAE, K = SHAPES[0][:4]

try:  # the GPU image may lack sae-lens: its rows are then skipped
    import sae_lens
    from sae_lens.saes.sae import TrainStepInput as SLTrainStepInput
except ImportError:
    sae_lens = None
try:  # EleutherAI sparsify (eai-sparsify); its decoder is Triton-only, so CUDA only
    import sparsify
except ImportError:
    sparsify = None


def _group(dead: float) -> str:
    precision = "bf16-autocast" if AUTOCAST else "fp32"
    return (
        f"topk-train-step {DEVICE} {precision} B={BATCH} d_in={D_IN} d_sae={D_SAE} k={K} "
        f"dead={dead:.0%}"
    )


def _weights(seed: int = 0) -> dict[str, Tensor]:
    # drawn on the device (the 1M-latent case draws 7 billion numbers)
    g = torch.Generator(DEVICE).manual_seed(seed)
    W_dec = torch.randn(D_SAE, D_IN, generator=g, device=DEVICE) / D_IN**0.5
    return {
        "W_enc": (
            W_dec.T + 0.1 * torch.randn(D_IN, D_SAE, generator=g, device=DEVICE)
        ).contiguous(),
        "W_dec": W_dec,
        "b_enc": 0.1 * torch.randn(D_SAE, generator=g, device=DEVICE),
        "b_dec": 0.1 * torch.randn(D_IN, generator=g, device=DEVICE),
    }


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=AUTOCAST)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _dead_mask(fraction: float) -> Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool, device=DEVICE)
    mask[: int(fraction * D_SAE)] = True
    return mask


def _x() -> Tensor:
    return torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1)).to(DEVICE)


class _FixedBatch:
    def __init__(self, x: Tensor):
        self.x = x

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        return self.x


def _make(provider: str, dead: float):
    if provider == "fastsae-fused":
        step = _make("fastsae", dead)

        def fused_step():
            os.environ["FASTSAE_TOPK_SELECT"] = "fused"
            try:
                step()
            finally:
                os.environ.pop("FASTSAE_TOPK_SELECT", None)

        return fused_step
    torch.manual_seed(0)
    sd = _weights()
    x = _x()
    mask = _dead_mask(dead)
    if provider == "sparsify":
        # sparsify's own step: fvu + auxk_alpha * AuxK, decoder-parallel gradient removed,
        # Adam (sparsify's trainer defaults to signum; Adam keeps the comparison like for
        # like), decoder rows renormalised
        sc = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K),
                                  device=DEVICE)  # fmt: skip
        opt = torch.optim.Adam(sc.parameters(), lr=1e-4, fused=True)

        def sparsify_step():
            with _autocast():
                out = sc(x, dead_mask=mask)
                loss = out.fvu + out.auxk_loss / 32
            loss.backward()
            sc.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sc.set_decoder_norm_to_unit_norm()
            _sync()

        return sparsify_step
    if provider == "sae_lens":
        sae = sae_lens.TopKTrainingSAE(
            sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, device=DEVICE)
        )
        sae.load_state_dict(sd)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        step_in = SLTrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=mask,
            n_training_steps=0,
            is_logging_step=False,
        )

        def step():
            with _autocast():
                out = sae.training_forward_pass(step_in)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            _sync()

        return step
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, device=DEVICE))
    sae.load_state_dict(sd)
    if provider == "fastsae-trainer":
        cfg = LanguageModelSAERunnerConfig(
            sae=sae.cfg,
            dataset_path="unused",
            train_batch_size_tokens=BATCH,
            training_tokens=BATCH * 1000,
            lr=1e-4,
            dead_feature_window=1,
            checkpoint_path=None,
            output_path=None,
            verbose=False,
            device=DEVICE,
            autocast=AUTOCAST,
        )
        trainer = SAETrainer(cfg, sae, _FixedBatch(x), show_progress=False)
        # latents marked dead as in the other providers (window 1: > 1 pass without firing)
        trainer.n_forward_passes_since_fired[mask] = 10**9
        trainer.n_forward_passes_since_fired[~mask] = -(10**9)

        def trainer_step():
            trainer.step(x)
            _sync()

        return trainer_step
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    step_in = TrainStepInput(x, {}, mask, 0, False)

    def step():
        with _autocast():
            out = sae.training_forward_pass(step_in)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()

    return step


def _check_parity(dead: float) -> None:
    """fp32 losses and gradients equal sae-lens's (the timed steps compute the same thing)."""
    sd = _weights()
    x = _x()
    mask = _dead_mask(dead)
    fast = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, device=DEVICE))
    ref = sae_lens.TopKTrainingSAE(
        sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, device=DEVICE)
    )
    fast.load_state_dict(sd)
    ref.load_state_dict(sd)
    fo = fast.training_forward_pass(TrainStepInput(x, {}, mask, 0, False))
    ro = ref.training_forward_pass(SLTrainStepInput(x, {}, mask, 0, False))
    fo.loss.backward()
    ro.loss.backward()
    assert torch.allclose(fo.loss, ro.loss, rtol=1e-5), (float(fo.loss), float(ro.loss))
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g, rg = p.grad, ref_params[name].grad
        err = float((g - rg).norm() / rg.norm())
        assert err < 1e-4, f"{name} gradient differs from sae-lens: {err:.2e}"


@pytest.mark.parametrize("dead", DEAD_FRACTIONS)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}x{s[2]}")
def test_train_step(benchmark, provider: str, dead: float, shape) -> None:
    global BATCH, D_IN, D_SAE, K
    BATCH, D_IN, D_SAE, K, providers = shape
    if provider not in providers:
        pytest.skip(f"{provider} does not fit / is not run at d_sae={D_SAE}")
    if provider == "sae_lens" and sae_lens is None:
        pytest.skip("sae-lens is not installed")
    if provider == "sparsify" and sparsify is None:
        pytest.skip("eai-sparsify is not installed")
    if provider == "fastsae" and D_SAE <= 131072 and sae_lens is not None:
        _check_parity(dead)
    benchmark.group = _group(dead)
    benchmark.extra_info.update(
        {"provider": provider, "batch": BATCH, "d_in": D_IN, "d_sae": D_SAE, "k": K, "dead": dead,
         "device": DEVICE, "autocast_bf16": AUTOCAST}
    )  # fmt: skip
    if DEVICE == "cuda":
        gc.collect()  # the previous case's SAE and optimizer state
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = _make(provider, dead)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
