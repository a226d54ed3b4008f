"""The sparse TopK-family training step routed through the Triton kernels (interpreter on
CPU, or CUDA), against sae-lens's dense training step: every loss and every gradient."""

import pytest
import torch
from sae_testing import assert_close

from fastsae.training.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainStepInput,
)

sae_lens = pytest.importorskip("sae_lens", reason="training parity needs sae-lens (dev extra)")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_step_on_kernels_matches_sae_lens(auto_means_triton, arch, rescale):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(d_in=40, d_sae=300, rescale_acts_by_decoder_norm=rescale)
    if arch == "topk":
        ours = TopKTrainingSAE(TopKTrainingSAEConfig(k=7, **kw)).to(device)
        theirs = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(k=7, **kw)).to(device)
    else:
        ours = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=7.0, **kw)).to(device)
        theirs = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(k=7.0, **kw))
        theirs = theirs.to(device)
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
    if arch == "topk":
        assert "topk_encode" in auto_means_triton
    for name, value in ref.losses.items():
        assert_close(out.losses[name], value, 1e-5, name)
    assert_close(out.feature_acts, ref.feature_acts, 1e-5, "feature_acts")
    out.loss.backward()
    ref.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, theirs_params[name].grad, 1e-4, f"d {name}")
