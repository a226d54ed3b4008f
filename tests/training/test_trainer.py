"""SAETrainer on a synthetic activation stream: the step equals a hand-written sae-lens
step, resumed runs equal uninterrupted ones exactly, dead latents, metrics and plots,
Ctrl-C checkpoints, errors, and activation-norm scaling folded at the end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput as SLTrainStepInput
from sae_lens.training.optim import get_lr_scheduler as sl_get_lr_scheduler
from sae_testing import assert_close

from fastsae.saes import training_sae_class_for_architecture
from fastsae.training import (
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    LanguageModelSAERunnerConfig,
    SAETrainer,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
)
from fastsae.training.checkpoints import TRAINER_STATE_FILENAME

D_IN, D_SAE, BATCH = 16, 64, 32


class SyntheticActivations:
    """``[batch, d_in]`` activations from a seeded generator, with a resumable position.

    ``interrupt_at``: raise KeyboardInterrupt instead of producing batch number
    ``interrupt_at`` (0-based), as a Ctrl-C inside the data pipeline would.
    """

    def __init__(self, d_in=D_IN, batch=BATCH, seed=0, scale=1.0, interrupt_at=None):
        self.d_in, self.batch, self.scale = d_in, batch, scale
        self.generator = torch.Generator().manual_seed(seed)
        # a fixed random basis: the data has structure an SAE can learn
        self.basis = torch.randn(3 * d_in, d_in, generator=self.generator) / math.sqrt(d_in)
        self.count = 0
        self.interrupt_at = interrupt_at

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.interrupt_at is not None and self.count == self.interrupt_at:
            raise KeyboardInterrupt
        self.count += 1
        codes = torch.rand(self.batch, self.basis.shape[0], generator=self.generator)
        codes = codes * (codes > 0.85)
        noise = 0.05 * torch.randn(self.batch, self.d_in, generator=self.generator)
        return self.scale * (codes @ self.basis + noise)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.count = state["count"]


def _cfg(tmp_path, sae_cfg, n_steps, **kwargs) -> LanguageModelSAERunnerConfig:
    kwargs.setdefault("lr", 3e-3)
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        dataset_path="unused",
        training_tokens=n_steps * BATCH,
        train_batch_size_tokens=BATCH,
        checkpoint_path=str(tmp_path / "ck"),
        output_path=str(tmp_path / "out"),
        **kwargs,
    )


def _sae(sae_cfg, seed=0):
    torch.manual_seed(seed)
    sae = training_sae_class_for_architecture(sae_cfg.architecture())(copy.deepcopy(sae_cfg))
    with torch.no_grad():  # non-zero biases from the start
        if hasattr(sae, "b_enc") and sae.b_enc is not None:
            sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
    return sae


def _trainer(cfg, sae, provider, run_dir, **kwargs) -> SAETrainer:
    return SAETrainer(cfg, sae, provider, run_dir=run_dir, show_progress=False, **kwargs)


def _record_losses(trainer: SAETrainer) -> list[dict[str, float]]:
    """Wrap ``trainer.step`` so every step's losses are kept (as floats)."""
    record: list[dict[str, float]] = []
    step = trainer.step

    def recording_step(batch):
        out = step(batch)
        losses = {k: float(v.detach()) for k, v in out.losses.items()}
        losses["loss"] = float(out.loss.detach())
        record.append(losses)
        return out

    trainer.step = recording_step  # type: ignore[method-assign]
    return record


# ---------------------------------------------------------------------------- (a) the step
def test_trainer_steps_equal_a_hand_written_sae_lens_loop(tmp_path):
    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, aux_loss_coefficient=0.5)
    # dead_feature_window=1: latents silent for 2 steps are dead, so AuxK joins from step 3
    cfg = _cfg(tmp_path, sae_cfg, 10, lr_warm_up_steps=2, dead_feature_window=1)
    ours = _sae(sae_cfg)
    sl_cls, sl_cfg_cls = get_sae_training_class("topk")
    theirs = sl_cls(sl_cfg_cls(d_in=D_IN, d_sae=D_SAE, k=5, aux_loss_coefficient=0.5))
    theirs.load_state_dict(ours.state_dict())
    initial = {k: v.clone() for k, v in ours.state_dict().items()}
    trainer = _trainer(cfg, ours, iter(()), tmp_path / "run")

    optimizer = torch.optim.Adam(theirs.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = sl_get_lr_scheduler(
        "constant",
        optimizer,
        training_steps=cfg.total_training_steps,
        lr=cfg.lr,
        warm_up_steps=2,
        decay_steps=0,
        lr_end=cfg.lr_end,
        num_cycles=1,
    )
    since_fired = torch.zeros(D_SAE)
    data = SyntheticActivations()
    clipped = []
    for step in range(4):
        batch = next(data)
        out_o = trainer.step(batch)

        mask = since_fired > cfg.dead_feature_window
        out_t = theirs.training_forward_pass(SLTrainStepInput(batch, {}, mask, step, False))
        fired = (out_t.feature_acts != 0).any(0)
        since_fired += 1
        since_fired[fired] = 0
        out_t.loss.backward()
        clipped.append(float(torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)))
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

        for name in out_t.losses:
            ref = float(out_t.losses[name].detach())
            assert float(out_o.losses[name].detach()) == pytest.approx(ref, rel=1e-5, abs=1e-12), (
                name
            )
        assert torch.equal(trainer.dead_neurons, since_fired > cfg.dead_feature_window)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-12
        )
    assert max(clipped) > 1.0  # clipping took part
    assert trainer.dead_neurons.any()  # and so did AuxK
    assert float(out_t.losses["auxiliary_reconstruction_loss"].detach()) > 0
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.detach(), theirs_params[name].detach(), 1e-5, name)
        # the updates themselves (fused vs for-loop Adam round differently, hence 1e-4)
        update, ref_update = (
            p.detach() - initial[name],
            theirs_params[name].detach() - initial[name],
        )
        assert_close(update, ref_update, 1e-4, f"update of {name}")


# ---------------------------------------------------------------------------- (b) resume
RESUME_CASES = {
    "topk": (
        TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),
        {"dead_feature_window": 2},
    ),
    "jumprelu-l0-warmup": (
        JumpReLUTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            l0_coefficient=0.3,
            l0_warm_up_steps=7,
            pre_act_loss_coefficient=0.01,
            jumprelu_init_threshold=0.05,
        ),
        {
            "dead_feature_window": 2,
            "lr_scheduler_name": "cosineannealing",
            "lr_warm_up_steps": 2,
            "lr_decay_steps": 2,
        },
    ),
    "batchtopk": (
        BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3.5, topk_threshold_lr=0.2),
        {"dead_feature_window": 2, "feature_sampling_window": 3},
    ),
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resumed_run_equals_uninterrupted_run(name, tmp_path):
    sae_cfg, extra = RESUME_CASES[name]
    n_steps = 10
    cfg = _cfg(tmp_path / "a", sae_cfg, n_steps, n_checkpoints=1, **extra)
    full = _trainer(cfg, _sae(sae_cfg), SyntheticActivations(), tmp_path / "a" / "run")
    full_losses = _record_losses(full)
    full_sae = full.fit()
    assert len(full_losses) == n_steps

    # the checkpoint was written midway (after more than half the samples)
    checkpoints = [p for p in (tmp_path / "a" / "ck").iterdir() if not p.name.startswith(".")]
    assert len(checkpoints) == 1
    checkpoint = checkpoints[0]
    done = int(checkpoint.name) // BATCH
    assert 0 < done < n_steps
    assert (checkpoint / TRAINER_STATE_FILENAME).is_file()

    cfg_b = _cfg(tmp_path / "b", sae_cfg, n_steps, n_checkpoints=1, **extra)
    # a fresh SAE with other weights and a fresh data stream: everything comes from the checkpoint
    resumed = _trainer(cfg_b, _sae(sae_cfg, seed=99), SyntheticActivations(), tmp_path / "b")
    resumed.load_checkpoint(checkpoint)
    assert resumed.state.n_training_steps == done
    resumed_losses = _record_losses(resumed)
    resumed_sae = resumed.fit()

    assert resumed_losses == full_losses[done:]
    for key, value in full_sae.state_dict().items():
        assert torch.equal(resumed_sae.state_dict()[key], value), key
    assert torch.equal(resumed.n_forward_passes_since_fired, full.n_forward_passes_since_fired)
    assert torch.equal(resumed.act_freq_scores, full.act_freq_scores)
    assert resumed.get_coefficients() == full.get_coefficients()
    if name.startswith("jumprelu"):
        # the checkpoint fell inside the l0 warm-up, so the scheduler state mattered
        assert done < sae_cfg.l0_warm_up_steps
        assert full_losses[done]["l0_loss"] != full_losses[-1]["l0_loss"]
    if name == "batchtopk":
        assert float(resumed_sae.topk_threshold) == float(full_sae.topk_threshold) != 0.0


def test_load_checkpoint_restores_the_batchtopk_threshold_buffer(tmp_path):
    """BatchTopK's threshold is a buffer, not a parameter: a fresh SAE gets it back."""
    sae_cfg, extra = RESUME_CASES["batchtopk"]
    cfg = _cfg(tmp_path, sae_cfg, 6, n_checkpoints=1, **extra)
    trainer = _trainer(cfg, _sae(sae_cfg), SyntheticActivations(), tmp_path / "run")
    trainer.fit()
    checkpoint = next(p for p in (tmp_path / "ck").iterdir() if not p.name.startswith("."))
    fresh = _trainer(cfg, _sae(sae_cfg, seed=5), SyntheticActivations(), tmp_path / "r2")
    assert float(fresh.sae.topk_threshold) == 0.0
    fresh.load_checkpoint(checkpoint)
    assert float(fresh.sae.topk_threshold) > 0.0


# ---------------------------------------------------------------------------- (c) dead latents
def test_a_latent_that_never_fires_becomes_dead_after_the_window(tmp_path):
    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    window = 3
    cfg = _cfg(tmp_path, sae_cfg, 20, dead_feature_window=window)
    sae = _sae(sae_cfg)
    silent = 11
    with torch.no_grad():
        sae.b_enc[silent] = -1e4  # never among the top k
    trainer = _trainer(cfg, sae, SyntheticActivations(), tmp_path / "run")
    data = SyntheticActivations()
    for step in range(1, window + 3):
        out = trainer.step(next(data))
        assert out.fired()[silent] == 0
        assert trainer.n_forward_passes_since_fired[silent] == step
        assert bool(trainer.dead_neurons[silent]) is (step > window), step
        if step == window + 2:
            # the step after it died saw it in the mask: AuxK is on
            assert float(out.losses["auxiliary_reconstruction_loss"].detach()) > 0
    assert trainer.feature_sparsity[silent] == 0
    # dead means silent for more than the window, nothing else
    assert torch.equal(trainer.dead_neurons, trainer.n_forward_passes_since_fired > window)
    assert (~trainer.dead_neurons).sum() >= 4  # the latents that fire are alive


# ---------------------------------------------------------------------------- (d) metrics
def test_metrics_jsonl_and_training_curves(tmp_path):
    pytest.importorskip("matplotlib")
    sae_cfg = JumpReLUTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, l0_coefficient=0.1, l0_warm_up_steps=4
    )
    cfg = _cfg(
        tmp_path,
        sae_cfg,
        6,
        wandb_log_frequency=2,
        eval_every_n_wandb_logs=1,
        feature_sampling_window=3,
        dead_feature_window=2,
    )
    calls = []

    def evaluator(sae):
        calls.append(sae.training)
        return {"eval/custom": 1.5}

    trainer = _trainer(
        cfg, _sae(sae_cfg), SyntheticActivations(), tmp_path / "run", evaluator=evaluator
    )
    trainer.fit()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    step_rows = [r for r in rows if "losses/overall_loss" in r]
    assert [r["step"] for r in step_rows] == [2, 4, 6]
    expected = {
        "step",
        "losses/overall_loss",
        "losses/mse_loss",
        "losses/l0_loss",
        "metrics/explained_variance",
        "metrics/explained_variance_legacy",
        "metrics/l0",
        "metrics/mse",
        "sparsity/dead_features",
        "sparsity/mean_passes_since_fired",
        "details/current_learning_rate",
        "details/n_training_samples",
        "details/l0_coefficient",
    }
    for row in step_rows:
        assert expected <= set(row), expected - set(row)
        assert row["details/n_training_samples"] == row["step"] * BATCH
        assert math.isfinite(row["losses/overall_loss"])
        assert row["losses/overall_loss"] == pytest.approx(
            row["losses/mse_loss"] + row["losses/l0_loss"], rel=1e-5
        )
    # the l0 coefficient warms up: 2/4, then 4/4 of its value after steps 2 and 4
    assert [r["details/l0_coefficient"] for r in step_rows] == pytest.approx([0.05, 0.1, 0.1])
    sparsity_rows = [r for r in rows if "metrics/mean_log10_feature_sparsity" in r]
    assert [r["step"] for r in sparsity_rows] == [3]
    eval_rows = [r for r in rows if "eval/custom" in r]
    assert [r["step"] for r in eval_rows] == [2, 4, 6]
    assert calls == [False, False, False]  # evaluated in eval mode
    png = tmp_path / "run" / "training_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert trainer.sae.cfg.metadata.l0 is not None


def test_topk_metrics_report_exactly_k(tmp_path):
    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    cfg = _cfg(tmp_path, sae_cfg, 2, wandb_log_frequency=1)
    trainer = _trainer(cfg, _sae(sae_cfg), SyntheticActivations(), tmp_path / "run")
    trainer.fit()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["metrics/l0"] for r in rows] == [4.0, 4.0]
    assert "losses/auxiliary_reconstruction_loss" in rows[0]
    assert trainer.last_metrics["metrics/l0"] == 4.0


# ---------------------------------------------------------------------------- (e) Ctrl-C
def test_keyboard_interrupt_saves_a_checkpoint_that_resumes(tmp_path):
    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    n_steps, stop = 8, 5
    reference = _trainer(
        _cfg(tmp_path / "ref", sae_cfg, n_steps, dead_feature_window=2, wandb_log_frequency=1),
        _sae(sae_cfg),
        SyntheticActivations(),
        tmp_path / "ref" / "run",
    )
    reference_losses = _record_losses(reference)
    reference.fit()

    cfg = _cfg(tmp_path, sae_cfg, n_steps, dead_feature_window=2, wandb_log_frequency=1)
    trainer = _trainer(
        cfg, _sae(sae_cfg), SyntheticActivations(interrupt_at=stop), tmp_path / "run"
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    checkpoint = tmp_path / "ck" / f"interrupted_{stop * BATCH}"
    assert (checkpoint / TRAINER_STATE_FILENAME).is_file()
    assert (checkpoint / "sae_weights.safetensors").is_file()

    resumed = _trainer(cfg, _sae(sae_cfg, seed=3), SyntheticActivations(), tmp_path / "run")
    resumed.load_checkpoint(checkpoint)
    resumed_losses = _record_losses(resumed)
    final = resumed.fit()
    assert resumed_losses == reference_losses[stop:]
    for key, value in reference.sae.state_dict().items():
        assert torch.equal(final.state_dict()[key], value), key
    # the resumed run's metrics file has no rows past the checkpoint twice
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, n_steps + 1))


# ---------------------------------------------------------------------------- (f) errors
def test_wrong_width_batch_is_named(tmp_path):
    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    trainer = _trainer(_cfg(tmp_path, sae_cfg, 2), _sae(sae_cfg), iter(()), None)
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        trainer.step(torch.randn(BATCH, D_IN + 1))
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        trainer.step(torch.randn(D_IN))
    assert trainer.state.n_training_samples == 0  # nothing counted


def test_load_checkpoint_errors_name_the_files(tmp_path):
    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    cfg = _cfg(tmp_path, sae_cfg, 4)
    trainer = _trainer(cfg, _sae(sae_cfg), SyntheticActivations(), None)
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"not_a_checkpoint.*{TRAINER_STATE_FILENAME}"):
        trainer.load_checkpoint(empty)
    # a checkpoint written without a data position cannot resume a provider that has one
    path = _trainer(cfg, _sae(sae_cfg), iter(()), None).save_checkpoint("no_data")
    with pytest.raises(FileNotFoundError, match="data_state.pt"):
        trainer.load_checkpoint(path)


# ---------------------------------------------------------------------------- (g) norm scaling
@pytest.mark.parametrize(
    "sae_cfg",
    [
        TopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=4, normalize_activations="expected_average_only_in"
        ),
        StandardTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, normalize_activations="expected_average_only_in"
        ),
    ],
    ids=["topk", "standard"],
)
def test_expected_average_only_in_is_estimated_and_folded(sae_cfg, tmp_path):
    scale, n_estimate = 25.0, 3
    cfg = _cfg(tmp_path, sae_cfg, 4, n_batches_for_norm_estimate=n_estimate)
    sae = _sae(sae_cfg)
    trainer = _trainer(cfg, sae, SyntheticActivations(scale=scale), tmp_path / "run")
    captured = {}
    fold = sae.fold_activation_norm_scaling_factor

    def spy(factor):
        captured["factor"] = factor
        captured["trained"] = copy.deepcopy(sae)
        fold(factor)

    sae.fold_activation_norm_scaling_factor = spy
    seen = []
    step = trainer.step
    trainer.step = lambda batch: seen.append(batch.clone()) or step(batch)
    result = trainer.fit()

    # the factor: sqrt(d_in) / mean norm of the first n_estimate batches
    data = SyntheticActivations(scale=scale)
    norms = torch.cat([next(data).norm(dim=-1) for _ in range(n_estimate)])
    expected = math.sqrt(D_IN) / float(norms.mean())
    assert captured["factor"] == pytest.approx(expected, rel=1e-5)
    # training used the 4 batches after the estimate's, raw (the trainer scales them)
    assert len(seen) == 4 and torch.equal(seen[0], next(data))
    assert result.cfg.normalize_activations == "none"
    assert trainer.scaler.scaling_factor is None

    factor = captured["factor"]
    trained = captured["trained"]
    x = torch.cat([next(data) for _ in range(2)])
    with torch.no_grad():
        trained.eval()
        result.eval()
        # the returned SAE on raw inputs = the trained SAE on scaled inputs (rescaled back)
        assert_close(result(x) * factor, trained(x * factor), 1e-5, "reconstruction")
        assert torch.equal(result.encode(x) != 0, trained.encode(x * factor) != 0)
        if isinstance(sae_cfg, StandardTrainingSAEConfig):
            assert_close(result.encode(x), trained.encode(x * factor), 1e-5, "features")


def test_keyboard_interrupt_inside_the_step_saves_a_consistent_checkpoint(tmp_path):
    """Ctrl-C most often lands inside the step (that is where the time goes): the
    checkpoint must still describe a state from which the run resumes exactly."""
    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    n_steps, stop = 8, 5
    reference = _trainer(
        _cfg(tmp_path / "ref", sae_cfg, n_steps, dead_feature_window=2),
        _sae(sae_cfg),
        SyntheticActivations(),
        tmp_path / "ref" / "run",
    )
    reference_losses = _record_losses(reference)
    reference.fit()

    cfg = _cfg(tmp_path, sae_cfg, n_steps, dead_feature_window=2)
    sae = _sae(sae_cfg)
    forward = sae.training_forward_pass
    calls = []

    def interrupted_forward(step_input):
        calls.append(1)
        if len(calls) == stop + 1:
            raise KeyboardInterrupt
        return forward(step_input)

    sae.training_forward_pass = interrupted_forward
    trainer = _trainer(cfg, sae, SyntheticActivations(), tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    (checkpoint,) = (tmp_path / "ck").glob("interrupted_*")

    resumed = _trainer(cfg, _sae(sae_cfg, seed=3), SyntheticActivations(), tmp_path / "run")
    resumed.load_checkpoint(checkpoint)
    resumed_losses = _record_losses(resumed)
    final = resumed.fit()
    assert resumed_losses == reference_losses[stop:]
    for key, value in reference.sae.state_dict().items():
        assert torch.equal(final.state_dict()[key], value), key


# ---------------------------------------------------------------------------- checkpoint format
CHECKPOINT_CASES = [
    TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),
    BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3.5),
    JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE),
]


def _final_checkpoint(tmp_path, sae_cfg):
    cfg = _cfg(tmp_path, sae_cfg, 3, save_final_checkpoint=True)
    trainer = _trainer(cfg, _sae(sae_cfg), SyntheticActivations(), tmp_path / "run")
    sae = trainer.fit()
    (checkpoint,) = (tmp_path / "ck").glob("final_*")
    return sae, checkpoint


@pytest.mark.parametrize("sae_cfg", CHECKPOINT_CASES, ids=lambda c: c.architecture())
def test_checkpoints_load_as_training_saes_in_sae_lens(sae_cfg, tmp_path):
    from sae_lens.saes.sae import TrainingSAE as SLTrainingSAE

    sae, checkpoint = _final_checkpoint(tmp_path, sae_cfg)
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert (checkpoint / name).is_file(), name
    theirs = SLTrainingSAE.load_from_disk(checkpoint)
    assert theirs.cfg.architecture() == sae_cfg.architecture()
    theirs_state = theirs.state_dict()
    for key, value in sae.state_dict().items():
        if key == "topk_threshold":  # sae-lens casts every loaded tensor to the SAE dtype
            assert float(theirs_state[key]) == pytest.approx(float(value), rel=1e-6)
        else:
            assert torch.equal(theirs_state[key], value), key


@pytest.mark.parametrize("sae_cfg", CHECKPOINT_CASES, ids=lambda c: c.architecture())
def test_checkpoints_load_as_training_saes_in_fastsae(sae_cfg, tmp_path):
    from fastsae.saes import TrainingSAE

    sae, checkpoint = _final_checkpoint(tmp_path, sae_cfg)
    ours = TrainingSAE.load_from_disk(checkpoint)
    assert type(ours) is type(sae)
    for key, value in sae.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_covariance_whitening_is_estimated_applied_and_folded(tmp_path):
    sae_cfg = TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, normalize_activations="covariance_whitening"
    )
    cfg = _cfg(tmp_path, sae_cfg, 3, n_batches_for_norm_estimate=8)
    sae = _sae(sae_cfg)
    seen = []
    forward = sae.training_forward_pass
    sae.training_forward_pass = lambda step_input: (
        seen.append(step_input.sae_in) or forward(step_input)
    )
    raw = SyntheticActivations(scale=3.0)
    result = _trainer(cfg, sae, SyntheticActivations(scale=3.0), tmp_path / "run").fit()
    first = next(raw)
    assert first.mean(0).norm() > 1.0  # the raw data is far from centred
    # the SAE was trained on whitened (centred, unit-covariance) activations ...
    assert torch.cat(seen).mean(0).norm() < 1.5  # raw: ~3.4; whitened: ~0.5 (96 samples)
    # ... and the whitening was folded into the returned SAE
    assert result.cfg.normalize_activations == "none"


def test_sigint_finishes_the_step_then_checkpoints_and_resumes(tmp_path):
    """A real Ctrl-C (SIGINT) mid-run: the current step completes, an interrupted_*
    checkpoint is written at that step boundary, and resuming it equals the full run."""
    import os
    import signal

    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    n_steps, stop = 8, 3
    reference = _trainer(
        _cfg(tmp_path / "ref", sae_cfg, n_steps), _sae(sae_cfg), SyntheticActivations(),
        tmp_path / "ref" / "run",
    )  # fmt: skip
    reference_losses = _record_losses(reference)
    reference.fit()

    class SignallingActivations(SyntheticActivations):
        def __init__(self):
            super().__init__()
            self.drawn = 0

        def __next__(self):
            self.drawn += 1
            if self.drawn == stop:
                os.kill(os.getpid(), signal.SIGINT)  # lands while this batch is drawn
            return super().__next__()

    cfg = _cfg(tmp_path, sae_cfg, n_steps)
    trainer = _trainer(cfg, _sae(sae_cfg), SignallingActivations(), tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.n_training_steps == stop  # the signalled step still ran
    (checkpoint,) = (tmp_path / "ck").glob("interrupted_*")
    resumed = _trainer(cfg, _sae(sae_cfg, seed=3), SyntheticActivations(), tmp_path / "run")
    resumed.load_checkpoint(checkpoint)
    resumed_losses = _record_losses(resumed)
    final = resumed.fit()
    assert resumed_losses == reference_losses[stop:]
    for key, value in reference.sae.state_dict().items():
        assert torch.equal(final.state_dict()[key], value), key


def test_fused_adam_where_torch_has_it():
    from fastsae.training.optim import fused_adam_kwargs

    cpu = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2).bfloat16())]
    assert fused_adam_kwargs(cpu) == {"fused": True}
    torch.optim.Adam(cpu, **fused_adam_kwargs(cpu)).step()  # torch accepts it
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert fused_adam_kwargs(meta) == {}
    assert fused_adam_kwargs([*cpu, *meta]) == {}  # one device only
