"""Latent-sharded TopK on CPU with gloo and 2 and 4 spawned processes: the global top-k equals
the single-device selection exactly; losses, AuxK and every gradient equal the unsharded
step's; one clipped Adam step equals the unsharded update; gather_full -> save -> load ->
from_full round-trips; a world size that does not divide d_sae raises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spawn_ranks import run_ranks

from fastsae.saes.topk import ShardedTopKTrainingSAE, TopKTrainingSAE
from fastsae.saes.training_sae import TrainStepInput
from fastsae.training import TopKTrainingSAEConfig
from fastsae.training.parallel.latent import clip_grad_norm_sharded, shard_range

D_IN, D_SAE, K, BATCH, LR, MAX_NORM = 12, 48, 5, 20, 1e-2, 0.5
# (rescale_acts_by_decoder_norm, dead latents): many dead on both ranks (k_aux = 6 of
# 20), then fewer dead than k_aux, all on rank 0's shard (rank 1 has none)
CASES = [
    (True, [1, 3, 4, 7, 10, 12, 15, 19, 22, 23, 24, 26, 29, 31, 33, 36, 40, 41, 44, 47]),
    (False, [2, 5, 9, 17]),
]


def _full_sae(rescale: bool, seed: int = 0) -> TopKTrainingSAE:
    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        aux_loss_coefficient=0.7,
        rescale_acts_by_decoder_norm=rescale,
    )
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # unequal decoder norms
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


def _batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(seed))


def _dead(ids: list[int]) -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[ids] = True
    return mask


def _step_input(ids: list[int]) -> TrainStepInput:
    return TrainStepInput(
        sae_in=_batch(), coefficients={}, dead_neuron_mask=_dead(ids), n_training_steps=0
    )


def _optimize(params, clip) -> None:
    clip()
    opt = torch.optim.Adam(params, lr=LR)
    opt.step()


# ---------------------------------------------------------------------------- workers
def _worker(rank: int, world: int, tmp: str) -> dict:
    results = []
    for rescale, dead in CASES:
        shard = ShardedTopKTrainingSAE.from_full(_full_sae(rescale), rank, world)
        output = shard.training_forward_pass(_step_input(dead))
        output.loss.backward()
        rec = {k: v.detach() for k, v in output.losses.items()}
        rec["loss"] = output.loss.detach()
        rec["global_indices"] = shard.last_global_indices
        rec["fired"] = output.fired()
        rec["grads"] = {n: p.grad.clone() for n, p in shard.named_parameters()}
        _optimize(shard.parameters(), lambda s=shard: clip_grad_norm_sharded(s, MAX_NORM))
        rec["params"] = {n: p.detach().clone() for n, p in shard.named_parameters()}
        results.append(rec)
    # gather -> save (rank 0) -> load on every rank -> from_full
    full = shard.gather_full()
    save_dir = Path(tmp) / "saved"
    if rank == 0:
        full.save_model(save_dir)
    torch.distributed.barrier()
    loaded = TopKTrainingSAE.load_from_disk(save_dir)
    again = ShardedTopKTrainingSAE.from_full(loaded, rank, world)
    round_trip = {
        "gathered": {n: p.detach().clone() for n, p in full.named_parameters()},
        "loaded": {n: p.detach().clone() for n, p in loaded.named_parameters()},
        "reshard": {n: p.detach().clone() for n, p in again.named_parameters()},
    }
    return {"cases": results, "round_trip": round_trip}


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"latent_sharding{request.param}")
    return run_ranks(_worker, request.param, tmp / "ranks", str(tmp))


def _reference(rescale: bool, dead: list[int]) -> dict:
    sae = _full_sae(rescale)
    output = sae.training_forward_pass(_step_input(dead))
    output.loss.backward()
    rec = {k: v.detach() for k, v in output.losses.items()}
    rec["loss"] = output.loss.detach()
    rec["indices"] = output.code.indices
    rec["fired"] = output.fired()
    rec["grads"] = {n: p.grad.clone() for n, p in sae.named_parameters()}
    _optimize(
        sae.parameters(),
        lambda: torch.nn.utils.clip_grad_norm_(sae.parameters(), MAX_NORM),
    )
    rec["params"] = {n: p.detach().clone() for n, p in sae.named_parameters()}
    return rec


def _gathered(shards: list[dict], name: str) -> torch.Tensor:
    if name == "b_dec":
        for other in shards[1:]:
            assert torch.equal(other[name], shards[0][name]), "b_dec replicas differ"
        return shards[0][name]
    return torch.cat([s[name] for s in shards], dim=1 if name == "W_enc" else 0)


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", range(len(CASES)))
def test_global_topk_indices_equal_single_device(ranks, case):
    ref = _reference(*CASES[case])
    got = [res["cases"][case] for res in ranks]
    for other in got[1:]:
        assert torch.equal(other["global_indices"], got[0]["global_indices"])
    ids = got[0]["global_indices"].sort(dim=-1).values
    assert torch.equal(ids, ref["indices"].long().sort(dim=-1).values)
    # firing counts: each rank's shard of the single-device counts
    assert torch.equal(torch.cat([g["fired"] for g in got]), ref["fired"])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_losses_and_every_gradient_equal_unsharded(ranks, case):
    ref = _reference(*CASES[case])
    got = [res["cases"][case] for res in ranks]
    assert ref["auxiliary_reconstruction_loss"] > 0, "the test must exercise AuxK"
    for key in ("loss", "mse_loss", "auxiliary_reconstruction_loss"):
        for other in got[1:]:
            assert torch.equal(other[key], got[0][key]), key
        _close(got[0][key], ref[key], key)
    for name, grad in ref["grads"].items():
        _close(_gathered([g["grads"] for g in got], name), grad, f"grad {name}")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_clipped_adam_step_equals_unsharded_update(ranks, case):
    ref = _reference(*CASES[case])
    got = [res["cases"][case] for res in ranks]
    for name, value in ref["params"].items():
        _close(_gathered([g["params"] for g in got], name), value, f"param {name}")


def test_gather_save_load_reshard_round_trip(ranks):
    trips = [res["round_trip"] for res in ranks]
    last = [res["cases"][-1]["params"] for res in ranks]
    for name, value in trips[0]["gathered"].items():
        for other in trips[1:]:
            assert torch.equal(other["gathered"][name], value), name
        assert torch.equal(_gathered(last, name), value), name
        assert torch.equal(trips[0]["loaded"][name], value), name
        assert torch.equal(_gathered([t["reshard"] for t in trips], name), value), name


def test_world_size_not_dividing_d_sae_raises():
    with pytest.raises(ValueError, match=r"d_sae 48 is not divisible by 5"):
        ShardedTopKTrainingSAE.from_full(_full_sae(True), 0, 5)
    with pytest.raises(ValueError, match=r"d_sae 10 is not divisible by 4"):
        shard_range(10, 1, 4)
    assert shard_range(48, 1, 2) == (24, 48)
