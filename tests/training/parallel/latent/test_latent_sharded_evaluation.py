"""Evaluating and gathering a latent-sharded SAE without a full copy on every rank (gloo,
2 spawned processes), for TopK, BatchTopK, standard and JumpReLU:

* the reconstruction metrics and the language-model metrics (CE loss, KL with the SAE
  spliced into a tiny TransformerLens model) computed on the shards equal those of the
  unsharded SAE, and evaluating changes no parameter or buffer (BatchTopK's threshold
  EMA, JumpReLU's thresholds, negative ones included);
* ``gather_full(device="cpu", dst=r)`` gives rank r the full SAE (each tensor's dtype
  kept) and the other ranks None;
* ranks that built different initial SAEs are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from spawn_ranks import run_ranks
from tiny_runs import tiny_model

from fastsae.evals import language_model_metrics, reconstruction_metrics
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
from fastsae.training.parallel.latent import shard_sae
from fastsae.training.parallel.latent.evaluation import (
    sharded_language_model_metrics,
    sharded_reconstruction_metrics,
)

D_IN, D_SAE, HOOK = 12, 48, "blocks.0.hook_resid_post"
ARCHS = ("topk", "batchtopk", "standard", "jumprelu")


def _full_sae(arch: str):
    torch.manual_seed(0)
    common = dict(d_in=D_IN, d_sae=D_SAE)
    sae = {
        "topk": lambda: TopKTrainingSAE(TopKTrainingSAEConfig(k=5, **common)),
        "batchtopk": lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=4.0, **common)),
        "standard": lambda: StandardTrainingSAE(StandardTrainingSAEConfig(**common)),
        "jumprelu": lambda: JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(jumprelu_init_threshold=0.1, **common)
        ),
    }[arch]()
    sae.cfg.metadata.hook_name = HOOK
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
        if arch == "jumprelu":
            sae.threshold.uniform_(-0.1, 0.4)  # some negative: evaluation must not clamp
        if arch == "batchtopk":
            sae.topk_threshold.fill_(0.25)
    return sae


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(20, D_IN, generator=g) for _ in range(2)]


def _model():
    return tiny_model(n_layers=1, d_model=D_IN, n_ctx=8, n_heads=3, d_vocab=30, d_mlp=16)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 30, (3, 8), generator=torch.Generator().manual_seed(2))


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _worker(rank: int, world: int) -> dict:
    out: dict = {}
    model = _model()
    for arch in ARCHS:
        shard = shard_sae(_full_sae(arch), rank, world)
        before = _state(shard)
        rec = {"recons": sharded_reconstruction_metrics(shard, _batches())}
        rec["lm"] = sharded_language_model_metrics(shard, model, _tokens(), HOOK)
        rec["unchanged"] = all(torch.equal(v, _state(shard)[k]) for k, v in before.items())
        full = shard.gather_full(device="cpu", dst=1)
        rec["gathered"] = None if full is None else _state(full)
        out[arch] = rec
    # a rank that built another initial SAE than rank 0's
    from fastsae.training.parallel.collectives import check_same_tensors

    sae = _full_sae("topk")
    check_same_tensors(sae, torch.device("cpu"), "initial SAE")  # equal: no error
    if rank == 1:
        with torch.no_grad():
            sae.b_dec[3] += 1e-6
    try:
        check_same_tensors(sae, torch.device("cpu"), "initial SAE")
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    # only the tensors a filter accepts are compared; a group compares its own ranks
    check_same_tensors(sae, torch.device("cpu"), "initial SAE", names=lambda n: n != "b_dec")
    pair = torch.distributed.new_group([0, 1])
    try:
        check_same_tensors(sae, torch.device("cpu"), "initial SAE shard", group=pair)
        out["group_mismatch"] = None
    except ValueError as e:
        out["group_mismatch"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, 2, tmp_path_factory.mktemp("sharded_eval"))


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_evaluation_equals_unsharded(ranks, arch):
    full = _full_sae(arch)
    want_recons = reconstruction_metrics(full, _batches())
    want_lm = language_model_metrics(full, _model(), _tokens(), HOOK)
    assert want_recons["metrics/l0"] > 0
    assert 0 < want_recons["sparsity/dead_features_in_eval"] < D_SAE, "dead count exercised"
    for r in ranks:
        got = r[arch]
        assert got["unchanged"], "evaluating must leave parameters and buffers alone"
        assert got["recons"].keys() == want_recons.keys()
        for key, value in want_recons.items():
            assert got["recons"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert got["lm"].keys() == want_lm.keys()
        for key, value in want_lm.items():
            assert got["lm"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("arch", ARCHS)
def test_gather_full_to_one_rank_in_host_memory(ranks, arch):
    full = _full_sae(arch)
    assert ranks[0][arch]["gathered"] is None
    got = ranks[1][arch]["gathered"]
    want = _state(full)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].device.type == "cpu" and got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name


def test_ranks_with_different_initial_saes_are_refused(ranks):
    for r in ranks:
        assert r["mismatch"] is not None
        assert "rank 1's initial SAE differs from rank 0's ('b_dec')" in r["mismatch"]
        assert "rank 1's initial SAE shard differs from rank 0's ('b_dec')" in r["group_mismatch"]
