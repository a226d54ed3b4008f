"""The latent-sharded TopK step with each rank's candidates from the fused Triton
``topk_encode``: losses and every gradient equal the unsharded step's on the torch path.
Under the interpreter: 2 gloo ranks on CPU. On CUDA: one rank (one GPU here; gloo
moves no CUDA tensors between processes sharing a GPU), which still runs the fused
candidate path and the merge."""

from __future__ import annotations

import pytest
import torch
from sae_testing import assert_close
from spawn_ranks import run_ranks

from fastsae.saes import TopKTrainingSAE, TopKTrainingSAEConfig, TrainStepInput
from fastsae.saes.topk import ShardedTopKTrainingSAE

D_IN, D_SAE, K, BATCH = 24, 200, 7, 17
WORLD = 1 if torch.cuda.is_available() else 2


def _full(rescale: bool) -> TopKTrainingSAE:
    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=0.5
    )
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    return sae


def _input() -> TrainStepInput:
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::7] = True
    return TrainStepInput(x, {}, dead, 0, False)


def _run(sae) -> dict:
    out = sae.training_forward_pass(_input())
    out.loss.backward()
    rec = {k: v.detach() for k, v in out.losses.items()}
    rec["grads"] = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return rec


def _worker(rank: int, world: int) -> dict:
    from fastsae import ops

    real = ops._use_triton
    calls: list[str] = []

    def use_triton(op, impl, tensors, has_kernel):  # what auto_means_triton does
        if impl == "auto" and has_kernel:
            calls.append(op)
            return True
        return real(op, impl, tensors, has_kernel)

    ops._use_triton = use_triton
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for rescale in (True, False):
        full = _full(rescale).to(device)
        shard = ShardedTopKTrainingSAE.from_full(full, rank, world)
        out[rescale] = _run(shard)
    out["calls"] = calls
    return out


@pytest.mark.parametrize("rescale", [True, False])
def test_sharded_step_on_fused_encode_equals_unsharded(tmp_path, rescale):
    results = run_ranks(_worker, WORLD, tmp_path)
    assert "topk_encode" in results[0]["calls"], "the fused kernel must produce the candidates"
    ref = _run(_full(rescale))  # unsharded, torch path
    assert ref["auxiliary_reconstruction_loss"] > 0
    for key in ("mse_loss", "auxiliary_reconstruction_loss"):
        for res in results:
            assert_close(res[rescale][key].cpu(), ref[key], 1e-5, key)
    for name, grad in ref["grads"].items():
        parts = [res[rescale]["grads"][name].cpu() for res in results]
        assert len(parts) == WORLD
        got = parts[0] if name == "b_dec" else torch.cat(parts, dim=1 if name == "W_enc" else 0)
        assert_close(got, grad, 1e-4, f"d {name}")
