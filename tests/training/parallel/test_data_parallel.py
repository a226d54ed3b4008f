"""Data-parallel training on CPU with gloo and 2 or 4 spawned processes: a run equals a
single-process run on the concatenated batches (losses, AuxK, dead mask, every
parameter after Adam), ranks that disagree on the config raise, and a 2-rank
checkpoint resumes in a single process with the same losses."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from spawn_ranks import run_ranks

from fastsae.saes import training_sae_class_for_architecture
from fastsae.training import LanguageModelSAERunnerConfig, SAETrainer, TopKTrainingSAEConfig
from fastsae.training.parallel.data_parallel import (
    DistributedSAETrainer,
    RankShardedProvider,
    config_hash,
    init_distributed,
)

D_IN, D_SAE, GLOBAL_BATCH, N_STEPS = 16, 64, 32, 6


class Synthetic:
    """Seeded ``[batch, d_in]`` activations with a resumable position."""

    def __init__(self, batch=GLOBAL_BATCH, seed=0):
        self.batch = batch
        self.generator = torch.Generator().manual_seed(seed)
        self.basis = torch.randn(3 * D_IN, D_IN, generator=self.generator) / math.sqrt(D_IN)

    def __iter__(self):
        return self

    def __next__(self):
        codes = torch.rand(self.batch, self.basis.shape[0], generator=self.generator)
        codes = codes * (codes > 0.85)
        return codes @ self.basis + 0.05 * torch.randn(self.batch, D_IN, generator=self.generator)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def _cfg(tmp: Path, **kwargs) -> LanguageModelSAERunnerConfig:
    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, aux_loss_coefficient=0.5)
    kwargs.setdefault("lr", 3e-3)
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        dataset_path="unused",
        training_tokens=N_STEPS * GLOBAL_BATCH,
        train_batch_size_tokens=GLOBAL_BATCH,
        checkpoint_path=str(tmp / "ck"),
        output_path=str(tmp / "out"),
        lr_warm_up_steps=2,
        dead_feature_window=1,  # latents silent for 2 steps are dead: AuxK from step 3
        max_grad_norm=0.5,  # clipping must see the averaged gradient
        n_checkpoints=1,  # one checkpoint after step 4 (128 samples)
        save_final_checkpoint=False,
        **kwargs,
    )


def _sae(cfg, seed=0):
    torch.manual_seed(seed)
    sae = training_sae_class_for_architecture(cfg.sae.architecture())(copy.deepcopy(cfg.sae))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
    return sae


def _record(trainer: SAETrainer) -> list[dict]:
    """Per step: losses, the dead mask used, every parameter after the update."""
    record: list[dict] = []
    step = trainer.step

    def recording_step(batch):
        dead = trainer.dead_neurons.clone()
        out = step(batch)
        rec = {k: float(v.detach()) for k, v in out.losses.items()}
        rec["loss"] = float(out.loss.detach())
        rec["dead"] = dead
        rec["params"] = {k: v.detach().clone() for k, v in trainer.sae.named_parameters()}
        rec["n_training_samples"] = trainer.state.n_training_samples
        record.append(rec)
        return out

    trainer.step = recording_step  # type: ignore[method-assign]
    return record


# ---------------------------------------------------------------------------- workers
def _worker(rank: int, world: int, tmp: str, scenario: str) -> dict:
    tmp_path = Path(tmp)
    info = init_distributed(backend="gloo", timeout_s=5 if scenario == "dead" else 60)
    assert (info.rank, info.world_size) == (rank, world)
    if scenario == "dead":
        if rank == 1:
            torch.save({"result": {"error": None}}, tmp_path / "ranks" / f"rank{rank}.pt")
            os._exit(0)  # dies without taking part in any collective
        cfg = _cfg(tmp_path)
        try:
            DistributedSAETrainer(cfg, _sae(cfg), iter(()), show_progress=False)
        except RuntimeError as e:
            return {"error": str(e)}
        return {"error": None}
    if scenario == "config":
        cfg = _cfg(tmp_path, lr=3e-3 if rank == 0 else 1e-3)
        try:
            DistributedSAETrainer(cfg, _sae(cfg), iter(()), show_progress=False)
        except ValueError as e:
            return {"error": str(e)}
        return {"error": None}
    if scenario == "init":  # initialised from each rank's own rows, then made equal
        cfg = _cfg(tmp_path, recipe="fastsae")
        data = RankShardedProvider(Synthetic(), rank, world)
        trainer = DistributedSAETrainer(cfg, _sae(cfg, seed=rank), data, show_progress=False)
        before = trainer.sae.b_dec.detach().clone()
        trainer._init_from_data()
        return {
            "params": {k: v.detach().clone() for k, v in trainer.sae.named_parameters()},
            "b_dec_changed": not torch.equal(before, trainer.sae.b_dec.detach()),
        }
    cfg = _cfg(tmp_path, logger={"wandb_log_frequency": 1})
    data = RankShardedProvider(Synthetic(), rank, world)
    trainer = DistributedSAETrainer(
        cfg, _sae(cfg, seed=rank), data, run_dir=tmp_path / f"run{rank}", show_progress=False
    )
    record = _record(trainer)
    trainer.fit()
    return {"record": record, "last_metrics": trainer.last_metrics}


def _spawn(tmp: Path, scenario: str, world: int = 2) -> list[dict]:
    return run_ranks(_worker, world, tmp / "ranks", str(tmp), scenario, init_group=False)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    return tmp, _spawn(tmp, "train")


@pytest.fixture(scope="module")
def four_rank_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp4")
    return tmp, _spawn(tmp, "train", world=4)


def _single_process_run(tmp: Path):
    cfg = _cfg(tmp, logger={"wandb_log_frequency": 1})
    trainer = SAETrainer(cfg, _sae(cfg), Synthetic(), run_dir=tmp / "single", show_progress=False)
    record = _record(trainer)
    trainer.fit()
    return record


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("run", ["two_rank_run", "four_rank_run"])
def test_data_parallel_steps_equal_single_process_steps(run, request, tmp_path):
    tmp, results = request.getfixturevalue(run)
    records = [res["record"] for res in results]
    single = _single_process_run(tmp_path)
    assert all(len(r) == N_STEPS for r in records) and len(single) == N_STEPS
    aux_seen = False
    for step, s in enumerate(single):
        per_rank = [r[step] for r in records]
        a = per_rank[0]
        # each rank's losses are means over its share: their mean is the full batch's
        for key in ("loss", "mse_loss", "auxiliary_reconstruction_loss"):
            mean = sum(r[key] for r in per_rank) / len(per_rank)
            _close(torch.tensor(mean), torch.tensor(s[key]), f"step {step} {key}")
        aux_seen |= s["auxiliary_reconstruction_loss"] > 0
        # the same dead mask on every rank, equal to the single process's
        for b in per_rank:
            assert torch.equal(a["dead"], b["dead"]) and torch.equal(a["dead"], s["dead"]), step
        assert a["n_training_samples"] == s["n_training_samples"] == (step + 1) * GLOBAL_BATCH
        for name, value in s["params"].items():
            for b in per_rank[1:]:
                assert torch.equal(a["params"][name], b["params"][name]), f"replicas {name}"
            _close(a["params"][name], value, f"step {step} param {name}")
    assert aux_seen, "the test must exercise AuxK (dead latents)"


def test_only_rank_zero_writes_metrics_and_checkpoints(two_rank_run):
    tmp, results = two_rank_run
    rows = [json.loads(x) for x in (tmp / "run0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, N_STEPS + 1))
    assert not (tmp / "run1").exists()
    r0, r1 = (res["record"] for res in results)
    # logged loss: mean over ranks
    assert rows[-1]["losses/overall_loss"] == pytest.approx((r0[-1]["loss"] + r1[-1]["loss"]) / 2)
    assert results[0]["last_metrics"] == results[1]["last_metrics"]
    assert sorted(p.name for p in (tmp / "ck").iterdir()) == [str(4 * GLOBAL_BATCH)]


def test_two_rank_checkpoint_resumes_in_one_process_with_the_same_losses(two_rank_run, tmp_path):
    tmp, results = two_rank_run
    r0, r1 = (res["record"] for res in results)
    cfg = _cfg(tmp_path)
    trainer = DistributedSAETrainer(  # world size 1: behaves as SAETrainer
        cfg, _sae(cfg, seed=5), RankShardedProvider(Synthetic(), 0, 1), show_progress=False
    )
    trainer.load_checkpoint(tmp / "ck" / str(4 * GLOBAL_BATCH))
    assert trainer.state.n_training_steps == 4
    record = _record(trainer)
    trainer.fit()
    assert len(record) == N_STEPS - 4
    for i, rec in enumerate(record):
        a, b = r0[4 + i], r1[4 + i]
        for key in ("loss", "mse_loss", "auxiliary_reconstruction_loss"):
            _close(torch.tensor(rec[key]), torch.tensor((a[key] + b[key]) / 2), f"{i} {key}")
        for name, value in rec["params"].items():
            _close(value, a["params"][name], f"resumed step {i} {name}")


def test_initialising_from_data_gives_every_rank_the_same_weights(tmp_path):
    """recipe='fastsae': each rank initialises from its own rows; rank 0's weights are
    broadcast, so the replicas start equal (they would drift apart otherwise)."""
    results = _spawn(tmp_path, "init")
    assert all(r["b_dec_changed"] for r in results)
    for name, value in results[0]["params"].items():
        assert torch.equal(value, results[1]["params"][name]), name


def test_ranks_disagreeing_on_the_config_raise_on_every_rank(tmp_path):
    results = _spawn(tmp_path, "config")
    for res in results:
        assert res["error"] is not None
        assert "ranks disagree on the training config" in res["error"]
        assert "ranks [1] differ from rank 0" in res["error"]


def test_a_dead_rank_gives_an_error_with_a_message_not_a_hang(tmp_path):
    results = _spawn(tmp_path, "dead")
    assert "rank 0/2: collective" in results[0]["error"]
    assert "another rank may have died" in results[0]["error"]


def test_config_hash_ignores_devices_and_sees_other_fields(tmp_path):
    a = _cfg(tmp_path)
    b = _cfg(tmp_path)
    b.device = "cuda:1"
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(_cfg(tmp_path, lr=1.0))


def test_rank_sharded_provider_shares_are_disjoint_and_resume_under_any_world_size():
    full = [next(Synthetic()) for _ in range(1)][0]
    shards = [next(RankShardedProvider(Synthetic(), r, 4)) for r in range(4)]
    torch.testing.assert_close(torch.cat(shards), full, rtol=0, atol=0)
    # stride mode: rank r takes batches r, r + W, ...
    stream = Synthetic(batch=4)
    batches = [next(stream) for _ in range(6)]
    p1 = RankShardedProvider(Synthetic(batch=4), 1, 2, mode="stride")
    assert torch.equal(next(p1), batches[1]) and torch.equal(next(p1), batches[3])
    # a position saved under world size 2 resumes under world size 1
    p = RankShardedProvider(Synthetic(), 0, 2)
    next(p), next(p)
    q = RankShardedProvider(Synthetic(), 0, 1)  # fresh: position 0
    q.load_state_dict(p.state_dict())
    ref = Synthetic()
    next(ref), next(ref)
    assert torch.equal(next(q), next(ref))
    with pytest.raises(ValueError, match="does not split"):
        next(RankShardedProvider(Synthetic(batch=3), 0, 2))


def test_init_distributed_without_torchrun_is_single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
