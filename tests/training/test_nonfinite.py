"""NaN/inf in a training run: a non-finite step stops the run with NonFiniteLossError at
that step (naming the step and the batch rows), applies nothing and writes no
non-finite checkpoint; ``skip_nonfinite_batches`` skips the batch instead (the run then
equals one that never saw it); data-parallel and latent-sharded ranks stop or skip
together (gloo, spawned processes)."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from spawn_ranks import run_ranks

from fastsae.saes import training_sae_class_for_architecture
from fastsae.training import (
    LanguageModelSAERunnerConfig,
    NonFiniteLossError,
    SAETrainer,
    TopKTrainingSAEConfig,
)

D_IN, D_SAE, BATCH, N_STEPS = 16, 64, 32, 8


class Stream:
    """Seeded ``[batch, d_in]`` activations with a resumable position; ``poison``:
    ``{batch index: (rows, value)}`` writes ``value`` into those rows of that batch;
    ``extra``: ``{batch index: tensor}`` inserts a whole batch before that one."""

    def __init__(self, batch=BATCH, poison=None, extra=None):
        self.batch, self.poison, self.extra = batch, poison or {}, extra or {}
        self.generator = torch.Generator().manual_seed(0)
        self.basis = torch.randn(3 * D_IN, D_IN, generator=self.generator) / math.sqrt(D_IN)
        self.count = 0
        self.inserted: set[int] = set()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.count in self.extra and self.count not in self.inserted:
            self.inserted.add(self.count)
            return self.extra[self.count].clone()
        codes = torch.rand(self.batch, self.basis.shape[0], generator=self.generator)
        codes = codes * (codes > 0.85)
        noise = 0.05 * torch.randn(self.batch, D_IN, generator=self.generator)
        out = codes @ self.basis + noise
        if self.count in self.poison:
            rows, value = self.poison[self.count]
            out[rows, 1] = value
        self.count += 1
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.count = state["count"]


def _cfg(tmp: Path, **kwargs) -> LanguageModelSAERunnerConfig:
    kwargs.setdefault("lr", 3e-3)
    kwargs.setdefault("n_checkpoints", 1)
    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),
        dataset_path="unused",
        training_tokens=N_STEPS * BATCH,
        train_batch_size_tokens=BATCH,
        checkpoint_path=str(tmp / "ck"),
        output_path=str(tmp / "out"),
        logger={"wandb_log_frequency": 1},
        **kwargs,
    )


def _sae(cfg, seed=0):
    torch.manual_seed(seed)
    return training_sae_class_for_architecture("topk")(copy.deepcopy(cfg.sae))


def _trainer(cfg, data, tmp: Path) -> SAETrainer:
    return SAETrainer(cfg, _sae(cfg), data, run_dir=tmp / "run", show_progress=False)


def _params(trainer: SAETrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.sae.named_parameters()}


def _checkpoints(tmp: Path) -> list[str]:
    ck = tmp / "ck"
    return sorted(p.name for p in ck.iterdir() if not p.name.startswith(".")) if ck.is_dir() else []


def test_nan_activations_stop_the_run_at_their_step_naming_the_rows(tmp_path):
    # batch 5 (step 6) has a NaN in row 3 and an inf in row 7: steps 1-5 train, and the
    # checkpoint after step 5 (160 samples > threshold 128) is written and finite
    data = Stream(poison={5: ([3, 7], float("nan"))})
    data_inf = Stream(poison={5: ([7], float("inf"))})
    for stream in (data, data_inf):
        stream_tmp = tmp_path / str(id(stream))
        trainer = _trainer(_cfg(stream_tmp), stream, stream_tmp)
        reference = _trainer(_cfg(stream_tmp / "ref"), Stream(), stream_tmp / "ref")
        for _ in range(5):
            reference.step(next(reference.data_provider))
        with pytest.raises(NonFiniteLossError, match="non-finite training step 6") as info:
            trainer.fit()
        rows = [3, 7] if stream is data else [7]
        assert info.value.step == 6 and info.value.rows == rows
        assert f"rows [{', '.join(map(str, rows))}] of the batch hold non-finite" in str(info.value)
        # nothing of step 6 was applied: the weights are those after 5 steps, finite
        assert trainer.state.n_training_steps == 5
        for name, value in _params(trainer).items():
            assert torch.isfinite(value).all(), name
            assert torch.equal(value, _params(reference)[name]), name
        # the one checkpoint is the good one (written before the bad step)
        assert _checkpoints(stream_tmp) == ["160"]
        saved = SAETrainer(
            _cfg(stream_tmp), _sae(_cfg(stream_tmp), 5), Stream(), show_progress=False
        )
        saved.load_checkpoint(stream_tmp / "ck" / "160")
        for name, value in _params(saved).items():
            assert torch.equal(value, _params(reference)[name]), name


def test_finite_inputs_that_overflow_are_reported_as_an_overflow(tmp_path):
    huge = torch.full((BATCH, D_IN), 1e30)  # finite, but the squared error is inf
    trainer = _trainer(_cfg(tmp_path), Stream(extra={2: huge}), tmp_path)
    with pytest.raises(NonFiniteLossError, match="activations are finite") as info:
        trainer.fit()
    assert info.value.step == 3 and info.value.rows == []


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_a_nan_gradient_under_a_finite_loss_is_caught(max_grad_norm, tmp_path):
    """The gradient norm is checked too (the clipping's, or computed when clipping is
    off): a NaN that reaches only the gradients (here injected into W_dec's at step 4)
    stops the run before the optimizer applies it."""
    trainer = _trainer(_cfg(tmp_path, max_grad_norm=max_grad_norm), Stream(), tmp_path)

    def poison(grad: torch.Tensor) -> torch.Tensor:
        if trainer.state.n_training_steps == 3:
            grad = grad.clone()
            grad[0, 0] = float("nan")
        return grad

    trainer.sae.W_dec.register_hook(poison)
    before = {}
    step = trainer.step

    def keeping_step(batch):
        before.update(_params(trainer))
        return step(batch)

    trainer.step = keeping_step  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError, match="gradient norm=nan; the batch's activations"):
        trainer.fit()
    assert trainer.state.n_training_steps == 3
    for name, value in _params(trainer).items():
        assert torch.equal(value, before[name]), name


def test_skip_nonfinite_batches_equals_a_run_without_the_batch(tmp_path):
    bad = torch.randn(BATCH, D_IN)
    bad[[4, 9], 2] = float("nan")
    # the bad batch comes right after step 3, where a sparsity window (3 steps) ends
    clean = _trainer(_cfg(tmp_path / "a", feature_sampling_window=3), Stream(), tmp_path / "a")
    clean.fit()
    skipping = _trainer(
        _cfg(tmp_path / "b", skip_nonfinite_batches=True, feature_sampling_window=3),
        Stream(extra={3: bad}),
        tmp_path / "b",
    )
    with pytest.warns(UserWarning, match=r"skipped a batch .*rows \[4, 9\]"):
        skipping.fit()
    assert skipping.state.n_skipped_batches == 1
    assert skipping.state.n_training_steps == clean.state.n_training_steps == N_STEPS
    for name, value in _params(clean).items():
        assert torch.equal(_params(skipping)[name], value), name
    rows = skipping.metrics.rows()
    assert {"step": 3, "details/n_skipped_batches": 1} in rows
    # otherwise the same metrics rows (the window's sparsity row logged once)
    assert [r for r in rows if "details/n_skipped_batches" not in r] == clean.metrics.rows()
    # the checkpoints are those of the clean run, and finite
    assert _checkpoints(tmp_path / "b") == _checkpoints(tmp_path / "a") == ["160"]


def test_skip_stops_when_every_batch_is_non_finite(tmp_path):
    poison = {i: ([0], float("nan")) for i in range(200)}
    trainer = _trainer(_cfg(tmp_path, skip_nonfinite_batches=True), Stream(poison=poison), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteLossError, match="101 batches in a row"):
            trainer.fit()
    assert trainer.state.n_training_steps == 0


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """An update that overflows (simulated: inf written into W_dec by step 5's
    optimizer step) stops the run before the checkpoint after that step is written,
    even with skip_nonfinite_batches (skipping cannot repair the weights)."""
    for skip in (False, True):
        tmp = tmp_path / str(skip)
        trainer = _trainer(_cfg(tmp, skip_nonfinite_batches=skip), Stream(), tmp)
        optimizer_step = trainer.optimizer.step

        def overflowing_step(*args, trainer=trainer, optimizer_step=optimizer_step, **kwargs):
            out = optimizer_step(*args, **kwargs)
            if trainer.state.n_training_samples == 5 * BATCH:
                with torch.no_grad():
                    trainer.sae.W_dec[0, 0] = float("inf")
            return out

        trainer.optimizer.step = overflowing_step  # type: ignore[method-assign]
        with pytest.raises(NonFiniteLossError, match="not writing checkpoint 160.*W_dec"):
            trainer.fit()
        assert _checkpoints(tmp) == []


def test_the_step_after_an_overflow_is_not_skipped(tmp_path):
    """Weights that are already non-finite (here: an inf put into W_enc before step 3)
    make every later step non-finite: skip_nonfinite_batches raises instead of skipping
    them all."""
    trainer = _trainer(
        _cfg(tmp_path, skip_nonfinite_batches=True, n_checkpoints=0), Stream(), tmp_path
    )
    for _ in range(2):
        trainer.step(next(trainer.data_provider))
        trainer.state.n_training_steps += 1
    with torch.no_grad():
        trainer.sae.W_enc[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="W_enc already hold non-finite") as info:
        trainer.fit()
    assert info.value.step == 3 and not info.value.weights_finite


def test_an_infinite_learning_rate_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lr must be a finite number, got inf"):
        _trainer(_cfg(tmp_path, lr=math.inf), Stream(), tmp_path)


# ---------------------------------------------------------------------------- ranks
def _rank_worker(rank: int, world: int, tmp: str, kind: str, skip: bool) -> dict:
    from fastsae.training.parallel.data_parallel import DistributedSAETrainer, RankShardedProvider

    tmp_path = Path(tmp)
    # batch 2 of rank 1's share (its rows 5, 6 of the global batch) is NaN; rank 0's is clean
    poison = {2: ([21, 22], float("nan"))}
    cfg = _cfg(tmp_path, skip_nonfinite_batches=skip, n_checkpoints=0,
               latent_shards=2 if kind == "sharded" else 1)  # fmt: skip
    full = _sae(cfg)
    if kind == "dp":
        data = RankShardedProvider(Stream(poison=poison), rank, world)
        trainer: SAETrainer = DistributedSAETrainer(cfg, full, data, show_progress=False)
    else:
        from fastsae.training.parallel.latent import shard_sae
        from fastsae.training.parallel.latent.trainer import LatentShardedSAETrainer

        sae = shard_sae(full, rank, world)
        trainer = LatentShardedSAETrainer(cfg, sae, Stream(poison=poison), show_progress=False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit()
    except NonFiniteLossError as e:
        return {"error": str(e), "step": e.step, "rows": e.rows}
    return {
        "error": None,
        "skipped": trainer.state.n_skipped_batches,
        "steps": trainer.state.n_training_steps,
        "warnings": [str(w.message) for w in caught if "skipped a batch" in str(w.message)],
        "params": _params(trainer),
    }


@pytest.mark.parametrize("kind", ["dp", "sharded"])
def test_ranks_stop_together_at_a_non_finite_step(kind, tmp_path):
    results = run_ranks(_rank_worker, 2, tmp_path / "ranks", str(tmp_path), kind, False)
    assert [r["step"] for r in results] == [3, 3]
    if kind == "dp":
        # each rank holds 16 rows of the global batch: rows 21, 22 are rank 1's 5, 6
        assert results[1]["rows"] == [5, 6] and results[0]["rows"] == []
        assert "rows [5, 6] of the batch on rank 1" in results[1]["error"]
        assert "ranks [1] have non-finite activations" in results[0]["error"]
    else:  # both shards train on the same rows
        assert results[0]["rows"] == results[1]["rows"] == [21, 22]


@pytest.mark.parametrize("kind", ["dp", "sharded"])
def test_ranks_skip_together(kind, tmp_path):
    results = run_ranks(_rank_worker, 2, tmp_path / "ranks", str(tmp_path), kind, True)
    for r in results:
        assert r["error"] is None and r["skipped"] == 1 and r["steps"] == N_STEPS
    assert len(results[0]["warnings"]) == 1 and results[1]["warnings"] == []  # rank 0 warns
    if kind == "dp":  # the replicas stay equal
        for name, value in results[0]["params"].items():
            assert torch.equal(results[1]["params"][name], value), name
