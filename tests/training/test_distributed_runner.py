"""SAETrainingRunner under a 2-rank gloo process group (what torchrun gives it): the
data-parallel run saves once, and its SAE equals a single-process run's."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

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


def _worker(rank: int, port: int, tmp: str) -> None:
    out = Path(tmp) / f"runner_{rank}.pt"
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        from fastsae.training import SAETrainingRunner

        model, dataset, cfg = _setup(Path(tmp), "dp")
        runner = SAETrainingRunner(cfg, override_model=model, override_dataset=dataset,
                                   show_progress=False)  # fmt: skip
        sae = runner.run()
        torch.save({"state": sae.state_dict(), "steps": runner.trainer.state.n_training_steps,
                    "world": runner.dist.world_size}, out)  # fmt: skip
    except BaseException:  # noqa: BLE001 - report to the test
        torch.save({"exception": traceback.format_exc()}, out)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_runner_data_parallel_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    results = [torch.load(tmp_path / f"runner_{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "exception" not in res, f"rank {r}:\n{res['exception']}"
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
