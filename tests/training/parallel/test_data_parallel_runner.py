"""SAETrainingRunner under a 2-rank gloo process group (what torchrun gives it).

``data_parallel_mode="split"``: the run saves once and its SAE equals a single-process
run's. ``"shard"`` (the default for a live model): each rank tokenizes its own documents
and runs the model on their rows, checkpoints carry every rank's data position, a checkpoint resumes exactly
under the same world size and continues (with a warning) in one process."""

from __future__ import annotations

from pathlib import Path

import torch
from spawn_ranks import run_ranks
from tiny_runs import runner_config, tiny_model, token_rows_dataset

WORLD = 2


def _setup(tmp: Path, tag: str, **overrides):
    model, dataset = tiny_model(), token_rows_dataset(300)
    cfg = runner_config(tmp / tag, training_tokens=64 * 12, dead_feature_window=3,
                        wandb_log_frequency=3, **overrides)  # fmt: skip
    return model, dataset, cfg


def _worker(rank: int, world: int, tmp: str, tag: str = "dp", overrides=None) -> dict:
    from fastsae.training import SAETrainingRunner

    overrides = overrides if overrides is not None else {"data_parallel_mode": "split"}
    model, dataset, cfg = _setup(Path(tmp), tag, **overrides)
    runner = SAETrainingRunner(cfg, override_model=model, override_dataset=dataset,
                               show_progress=False)  # fmt: skip
    sae = runner.run()
    store = runner.activations_store
    return {"state": sae.state_dict(), "steps": runner.trainer.state.n_training_steps,
            "world": runner.dist.world_size, "row_shard": store.row_shard,
            "samples": runner.trainer.state.n_training_samples}  # fmt: skip


def test_runner_data_parallel_equals_single_process(tmp_path):
    results = run_ranks(_worker, WORLD, tmp_path / "ranks", str(tmp_path), init_group=False)
    for res in results:
        assert res["world"] == WORLD and res["steps"] == 12

    from fastsae import SAE
    from fastsae.training import SAETrainingRunner

    model, dataset, cfg = _setup(tmp_path, "single")
    single = SAETrainingRunner(cfg, override_model=model, override_dataset=dataset,
                               show_progress=False).run()  # fmt: skip
    for name, value in single.state_dict().items():
        for res in results:
            torch.testing.assert_close(res["state"][name], value, rtol=1e-4, atol=1e-5)
    # rank 0 alone wrote the outputs and one checkpoint folder
    assert (tmp_path / "dp" / "out" / "cfg.json").is_file()
    assert len(list((tmp_path / "dp" / "ck" / "run").iterdir())) == 1
    rows = (tmp_path / "dp" / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len(
        (tmp_path / "single" / "out" / "metrics.jsonl").read_text().splitlines()
    )
    loaded = SAE.load_from_disk(tmp_path / "dp" / "out")
    assert loaded.cfg.d_sae == 64


def test_runner_shard_mode_each_rank_its_rows_and_resume(tmp_path):
    import warnings

    from fastsae.training import SAETrainingRunner

    results = run_ranks(_worker, WORLD, tmp_path / "ranks", str(tmp_path), "shard", {},
                        init_group=False)  # fmt: skip
    for rank, res in enumerate(results):
        assert res["row_shard"] == (rank, WORLD)  # the default for a live model
        assert res["steps"] == 12 and res["samples"] == 12 * 64
        for name, value in results[0]["state"].items():
            assert torch.equal(res["state"][name], value), f"replicas differ: {name}"
    (ck,) = (tmp_path / "shard" / "ck" / "run").iterdir()
    names = {p.name for p in ck.iterdir()}
    assert {"data_state_replica0.pt", "data_state_replica1.pt"} <= names
    # the same world size: exactly the uninterrupted run
    resumed = run_ranks(_worker, WORLD, tmp_path / "ranks2", str(tmp_path), "shard_resume",
                        {"resume_from_checkpoint": str(ck)}, init_group=False)  # fmt: skip
    for res in resumed:
        for name, value in results[0]["state"].items():
            torch.testing.assert_close(res["state"][name], value, rtol=1e-5, atol=1e-6)
    # one process: continues from the furthest position, saying what it skipped
    model, dataset, cfg = _setup(tmp_path, "shard_single", resume_from_checkpoint=str(ck))
    runner = SAETrainingRunner(cfg, override_model=model, override_dataset=dataset,
                               show_progress=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.run()
    assert any("2 data replicas, this run has 1" in str(w.message) for w in caught)
    assert runner.trainer.state.n_training_steps == 12


def test_data_parallel_mode_validated():
    import pytest

    from fastsae.training import LanguageModelSAERunnerConfig, TopKTrainingSAEConfig

    sae = TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4)
    with pytest.raises(ValueError, match="data_parallel_mode"):
        LanguageModelSAERunnerConfig(sae=sae, data_parallel_mode="rows")
    with pytest.raises(ValueError, match="use_cached_activations"):
        LanguageModelSAERunnerConfig(sae=sae, data_parallel_mode="shard",
                                     use_cached_activations=True, cached_activations_path="x")  # fmt: skip
