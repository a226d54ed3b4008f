"""SAETrainingRunner with ``latent_shards=2`` under a 2-rank gloo process group (what
torchrun gives it): the latent-sharded run equals a single-process run, rank 0 saves
one ordinary SAELens directory, and checkpoints resume under the same world size."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

WORLD = 2


def _setup(tmp: Path, tag: str, **overrides):
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
    kwargs = dict(
        sae=TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4),
        model_name="tiny", hook_name="blocks.1.hook_resid_pre", dataset_path="unused",
        context_size=16, prepend_bos=False, train_batch_size_tokens=64,
        store_batch_size_prompts=8, n_batches_in_buffer=4, training_tokens=64 * 8,
        lr=1e-3, max_grad_norm=0.05, dead_feature_window=2, n_checkpoints=1, run_id="run",
        checkpoint_path=str(tmp / tag / "ck"), output_path=str(tmp / tag / "out"),
        wandb_log_frequency=2, eval_every_n_wandb_logs=2, n_eval_batches=1,
        eval_batch_size_prompts=2, seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return model, dataset, LanguageModelSAERunnerConfig(**kwargs)


def _worker(rank: int, port: int, tmp: str) -> None:
    out = Path(tmp) / f"sharded_{rank}.pt"
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        from fastsae.training import SAETrainingRunner
        from fastsae.training.sharded_trainer import LatentShardedSAETrainer

        model, dataset, cfg = _setup(Path(tmp), "ls", latent_shards=WORLD)
        runner = SAETrainingRunner(cfg, override_model=model, override_dataset=dataset,
                                   show_progress=False)  # fmt: skip
        sae = runner.run()
        assert isinstance(runner.trainer, LatentShardedSAETrainer)
        assert runner.trainer.sae.W_enc.shape == (16, 64 // WORLD)
        res = {"state": sae.state_dict(), "steps": runner.trainer.state.n_training_steps,
               "metrics": runner.trainer.last_metrics}  # fmt: skip
        # resume from the mid-run checkpoint (same world size): same final SAE
        (ck,) = (Path(tmp) / "ls" / "ck" / "run").iterdir()
        _, _, cfg2 = _setup(Path(tmp), "ls_resume", latent_shards=WORLD,
                            resume_from_checkpoint=str(ck))  # fmt: skip
        runner2 = SAETrainingRunner(cfg2, override_model=model, override_dataset=dataset,
                                    show_progress=False)  # fmt: skip
        loaded_at = []
        original = LatentShardedSAETrainer.load_checkpoint

        def spy(self, path):
            original(self, path)
            loaded_at.append(self.state.n_training_steps)

        LatentShardedSAETrainer.load_checkpoint = spy
        res["resumed"] = runner2.run().state_dict()
        res["resumed_at"] = loaded_at
        torch.save(res, out)
    except BaseException:  # noqa: BLE001 - report to the test
        torch.save({"exception": traceback.format_exc()}, out)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_runner_latent_sharded_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    results = [torch.load(tmp_path / f"sharded_{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "exception" not in res, f"rank {r}:\n{res['exception']}"
        assert res["steps"] == 8
        assert len(res["resumed_at"]) == 1 and 0 < res["resumed_at"][0] < 8

    from fastsae import SAE
    from fastsae.training import SAETrainingRunner

    model, dataset, cfg = _setup(tmp_path, "single")
    runner = SAETrainingRunner(cfg, override_model=model, override_dataset=dataset,
                               show_progress=False)  # fmt: skip
    single = runner.run()
    for name, value in single.state_dict().items():
        for res in results:
            torch.testing.assert_close(res["state"][name], value, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(res["resumed"][name], value, rtol=1e-4, atol=1e-5)
    for key in ("metrics/l0", "metrics/explained_variance", "losses/overall_loss",
                "sparsity/dead_features"):  # fmt: skip
        for res in results:
            assert res["metrics"][key] == pytest.approx(
                runner.trainer.last_metrics[key], rel=1e-4, abs=1e-5
            ), key
    # rank 0 wrote one ordinary SAELens directory and one checkpoint folder
    out = tmp_path / "ls" / "out"
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors")) == sorted(
        p.name
        for p in (tmp_path / "single" / "out").iterdir()
        if p.suffix in (".json", ".safetensors")
    )
    loaded = SAE.load_from_disk(out)
    assert loaded.cfg.d_sae == 64
    reference = SAE.load_from_disk(tmp_path / "single" / "out")
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    (ck,) = (tmp_path / "ls" / "ck" / "run").iterdir()
    assert {f"trainer_state_rank{r}.pt" for r in range(WORLD)} <= {p.name for p in ck.iterdir()}
    assert SAE.load_from_disk(ck).cfg.d_sae == 64


def test_latent_shards_needs_topk():
    from fastsae.training import (
        JumpReLUTrainingSAEConfig,
        LanguageModelSAERunnerConfig,
        SAETrainingRunner,
    )

    cfg = LanguageModelSAERunnerConfig(
        sae=JumpReLUTrainingSAEConfig(d_in=16, d_sae=64), latent_shards=2, dataset_path="x"
    )
    with pytest.raises(NotImplementedError, match="topk"):
        SAETrainingRunner(cfg)


def test_latent_shards_must_equal_world_size(tmp_path):
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
