"""SAETrainingRunner under a 2-rank gloo process group (what torchrun gives it): the
data-parallel run saves once, and its SAE equals a single-process run's."""

from __future__ import annotations

from pathlib import Path

import torch
from spawn_ranks import run_ranks

WORLD = 2


def _setup(tmp: Path, tag: str):
    import datasets
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from fastsae.training import LanguageModelSAERunnerConfig, TopKTrainingSAEConfig

    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_vocab=50,
            act_fn="relu", d_mlp=32, seed=0,
        )
    ).eval()  # fmt: skip
    rows = torch.randint(1, 50, (300, 16), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = datasets.Dataset.from_dict({"tokens": rows})
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4),
        model_name="tiny", hook_name="blocks.1.hook_resid_pre", dataset_path="unused",
        context_size=16, prepend_bos=False, train_batch_size_tokens=64,
        store_batch_size_prompts=8, n_batches_in_buffer=4, training_tokens=64 * 12,
        lr=1e-3, dead_feature_window=3, n_checkpoints=1, run_id="run",
        checkpoint_path=str(tmp / tag / "ck"), output_path=str(tmp / tag / "out"),
        wandb_log_frequency=3, eval_every_n_wandb_logs=2, n_eval_batches=1,
        eval_batch_size_prompts=2, seed=0,
    )  # fmt: skip
    return model, dataset, cfg


def _worker(rank: int, world: int, tmp: str) -> dict:
    from fastsae.training import SAETrainingRunner

    model, dataset, cfg = _setup(Path(tmp), "dp")
    runner = SAETrainingRunner(cfg, override_model=model, override_dataset=dataset,
                               show_progress=False)  # fmt: skip
    sae = runner.run()
    return {"state": sae.state_dict(), "steps": runner.trainer.state.n_training_steps,
            "world": runner.dist.world_size}  # fmt: skip


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
