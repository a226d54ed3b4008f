"""The collectives of one latent-sharded step (2 gloo ranks), counted: their payloads
are exactly what ``step_payload_bytes`` (the README's communication estimates) says,
and nothing of size d_sae is sent."""

from __future__ import annotations

import pytest
import torch
from spawn_ranks import run_ranks

from fastsae.saes.training_sae import TrainStepInput
from fastsae.training import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from fastsae.training.parallel.latent import clip_grad_norm_sharded, shard_sae
from fastsae.training.parallel.latent.communication import step_payload_bytes

D_IN, D_SAE, K, BATCH = 12, 400, 5, 20
N_DEAD = 9  # k_aux = min(d_in // 2, 9) = 6
CASES = {
    "topk": lambda: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)),
    "topk-no-dead": lambda: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)),
    "batchtopk": lambda: BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=2.5)
    ),
    "standard": lambda: StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    "jumprelu": lambda: JumpReLUTrainingSAE(
        JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, pre_act_loss_coefficient=0.1)
    ),
}


def _worker(rank: int, world: int) -> dict:
    from fastsae.training.parallel.latent import base

    sent: list[tuple[str, int]] = []
    real = base.collective

    def counting(what, fn, *args, **kwargs):
        tensor = args[1] if fn is torch.distributed.all_gather else args[0]
        sent.append((what, tensor.numel() * tensor.element_size()))
        return real(what, fn, *args, **kwargs)

    base.collective = counting
    out = {}
    for case, make in CASES.items():
        torch.manual_seed(0)
        shard = shard_sae(make(), rank, world)
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        if case != "topk-no-dead":
            dead[torch.arange(N_DEAD) * 37] = True
        x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))
        coefficients = {"l1": 1.0, "l0": 1.0}
        sent.clear()
        output = shard.training_forward_pass(TrainStepInput(x, coefficients, dead, 0))
        output.loss.backward()
        clip_grad_norm_sharded(shard, 1.0)
        out[case] = list(sent)
    return out


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    return run_ranks(_worker, 2, tmp_path_factory.mktemp("comm"))


@pytest.mark.parametrize("case", list(CASES))
def test_step_collectives_are_the_formula(counted, case):
    arch = case.removesuffix("-no-dead")
    expected = step_payload_bytes(
        arch, BATCH, D_IN, k=2.5 if arch == "batchtopk" else K,
        n_dead=0 if case == "topk-no-dead" else N_DEAD,
        pre_act_loss=True,
    )  # fmt: skip
    for per_rank in counted:
        got = per_rank[case]
        assert sorted(b for _, b in got) == sorted(expected.values()), got
        # nothing scales with d_sae: every payload is at most batch * max(d_in, k_aux)
        assert max(b for _, b in got) <= BATCH * D_IN * 4


def test_formula_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="gated"):
        step_payload_bytes("gated", 8, 4)
