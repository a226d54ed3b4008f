"""The sparse TopK-family training step routed through the Triton kernels (interpreter on
CPU, or CUDA), against sae-lens's dense training step: every loss and every gradient."""

import pytest
import torch
from oracles import segment_rows_sum64
from sae_testing import assert_close

from fastsae.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainStepInput,
)

sae_lens = pytest.importorskip("sae_lens", reason="training parity needs sae-lens (dev extra)")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


ARCH_SELECTIONS = [
    ("topk", "fused"), ("topk", "chunked"), ("batchtopk", "chunked"), ("matryoshka", "chunked")
]  # fmt: skip


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize(("arch", "selection"), ARCH_SELECTIONS)
def test_training_step_on_kernels_matches_sae_lens(
    auto_means_triton, monkeypatch, arch, selection, rescale
):
    """``selection``: how the Triton path picks TopK's pairs (the fused kernel, or cuBLAS
    chunks + torch.topk as for large CUDA batches; BatchTopK's Triton path always uses
    chunks); the backward is the kernels' either way."""
    monkeypatch.setenv("FASTSAE_TOPK_SELECT", selection)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(d_in=40, d_sae=300, rescale_acts_by_decoder_norm=rescale)
    if arch == "topk":
        ours = TopKTrainingSAE(TopKTrainingSAEConfig(k=7, **kw)).to(device)
        theirs = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(k=7, **kw)).to(device)
    elif arch == "batchtopk":
        ours = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=7.0, **kw)).to(device)
        theirs = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(k=7.0, **kw))
        theirs = theirs.to(device)
    else:  # Matryoshka, with per-level AuxK: every level decoded in one sparse pass
        kw.update(k=7.0, matryoshka_widths=[50, 120, 300], use_matryoshka_aux_loss=True)
        ours = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**kw))
        ours = ours.to(device)
        theirs = sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(**kw)
        ).to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("b_enc", "b_dec"):
            getattr(ours, name).copy_(0.2 * torch.randn(getattr(ours, name).shape, generator=g))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(33, 40, generator=g).to(device)
    dead = torch.zeros(300, dtype=torch.bool, device=device)
    dead[::5] = True
    out = ours.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    ref = theirs.training_forward_pass(
        sae_lens.saes.sae.TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
            is_logging_step=False,
        )
    )  # fmt: skip
    assert "sparse_decode" in auto_means_triton
    assert ("topk_encode" if arch == "topk" else "batch_topk_encode") in auto_means_triton
    for name, value in ref.losses.items():
        assert_close(out.losses[name], value, 1e-5, name)
    assert_close(out.feature_acts, ref.feature_acts, 1e-5, "feature_acts")
    out.loss.backward()
    ref.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, theirs_params[name].grad, 1e-4, f"d {name}")


def test_segment_rows_sum_transposed_layout(device, poison_outputs):
    """dW_enc written straight into a row-major [D, N] buffer equals the [N, D] sums
    transposed, latents without pairs included (they stay zero)."""
    from fastsae.kernels.sparse_backward import group_by_latent, segment_rows_sum

    torch.manual_seed(0)
    B, K, N, D = 21, 3, 50, 37
    indices = torch.randint(0, N // 2, (B, K), device=device)  # latents >= 25 get no pair
    weights = torch.randn(B, K, device=device)
    X = torch.randn(B, D, device=device)
    order, offsets = group_by_latent(indices, N)
    rows = segment_rows_sum(order, offsets, weights, X, K, torch.float32)
    cols = segment_rows_sum(order, offsets, weights, X, K, torch.float32, transposed=True)
    assert cols.shape == (D, N) and cols.is_contiguous()
    ref = segment_rows_sum64(weights, indices, X, N)
    assert_close(rows, ref, 1e-6, "rows")
    assert_close(cols, ref.T, 1e-6, "transposed")
    assert (cols[:, N // 2 :] == 0).all()


@pytest.mark.parametrize(("arch", "selection"), ARCH_SELECTIONS)
@pytest.mark.parametrize("rescale", [True, False])
def test_trainer_step_holds_one_gradient_per_matrix(
    auto_means_triton, monkeypatch, rescale, arch, selection
):
    """The memory the width target rests on (d_sae 1M x d_in 2304 fp32: 9 GiB a
    matrix): a TopK / BatchTopK / Matryoshka trainer step with dead latents (AuxK) and decoder-norm
    rescaling never holds more than the two gradients in weight-matrix-sized tensors
    beyond the parameters and Adam's state (TopK held four before step_weights.py;
    BatchTopK's dense encoder held [batch, d_sae] tensors besides)."""
    from live_tensors import LiveTensors

    from fastsae import torch_ops
    from fastsae.training import LanguageModelSAERunnerConfig, SAETrainer

    monkeypatch.setenv("FASTSAE_TOPK_SELECT", selection)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, D, N = 64, 36, 4096  # B / D as at batch 4096, d_in 2304
    # the chunked selection's working set in proportion too (1 GiB of a 9 GiB matrix)
    monkeypatch.setattr(torch_ops, "TOPK_CHUNK_BYTES", D * N * 4 // 9)
    sae_class, cfg_class = {
        "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
        "matryoshka": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig),
    }[arch]
    extra = {"matryoshka_widths": [512, 2048, N]} if arch == "matryoshka" else {}
    sae = sae_class(cfg_class(d_in=D, d_sae=N, k=4, rescale_acts_by_decoder_norm=rescale, **extra))
    sae = sae.to(device)
    cfg = LanguageModelSAERunnerConfig(
        sae=sae.cfg, dataset_path="unused", train_batch_size_tokens=B,
        training_tokens=B * 100, dead_feature_window=1, checkpoint_path=None,
        output_path=None, verbose=False, device=device,
    )  # fmt: skip
    x = torch.randn(B, D, device=device)
    trainer = SAETrainer(cfg, sae, iter([x] * 10), show_progress=False)
    dead = torch.zeros(N, dtype=torch.bool, device=device)
    dead[::10] = True  # 10% dead: AuxK on
    trainer.n_forward_passes_since_fired[dead] = 10**9
    trainer.n_forward_passes_since_fired[~dead] = -(10**9)
    trainer.step(x)  # Adam's state exists from here on
    matrix = D * N * 4
    tracker = LiveTensors(min_bytes=matrix // 2, exclude=tuple(sae.parameters()))
    with tracker:
        trainer.step(x)
    assert "sparse_decode" in auto_means_triton
    assert ("topk_encode" if arch == "topk" else "batch_topk_encode") in auto_means_triton
    assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())
    assert tracker.peak <= 2 * matrix, (tracker.peak / matrix, tracker.peak_op)


@pytest.mark.parametrize("selection", ["fused", "chunked"])
def test_topk_step_under_bf16_autocast(auto_means_triton, monkeypatch, selection):
    """The GPU benchmark's setting (bf16 autocast, fp32 weights, AuxK on) on the kernel
    path: the step runs, and its loss and gradients stay within bf16 rounding of the
    fp32 step on the same weights."""
    monkeypatch.setenv("FASTSAE_TOPK_SELECT", selection)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=40, d_sae=300, k=7)).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 40, generator=g).to(device)
    dead = torch.zeros(300, dtype=torch.bool, device=device)
    dead[::5] = True
    grads, losses = [], []
    for autocast in (False, True):
        sae.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
        out.loss.backward()
        losses.append({k: float(v.detach()) for k, v in out.losses.items()})
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
        assert all(p.grad.dtype == torch.float32 for p in sae.parameters())
    assert "topk_encode" in auto_means_triton
    for name, value in losses[0].items():
        assert abs(losses[1][name] - value) <= 0.03 * abs(value), (name, losses)
    for name, ref in grads[0].items():
        assert_close(grads[1][name], ref, 0.1, f"d {name} under autocast")
