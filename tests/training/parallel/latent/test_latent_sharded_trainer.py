"""SAETrainingRunner with ``latent_shards`` under gloo process groups (what torchrun
gives it), for TopK, JumpReLU and standard SAEs:

* pure latent sharding (2 ranks, 2 shards) and a 2 x 2 data-parallel x latent-sharded
  mesh (4 ranks) each equal a single-process run (weights and logged metrics);
* rank 0 saves one ordinary SAELens directory, which loads into a sharded run
  (``from_pretrained_path``); checkpoints hold per-shard state;
* a checkpoint resumes under the same layout, under another one (4 ranks -> 2 shards,
  2 shards -> 4 shards) and in a single process, and a single-process checkpoint
  resumes in a sharded run: every resumed run ends with the uninterrupted run's SAE.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spawn_ranks import run_ranks
from tiny_runs import runner_config, tiny_model, token_rows_dataset

STEPS = 8


def _setup(tmp: Path, tag: str, arch: str = "topk", **overrides):
    from fastsae.training import (
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    model, dataset = tiny_model(), token_rows_dataset(300)
    sae = {
        "topk": lambda: TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4),
        "jumprelu": lambda: JumpReLUTrainingSAEConfig(
            d_in=16,
            d_sae=64,
            l0_coefficient=0.01,
            jumprelu_init_threshold=0.05,
            pre_act_loss_coefficient=0.1,
        ),  # fmt: skip
        "standard": lambda: StandardTrainingSAEConfig(d_in=16, d_sae=64, l1_coefficient=0.05),
        "batchtopk": lambda: BatchTopKTrainingSAEConfig(d_in=16, d_sae=64, k=4.0),
    }[arch]()
    kwargs = dict(training_tokens=64 * STEPS, max_grad_norm=0.05, dead_feature_window=2,
                  wandb_log_frequency=2)  # fmt: skip
    kwargs.update(overrides)
    return model, dataset, runner_config(tmp / tag, sae, **kwargs)


def _train(tmp: Path, tag: str, arch: str, override_sae_seed: int | None = None,
           **overrides) -> dict:  # fmt: skip
    from fastsae.saes.training_sae import TrainingSAE
    from fastsae.training import SAETrainingRunner
    from fastsae.training.parallel.latent import ShardedTrainingSAE

    model, dataset, cfg = _setup(tmp, tag, arch, **overrides)
    override_sae = None
    if override_sae_seed is not None:  # a full SAE the caller built (its own seed)
        from fastsae.saes.training_sae import training_sae_class_for_architecture

        torch.manual_seed(override_sae_seed)
        override_sae = training_sae_class_for_architecture(arch)(cfg.sae)
    # every full training SAE initialised with real tensors (not on the meta device)
    full_builds: list[str] = []
    original_init = TrainingSAE._init_parameters

    def init_spy(self):
        if self.device.type != "meta":
            full_builds.append(type(self).__name__)
        original_init(self)

    TrainingSAE._init_parameters = init_spy
    try:
        runner = SAETrainingRunner(cfg, override_model=model, override_dataset=dataset,
                                   override_sae=override_sae, show_progress=False)  # fmt: skip
        loaded_at: list[int] = []
        gathers: list[tuple] = []
        sae = _run_spying(runner, loaded_at, gathers)
    finally:
        TrainingSAE._init_parameters = original_init
    state = dict(sae.state_dict())
    if isinstance(sae, ShardedTrainingSAE):  # ranks other than 0 return their shard
        state["latents"] = (sae.lo, sae.hi)
    return {
        "state": state,
        "steps": runner.trainer.state.n_training_steps,
        "metrics": runner.trainer.last_metrics,
        "trainer": type(runner.trainer).__name__,
        "local_W_enc": tuple(runner.trainer.sae.W_enc.shape),
        "resumed_at": loaded_at,
        "gathers": gathers,
        "full_builds": full_builds,
    }


def _run_spying(runner, loaded_at: list[int], gathers: list[tuple]):
    """runner.run(), recording the step a resumed trainer continues from and every
    gather of a sharded SAE: ``(device, dst, whether this rank got the full SAE)``."""
    from fastsae.training.parallel.data_parallel import DistributedSAETrainer
    from fastsae.training.parallel.latent import ShardedTrainingSAE
    from fastsae.training.parallel.latent.trainer import LatentShardedSAETrainer
    from fastsae.training.trainer import SAETrainer

    original_gather = ShardedTrainingSAE.gather_full

    def gather_spy(self, device=None, dst=None):
        full = original_gather(self, device, dst)
        gathers.append((str(device), dst, full is not None))
        return full

    patched = {ShardedTrainingSAE: ("gather_full", original_gather)}
    ShardedTrainingSAE.gather_full = gather_spy
    for cls in (SAETrainer, DistributedSAETrainer, LatentShardedSAETrainer):
        if "load_checkpoint" in cls.__dict__:
            original = cls.__dict__["load_checkpoint"]

            def spy(self, path, _original=original):
                _original(self, path)
                loaded_at.append(self.state.n_training_steps)

            patched[cls] = ("load_checkpoint", original)
            cls.load_checkpoint = spy
    try:
        return runner.run()
    finally:
        for cls, (name, original) in patched.items():
            setattr(cls, name, original)


def _worker(rank: int, world: int, tmp: str, tag: str, arch: str, overrides: dict) -> dict:
    overrides = dict(overrides)
    seeds = overrides.pop("override_sae_seeds", None)  # one per rank
    if seeds is not None:
        overrides["override_sae_seed"] = seeds[rank]
    try:
        return _train(Path(tmp), tag, arch, **overrides)
    except ValueError as e:
        if seeds is None:
            raise
        return {"error": str(e)}


def _checkpoint(tmp: Path, tag: str) -> Path:
    (ck,) = (tmp / tag / "ck" / "run").iterdir()
    return ck


def _assert_same_sae(got: dict, want: dict, what: str) -> None:
    """``got``: a full SAE's state, or a shard's (with ``latents = (lo, hi)``), against
    the full ``want``."""
    from fastsae.training.parallel.latent import shard_tensor

    got = dict(got)
    lo_hi = got.pop("latents", None)
    assert set(got) == set(want), what
    for name, value in want.items():
        if lo_hi is not None:
            value = shard_tensor(name, value, *lo_hi)
        torch.testing.assert_close(
            got[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def _eval_rows(run_dir: Path) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl (written by rank 0)."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/metrics/l0" in r]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """Uninterrupted single-process runs (the references), one per architecture."""
    tmp = tmp_path_factory.mktemp("single")
    archs = ("topk", "jumprelu", "standard", "batchtopk")
    return {arch: (tmp, _train(tmp, arch, arch)) for arch in archs}


def test_two_shards_equal_single_process_and_resume(single_runs, tmp_path):
    from fastsae import SAE

    ref_tmp, ref = single_runs["topk"]
    results = run_ranks(_worker, 2, tmp_path / "r", str(tmp_path), "ls", "topk",
                        {"latent_shards": 2})  # fmt: skip
    for res in results:
        assert res["trainer"] == "LatentShardedSAETrainer" and res["steps"] == STEPS
        assert res["local_W_enc"] == (16, 32)
        _assert_same_sae(res["state"], ref["state"], "2 shards")
        assert res["full_builds"] == []  # each rank built its shard only
        for key in ("metrics/l0", "metrics/explained_variance", "losses/overall_loss",
                    "sparsity/dead_features"):  # fmt: skip
            assert res["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4, abs=1e-5)
    # rank 0 returns the full SAE, rank 1 its shard; the full SAE was gathered once, at
    # the end into rank 0's host memory: never for evaluation, nor for the checkpoint
    # (streamed into its file a block at a time)
    assert "latents" not in results[0]["state"] and results[1]["state"]["latents"] == (32, 64)
    assert results[0]["state"]["W_enc"].device.type == "cpu"
    for rank, res in enumerate(results):
        assert res["gathers"] == [("cpu", 0, rank == 0)]
    # the evaluations on the shards equal the single process's on the full SAE
    got, want = _eval_rows(tmp_path / "ls" / "out"), _eval_rows(ref_tmp / "topk" / "out")
    assert len(got) == len(want) == 2
    assert "eval/model_performance_preservation/ce_loss_score" in want[0]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and g["step"] == w["step"]
        for key in [k for k in w if k.startswith("eval/")]:
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key
    # rank 0 wrote one ordinary SAELens directory, equal to the single-process one
    out, ref_out = tmp_path / "ls" / "out", ref_tmp / "topk" / "out"
    files = sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors"))
    assert files == sorted(
        p.name for p in ref_out.iterdir() if p.suffix in (".json", ".safetensors")
    )
    loaded, reference = SAE.load_from_disk(out), SAE.load_from_disk(ref_out)
    _assert_same_sae(loaded.state_dict(), reference.state_dict(), "saved SAE")
    ck = _checkpoint(tmp_path, "ls")
    assert {"trainer_state_shard0.pt", "trainer_state_shard1.pt"} <= {p.name for p in ck.iterdir()}
    assert SAE.load_from_disk(ck).cfg.d_sae == 64
    # resume: the same layout, and one process (latent_shards=1) from the sharded checkpoint
    again = run_ranks(_worker, 2, tmp_path / "r2", str(tmp_path), "ls_again", "topk",
                      {"latent_shards": 2, "resume_from_checkpoint": str(ck)})  # fmt: skip
    single = _train(tmp_path, "ls_single", "topk", resume_from_checkpoint=str(ck))
    for res in [*again, single]:
        assert len(res["resumed_at"]) == 1 and 0 < res["resumed_at"][0] < STEPS
        _assert_same_sae(res["state"], ref["state"], "resumed")
    assert [r["full_builds"] for r in again] == [[], []]  # resumed from the shard's latents
    assert single["full_builds"] == ["TopKTrainingSAE"]
    # a saved SAELens directory as the starting point of a sharded run
    start = {"from_pretrained_path": str(out), "training_tokens": 128, "n_checkpoints": 0}
    fine = run_ranks(_worker, 2, tmp_path / "r3", str(tmp_path), "fp", "topk",
                     {"latent_shards": 2, **start})  # fmt: skip
    fine_single = _train(tmp_path, "fp_single", "topk", **start)
    assert fine_single["steps"] == 2
    fresh = _train(tmp_path, "fresh", "topk", training_tokens=128, n_checkpoints=0)
    assert not torch.allclose(fresh["state"]["W_dec"], fine_single["state"]["W_dec"])
    for res in fine:
        _assert_same_sae(res["state"], fine_single["state"], "from_pretrained_path")
        assert res["full_builds"] == []


def test_mesh_2x2_equals_single_process_and_resumes_on_2_shards(single_runs, tmp_path):
    _, ref = single_runs["jumprelu"]
    results = run_ranks(_worker, 4, tmp_path / "r", str(tmp_path), "mesh", "jumprelu",
                        {"latent_shards": 2, "data_parallel_mode": "split"},
                        timeout=400)  # fmt: skip
    for res in results:
        assert res["trainer"] == "LatentShardedSAETrainer" and res["steps"] == STEPS
        assert res["local_W_enc"] == (16, 32)
        _assert_same_sae(res["state"], ref["state"], "2 x 2 mesh")
        # token means (the explained variance is the mean of the replicas' ratios)
        for key in ("metrics/l0", "losses/overall_loss", "losses/l0_loss",
                    "losses/pre_act_loss", "sparsity/dead_features"):  # fmt: skip
            assert res["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4, abs=1e-5)
    ck = _checkpoint(tmp_path, "mesh")
    resumed = run_ranks(_worker, 2, tmp_path / "r2", str(tmp_path), "mesh_resume", "jumprelu",
                        {"latent_shards": 2, "resume_from_checkpoint": str(ck)})  # fmt: skip
    for res in resumed:
        assert len(res["resumed_at"]) == 1 and 0 < res["resumed_at"][0] < STEPS
        _assert_same_sae(res["state"], ref["state"], "2 x 2 -> 2 shards")


def test_single_process_checkpoint_resumes_on_4_shards(single_runs, tmp_path):
    ref_tmp, ref = single_runs["standard"]
    ck = _checkpoint(ref_tmp, "standard")
    results = run_ranks(_worker, 4, tmp_path / "r", str(tmp_path), "four", "standard",
                        {"latent_shards": 4, "resume_from_checkpoint": str(ck)},
                        timeout=400)  # fmt: skip
    for res in results:
        assert res["local_W_enc"] == (16, 16)
        assert len(res["resumed_at"]) == 1 and 0 < res["resumed_at"][0] < STEPS
        _assert_same_sae(res["state"], ref["state"], "1 -> 4 shards")


def test_batchtopk_two_shards_equal_single_process(single_runs, tmp_path):
    from fastsae import SAE

    ref_tmp, ref = single_runs["batchtopk"]
    results = run_ranks(_worker, 2, tmp_path / "r", str(tmp_path), "btk", "batchtopk",
                        {"latent_shards": 2})  # fmt: skip
    for res in results:
        assert res["steps"] == STEPS
        _assert_same_sae(res["state"], ref["state"], "BatchTopK 2 shards")
        assert res["state"]["topk_threshold"] > 0
    # saved as JumpReLU with the EMA threshold, like the single-process run
    saved, reference = (
        SAE.load_from_disk(tmp_path / "btk" / "out"),
        SAE.load_from_disk(ref_tmp / "batchtopk" / "out"),
    )
    assert saved.cfg.architecture() == "jumprelu"
    _assert_same_sae(saved.state_dict(), reference.state_dict(), "saved BatchTopK")


def test_latent_shards_needs_a_supported_architecture():
    from fastsae.training import (
        GatedTrainingSAEConfig,
        LanguageModelSAERunnerConfig,
        SAETrainingRunner,
    )

    cfg = LanguageModelSAERunnerConfig(
        sae=GatedTrainingSAEConfig(d_in=16, d_sae=64), latent_shards=2, dataset_path="x"
    )
    with pytest.raises(NotImplementedError, match="not 'gated'"):
        SAETrainingRunner(cfg)


def test_latent_shards_must_divide_world_size(tmp_path):
    from fastsae.training import SAETrainingRunner

    model, dataset, cfg = _setup(tmp_path, "one", latent_shards=2)
    with pytest.raises(ValueError, match="WORLD_SIZE=1"):
        SAETrainingRunner(cfg, override_model=model, override_dataset=dataset)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_latent_shards_validated(bad):
    from fastsae.training import LanguageModelSAERunnerConfig, TopKTrainingSAEConfig

    with pytest.raises(ValueError, match="latent_shards"):
        LanguageModelSAERunnerConfig(sae=TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4),
                                     latent_shards=bad)  # fmt: skip
    with pytest.raises(ValueError, match="divide"):
        LanguageModelSAERunnerConfig(sae=TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4),
                                     latent_shards=3)  # fmt: skip


def test_override_sae_is_sharded_and_checked(single_runs, tmp_path):
    """A full SAE handed to the runner (``override_sae``) is what a sharded run trains,
    the same as one process training it; ranks handed different SAEs are refused."""
    _, default = single_runs["topk"]
    single = _train(tmp_path, "ov_single", "topk", override_sae_seed=7)
    assert single["full_builds"] == []  # the runner built no SAE of its own
    assert not torch.allclose(single["state"]["W_dec"], default["state"]["W_dec"])
    sharded = run_ranks(_worker, 2, tmp_path / "r", str(tmp_path), "ov", "topk",
                        {"latent_shards": 2, "override_sae_seeds": [7, 7]})  # fmt: skip
    for res in sharded:
        assert res["local_W_enc"] == (16, 32)
        _assert_same_sae(res["state"], single["state"], "override_sae on 2 shards")
    refused = run_ranks(_worker, 2, tmp_path / "r2", str(tmp_path), "ov_bad", "topk",
                        {"latent_shards": 2, "override_sae_seeds": [7, 8]})  # fmt: skip
    for res in refused:
        assert "rank 1's initial SAE differs from rank 0's" in res["error"]
