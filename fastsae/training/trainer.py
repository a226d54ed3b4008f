"""``SAETrainer``: the training loop, kept apart from the data and the model.

Three separate pieces, so data parallelism and latent sharding can replace one
without touching the others:

* the **config**: an :class:`~fastsae.training.config.SAETrainerConfig` (SAELens 6's
  trainer config: ``SAETrainer(cfg=SAETrainerConfig(total_training_samples=...,
  train_batch_size_samples=..., lr=...), sae=..., data_provider=...)``) or the runner's
  :class:`~fastsae.training.config.LanguageModelSAERunnerConfig`, which the trainer turns
  into one (``to_sae_trainer_config()``) and keeps for the run config its checkpoints
  record;
* the **step** (:meth:`SAETrainer.step`): the SAE's ``training_forward_pass``,
  backward, clipping, Adam, schedules, dead-latent statistics;
* the **data**: any iterator of ``[batch, d_in]`` activation tensors (an
  ``ActivationsStore``, a ``CachedActivationsStore``, a list); when it has
  ``state_dict``/``load_state_dict`` a checkpoint records its position;
* the **state** (:class:`~fastsae.training.checkpoints.TrainerState` + optimizer +
  schedulers): what a checkpoint saves (:meth:`SAETrainer.save_checkpoint`, in the files
  of :mod:`fastsae.training.checkpoints`) so that a resumed run
  (:meth:`SAETrainer.load_checkpoint`) continues with exactly the losses of an
  uninterrupted one.

A step whose loss or gradient norm is not finite applies nothing and raises
:class:`~fastsae.training.nonfinite.NonFiniteLossError` (or, with
``skip_nonfinite_batches``, is skipped with a warning); non-finite weights are never
written to a checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastsae.loading.atomic_dir import replace_dir
from fastsae.saes.training_sae import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainStepInput,
    TrainStepOutput,
)
from fastsae.training.activation_scaler import ActivationScaler
from fastsae.training.checkpoints import (
    DATA_REPLICA_FILENAME,
    DATA_STATE_FILENAME,
    TRAINER_STATE_FILENAME,
    TrainerState,
    check_sae_config,
    load_data_position,
    load_torch_file,
    read_pending_batch,
    recover_checkpoint,
    restore_rng_states,
    rng_states,
    warn_runner_config_changes,
    write_data_position,
    write_pending_batch,
    write_runner_cfg,
)
from fastsae.training.config import T_TRAINING_SAE_CONFIG, SAETrainerConfig
from fastsae.training.interrupts import deferred_sigint
from fastsae.training.metrics import MetricsLogger, step_metrics
from fastsae.training.nonfinite import (
    MAX_CONSECUTIVE_SKIPS,
    NonFiniteLossError,
    describe_rows,
    nonfinite_parameters,
    nonfinite_rows,
)
from fastsae.training.optim import CoefficientScheduler, fused_adam_kwargs, get_lr_scheduler
from fastsae.training.parallel.latent.checkpoint import (
    FIRING_KEYS,
    load_optimizer_state_by_name,
    read_latent_range,
)
from fastsae.training.recipe import init_from_data, rows_needed

T_TRAINING_SAE = TypeVar("T_TRAINING_SAE", bound=TrainingSAE)

Evaluator = Callable[..., dict[str, Any]]
"""``evaluator(sae) -> dict`` (fastsae's), or SAELens's ``evaluator(sae, data_provider,
activation_scaler) -> dict``."""


class SaveCheckpointFn(Protocol):
    """Called after each checkpoint (SAELens's hook): ``checkpoint_path`` is the folder
    written, None when ``checkpoint_path`` is None (nothing written)."""

    def __call__(self, checkpoint_path: Path | None) -> None: ...


def trainer_config(cfg: Any) -> SAETrainerConfig:
    """``cfg`` as the :class:`SAETrainerConfig` the trainer reads: itself, or a runner
    config's ``to_sae_trainer_config()``."""
    if isinstance(cfg, SAETrainerConfig):
        return cfg
    convert = getattr(cfg, "to_sae_trainer_config", None)
    if not callable(convert):
        raise TypeError(
            "cfg must be an SAETrainerConfig or a LanguageModelSAERunnerConfig, "
            f"got {type(cfg).__name__}"
        )
    return convert()


def _active_wandb_run() -> Any:
    """The W&B run the caller started (``wandb.init``), where an ``SAETrainerConfig``
    asks to log to W&B: as in SAELens, the trainer logs to it and does not start one."""
    try:
        import wandb  # optional dependency (the fastsae[wandb] extra)
    except ImportError:
        raise ValueError(
            "logger.log_to_wandb=True but wandb is not installed: pip install 'fastsae[wandb]'"
        ) from None
    if wandb.run is None:
        raise ValueError(
            "logger.log_to_wandb=True: call wandb.init() before creating the SAETrainer "
            "(or pass wandb_run=, or set log_to_wandb=False)"
        )
    return wandb.run


def _takes_sae_lens_evaluator_args(evaluator: Callable[..., Any]) -> bool:
    """True when ``evaluator`` is called as SAELens calls its evaluators, ``(sae,
    data_provider, activation_scaler)``, and not as ``evaluator(sae)``."""
    try:
        signature = inspect.signature(evaluator)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(None)
        return False
    except TypeError:
        pass
    try:
        signature.bind(None, None, None)
    except TypeError:
        return False
    return True


class SAETrainer(Generic[T_TRAINING_SAE, T_TRAINING_SAE_CONFIG]):
    """Train ``sae`` on batches from ``data_provider`` as ``cfg`` says (SAELens 6's
    ``SAETrainer(cfg, sae, data_provider, evaluator=None, save_checkpoint_fn=None)``).

    ``cfg`` is an :class:`~fastsae.training.config.SAETrainerConfig`, or a
    :class:`~fastsae.training.config.LanguageModelSAERunnerConfig`: the trainer then reads
    its ``to_sae_trainer_config()`` (``trainer_cfg``) and records the runner config in its
    checkpoints. ``trainer.cfg`` is ``cfg`` as given. ``evaluator(sae) -> dict`` (or
    SAELens's ``evaluator(sae, data_provider, activation_scaler)``) runs every
    ``wandb_log_frequency * eval_every_n_wandb_logs`` steps. ``save_checkpoint_fn
    (checkpoint_path=...)`` is called after each checkpoint of this (single-process)
    trainer. ``run_dir`` receives ``metrics.jsonl``/``training_curves.png``; checkpoints
    go to ``checkpoint_path``.
    """

    def __init__(
        self,
        cfg: SAETrainerConfig | Any,
        sae: T_TRAINING_SAE,
        data_provider: Iterator[Tensor],
        evaluator: Evaluator | None = None,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
        *,
        run_dir: str | Path | None = None,
        wandb_run: Any = None,
        show_progress: bool = True,
    ):
        for name in ("lr", "lr_end"):
            value = getattr(cfg, name, None)
            if value is not None and not math.isfinite(value):
                # an infinite step size makes every weight NaN after the first step
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        self.cfg = cfg
        self.trainer_cfg = trainer_cfg = trainer_config(cfg)
        if wandb_run is None and cfg is trainer_cfg and trainer_cfg.logger.log_to_wandb:
            wandb_run = _active_wandb_run()
        self.sae = sae.to(trainer_cfg.device)
        self.data_provider = data_provider
        self.evaluator = evaluator
        self._sae_lens_evaluator = evaluator is not None and _takes_sae_lens_evaluator_args(
            evaluator
        )
        self.save_checkpoint_fn = save_checkpoint_fn
        self.show_progress = show_progress
        self.state = TrainerState()
        self.scaler = ActivationScaler()
        self.metrics = MetricsLogger(run_dir, wandb_run)
        d_sae = sae.cfg.d_sae
        device = torch.device(trainer_cfg.device)
        self.act_freq_scores = torch.zeros(d_sae, device=device)
        self.n_forward_passes_since_fired = torch.zeros(d_sae, device=device)
        self.optimizer = torch.optim.Adam(
            sae.parameters(),
            lr=trainer_cfg.lr,
            betas=(trainer_cfg.adam_beta1, trainer_cfg.adam_beta2),
            **fused_adam_kwargs(sae.parameters()),
        )
        lr_end = trainer_cfg.lr_end if trainer_cfg.lr_end is not None else trainer_cfg.lr / 10
        self.lr_scheduler = get_lr_scheduler(
            trainer_cfg.lr_scheduler_name,
            self.optimizer,
            training_steps=self.total_training_steps,
            lr=trainer_cfg.lr,
            warm_up_steps=trainer_cfg.lr_warm_up_steps,
            decay_steps=trainer_cfg.lr_decay_steps,
            lr_end=lr_end,
            num_cycles=trainer_cfg.n_restart_cycles,
        )
        self.coefficient_schedulers: dict[str, CoefficientScheduler] = {}
        for name, coeff in sae.get_coefficients().items():
            if not isinstance(coeff, TrainCoefficientConfig):
                coeff = TrainCoefficientConfig(float(coeff), 0)
            self.coefficient_schedulers[name] = CoefficientScheduler(
                coeff.warm_up_steps, coeff.value
            )
        self.checkpoint_thresholds = self._checkpoint_thresholds()
        self.autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if trainer_cfg.autocast
            else contextlib.nullcontext()
        )
        # a batch drawn from the data but not trained on yet (an interrupted step)
        self._pending_batch: Tensor | None = None
        self._consecutive_skips = 0  # non-finite batches skipped since the last step
        self._sparsity_checked_at: int | None = None  # the step _maybe_reset_sparsity saw
        self.last_metrics: dict[str, float] = {}
        self.tokens_per_second: float | None = None

    # ------------------------------------------------------------------ derived
    @property
    def activation_scaler(self) -> ActivationScaler:
        """The SAE's input normalisation (SAELens's name for ``scaler``)."""
        return self.scaler

    @property
    def n_training_steps(self) -> int:
        """Steps trained so far (SAELens's name; ``state.n_training_steps``)."""
        return self.state.n_training_steps

    @property
    def n_training_samples(self) -> int:
        """Samples (tokens) trained on so far (SAELens's name)."""
        return self.state.n_training_samples

    @property
    def total_training_samples(self) -> int:
        return self.trainer_cfg.total_training_samples

    @property
    def total_training_steps(self) -> int:
        return self.trainer_cfg.total_training_steps

    @property
    def dead_neurons(self) -> Tensor:
        """``[d_sae]`` bool: latents that have not fired for ``dead_feature_window`` steps."""
        return self.n_forward_passes_since_fired > self.trainer_cfg.dead_feature_window

    @property
    def feature_sparsity(self) -> Tensor:
        """``[d_sae]`` firing frequency over the current sampling window."""
        return self.act_freq_scores / max(self.state.n_frac_active_samples, 1)

    @property
    def log_feature_sparsity(self) -> Tensor:
        return torch.log10(self.feature_sparsity + 1e-10).detach().cpu()

    def get_coefficients(self) -> dict[str, float]:
        return {name: s.value for name, s in self.coefficient_schedulers.items()}

    def _checkpoint_thresholds(self) -> list[int]:
        n = self.trainer_cfg.n_checkpoints
        if n <= 0 or (self.trainer_cfg.checkpoint_path is None and self.save_checkpoint_fn is None):
            return []
        total = self.total_training_samples
        return list(range(0, total, math.ceil(total / (n + 1))))[1:]

    # ------------------------------------------------------------------ the step
    def step(self, batch: Tensor) -> TrainStepOutput:
        """One optimizer step on a raw ``[batch, d_in]`` activation batch.

        Nothing of the run's state changes until the gradients exist and the step's
        loss and gradient norm are finite: an exception (e.g. KeyboardInterrupt) raised
        during the forward/backward leaves the trainer as it was, so the batch can be
        replayed, and a non-finite loss or gradient raises :class:`NonFiniteLossError`
        (naming the step and the batch rows that hold non-finite activations) with
        nothing applied.
        """
        if batch.ndim != 2 or batch.shape[-1] != self.sae.cfg.d_in:
            raise ValueError(
                f"activation batch must be [batch, d_in={self.sae.cfg.d_in}], "
                f"got {tuple(batch.shape)}"
            )
        sae = self.sae
        sae.train()
        sae_in = self.scaler(batch.to(sae.device, sae.dtype))
        is_logging_step = (
            self.state.n_training_steps + 1
        ) % self.trainer_cfg.logger.wandb_log_frequency == 0
        buffers = {name: b.clone() for name, b in sae.named_buffers()}
        try:
            with self.autocast:
                output = sae.training_forward_pass(
                    TrainStepInput(
                        sae_in=sae_in,
                        coefficients=self.get_coefficients(),
                        dead_neuron_mask=self.dead_neurons,
                        n_training_steps=self.state.n_training_steps,
                        is_logging_step=is_logging_step,
                    )
                )
            output.loss.backward()
            self._after_backward()
            grad_norm = self._gradient_norm()
            self._check_step_finite(batch, output.loss, grad_norm)
        except BaseException:
            # undo the step's side effects (BatchTopK's threshold EMA, gradients)
            with torch.no_grad():
                for name, value in sae.named_buffers():
                    value.copy_(buffers[name])
            self.optimizer.zero_grad(set_to_none=True)
            raise
        with torch.no_grad():
            fired, n_tokens = self._reduce_fired(output.fired(), batch.shape[0])
            self.n_forward_passes_since_fired += 1
            self.n_forward_passes_since_fired[fired > 0] = 0
            self.act_freq_scores += fired
            self.state.n_frac_active_samples += n_tokens
        self.state.n_training_samples += n_tokens
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        self._after_optimizer_step()
        output.weights_updated()
        return output

    def _gradient_norm(self) -> Tensor:
        """The gradients' global L2 norm, clipped to ``max_grad_norm`` when it is set
        (clipping computes the norm anyway); else this process's gradients' norm, which
        is finite exactly when every gradient is."""
        if self.trainer_cfg.max_grad_norm is not None:
            return self._clip_gradients(self.trainer_cfg.max_grad_norm)
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.sae.device)
        return torch.nn.utils.get_total_norm(grads)

    def _check_step_finite(self, batch: Tensor, loss: Tensor, grad_norm: Tensor) -> None:
        """Raise :class:`NonFiniteLossError` when the loss or the gradient norm is not
        finite on any process. The flag is computed on the device from scalars the step
        has anyway and read once (one host sync per step; with several processes, one
        one-element all_reduce first, so every rank stops or skips together)."""
        bad = (~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))).float().reshape(1)
        bad = self._sum_over_ranks(bad, "all_reduce(non-finite step flag)")
        if float(bad.item()) > 0:
            raise self._nonfinite_step_error(batch, loss, grad_norm)

    def _nonfinite_step_error(
        self, batch: Tensor, loss: Tensor, grad_norm: Tensor
    ) -> NonFiniteLossError:
        """The error of a non-finite step: which rows (of which ranks' batches) hold
        non-finite activations, or that the inputs were finite (an overflow), and whether
        the SAE's weights are still finite (then the batch can be skipped). Every rank
        builds it together (one all_reduce)."""
        rank, world = getattr(self, "rank", 0), getattr(self, "world_size", 1)
        rows = nonfinite_rows(batch)
        bad_params = nonfinite_parameters(self.sae)
        info = torch.zeros(world + 1, dtype=torch.float64, device=self.sae.device)
        info[rank] = len(rows)
        info[world] = float(bool(bad_params))
        info = self._sum_over_ranks(info, "all_reduce(non-finite step details)").tolist()
        step = self.state.n_training_steps + 1
        first = self.state.n_training_samples
        where = f" on rank {rank}" if world > 1 else ""
        parts = [
            f"non-finite training step {step} (the batch after {first} training samples): "
            f"loss={float(loss.detach()):g}, gradient norm={float(grad_norm):g}"
        ]
        if rows:
            parts.append(
                f"{describe_rows(rows)} of the batch{where} hold non-finite activations "
                "(NaN/inf): check the data and the model that produced them"
            )
        other = [r for r in range(world) if r != rank and info[r] > 0]
        if other:
            parts.append(f"ranks {other} have non-finite activations in their batches")
        if not rows and not other:
            parts.append(
                "the batch's activations are finite: the loss or its gradients overflowed "
                "(check lr, the SAE's initialisation and autocast)"
            )
        if bad_params:
            parts.append(
                f"the SAE's {', '.join(bad_params)}{where} already hold non-finite values "
                "(an earlier update overflowed)"
            )
        elif info[world] > 0:
            parts.append("another rank's SAE shard already holds non-finite values")
        parts.append(
            "nothing of this step was applied"
            + (
                "; set skip_nonfinite_batches: true to skip such batches with a warning"
                if not self.trainer_cfg.skip_nonfinite_batches
                else ""
            )
        )
        return NonFiniteLossError(
            "; ".join(parts), step=step, rows=rows, weights_finite=info[world] == 0
        )

    def _sum_over_ranks(self, values: Tensor, what: str) -> Tensor:
        """``values`` summed over every process of the run (one process: themselves)."""
        return values

    def check_weights_finite(self, what: str) -> None:
        """Raise :class:`NonFiniteLossError` (on every rank) when the SAE holds a NaN or
        an inf, before ``what`` (a checkpoint, the final SAE) is written."""
        bad = nonfinite_parameters(self.sae)
        flag = torch.tensor([float(bool(bad))], dtype=torch.float64, device=self.sae.device)
        if float(self._sum_over_ranks(flag, "all_reduce(non-finite weights)").item()) > 0:
            names = f"its {', '.join(bad)}" if bad else "another rank's shard"
            raise NonFiniteLossError(
                f"not writing {what}: the SAE holds non-finite values ({names}) after "
                f"step {self.state.n_training_steps}; the checkpoints already written are "
                "kept",
                step=self.state.n_training_steps,
            )

    # hooks for data parallelism (fastsae.training.parallel.data_parallel); no-ops on one process
    def _after_backward(self) -> None:
        """Runs once every ``.grad`` is filled, before clipping and the optimizer."""

    def _clip_gradients(self, max_norm: float) -> Tensor:
        """Clip the gradients' global L2 norm to ``max_norm`` and return that norm (before
        clipping; latent sharding overrides it)."""
        return torch.nn.utils.clip_grad_norm_(self.sae.parameters(), max_norm)

    def _reduce_fired(self, fired: Tensor, n_tokens: int) -> tuple[Tensor, int]:
        """This step's per-latent firing counts ``[d_sae]`` and token count, over all data."""
        return fired, n_tokens

    def _after_optimizer_step(self) -> None:
        """Runs after the optimizer and schedules stepped."""

    # ------------------------------------------------------------------ the loop
    def _estimate_normalisation(self) -> None:
        mode = self.sae.cfg.normalize_activations
        n, d_in = self.trainer_cfg.n_batches_for_norm_estimate, self.sae.cfg.d_in
        if mode == "expected_average_only_in" and self.scaler.scaling_factor is None:
            self.scaler.estimate_scaling_factor(self.data_provider, n, d_in)
        elif mode == "covariance_whitening" and not self.scaler.whitening:
            self.scaler.estimate_whitening(self.data_provider, n, d_in)

    def _init_from_data(self) -> None:
        """``b_dec_init`` / ``decoder_init`` (:mod:`fastsae.training.recipe`) at the start
        of a run, from rows drawn from the data and scaled as training scales them (not
        trained on, as the normalisation estimate's); nothing on a resumed run."""
        cfg = self.trainer_cfg
        need = self.init_rows_needed()
        if need == 0 or self.state.n_training_steps > 0:
            return
        rows, have = [], 0
        while have < need:
            batch = next(self.data_provider)
            rows.append(self.scaler(batch.to(self.sae.device, torch.float32)))
            have += batch.shape[0]
        init_from_data(
            self.sae, torch.cat(rows), b_dec_init=cfg.b_dec_init, decoder_init=cfg.decoder_init,
            batch_size=cfg.train_batch_size_samples,
        )  # fmt: skip

    def init_rows_needed(self) -> int:
        """Rows the initialisation from data reads at the start of a run (0: SAELens's
        initialisation, nothing read)."""
        cfg = self.trainer_cfg
        return rows_needed(
            self.sae.cfg.d_sae, cfg.train_batch_size_samples, b_dec_init=cfg.b_dec_init,
            decoder_init=cfg.decoder_init,
        )  # fmt: skip

    def fit(self) -> TrainingSAE:
        """Train until ``training_tokens``; returns the SAE (normalisation folded in).

        Ctrl-C (SIGINT) finishes the current step, writes an ``interrupted_<tokens>``
        checkpoint and raises KeyboardInterrupt; a second Ctrl-C stops at once.
        """
        self._estimate_normalisation()
        self._init_from_data()
        pbar = tqdm(
            total=self.total_training_samples,
            initial=self.state.n_training_samples,
            desc="Training SAE",
            unit="tok",
            unit_scale=True,
            disable=not self.show_progress,
        )
        start, start_samples = time.perf_counter(), self.state.n_training_samples
        with deferred_sigint() as interrupted:
            try:
                while self.state.n_training_samples < self.total_training_samples:
                    if self.state.n_training_steps != self._sparsity_checked_at:
                        # once per step: a skipped batch does not close the window twice
                        self._sparsity_checked_at = self.state.n_training_steps
                        self._maybe_reset_sparsity()
                    batch = self._pending_batch
                    if batch is None:
                        batch = next(self.data_provider)
                    self._pending_batch = batch
                    samples_before = self.state.n_training_samples
                    try:
                        output = self.step(batch)
                    except NonFiniteLossError as e:
                        self._skip_or_raise(e)
                        self._pending_batch = None
                        continue
                    self._consecutive_skips = 0
                    self._pending_batch = None
                    self.state.n_training_steps += 1
                    if (
                        self.state.n_training_steps % self.trainer_cfg.logger.wandb_log_frequency
                        == 0
                    ):
                        self._log(output, pbar)
                    self._maybe_evaluate()
                    self._checkpoint_if_needed()
                    pbar.update(self.state.n_training_samples - samples_before)
                    if interrupted():
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                pbar.close()
                if self.trainer_cfg.checkpoint_path is not None:
                    name = f"interrupted_{self.state.n_training_samples}"
                    self.check_weights_finite(f"checkpoint {name}")
                    path = self.save_checkpoint(name)
                    print(f"\nInterrupted: checkpoint saved to {path}")
                raise
        pbar.close()
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            self.tokens_per_second = (self.state.n_training_samples - start_samples) / elapsed
        self._finish()
        return self.sae

    def _skip_or_raise(self, error: NonFiniteLossError) -> None:
        """A non-finite step: raise ``error`` unless ``skip_nonfinite_batches`` is set and
        the SAE's weights are still finite; else count the skipped batch (``TrainerState``,
        and a ``details/n_skipped_batches`` metrics row) and warn. Every rank decides alike
        (the error's facts were reduced over the ranks)."""
        if not self.trainer_cfg.skip_nonfinite_batches or not error.weights_finite:
            raise error
        self._consecutive_skips += 1
        if self._consecutive_skips > MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLossError(
                f"{MAX_CONSECUTIVE_SKIPS + 1} batches in a row gave non-finite steps "
                f"(skip_nonfinite_batches skips stray batches, not broken data); last: {error}",
                step=error.step,
                rows=error.rows,
            ) from error
        self.state.n_skipped_batches += 1
        self.metrics.log(
            {"details/n_skipped_batches": self.state.n_skipped_batches},
            self.state.n_training_steps,
        )
        if getattr(self, "rank", 0) == 0:
            warnings.warn(f"skipped a batch (skip_nonfinite_batches): {error}", stacklevel=3)

    def _finish(self) -> None:
        if self.state.n_frac_active_samples > 0:
            self.sae.cfg.metadata.l0 = float(self.feature_sparsity.sum())
            self.sae.cfg.metadata.num_dead_features = int(self.dead_neurons.sum())
        self.check_weights_finite("the final SAE")
        self.scaler.fold_into(self.sae)
        if self.trainer_cfg.save_final_checkpoint:
            if self.trainer_cfg.checkpoint_path is not None:
                self.save_checkpoint(f"final_{self.state.n_training_samples}")
            elif self.save_checkpoint_fn is not None:
                self.save_checkpoint_fn(checkpoint_path=None)  # nothing written (SAELens)
        self.metrics.plot()

    def _log(self, output: TrainStepOutput, pbar: tqdm) -> None:
        """Log this step's metrics row (metrics file, W&B) and show it on the bar."""
        row = self._log_row(output)
        dead = int(round(row["sparsity/dead_features"]))
        row["sparsity/dead_features"] = dead
        self.last_metrics = row
        self.metrics.log(row, self.state.n_training_steps)  # a no-op logger off rank 0
        pbar.set_postfix(
            {
                "L0": f"{row['metrics/l0']:.1f}",
                "MSE": f"{row['metrics/mse']:.3g}",
                "EV": f"{row['metrics/explained_variance']:.3f}",
                "dead": f"{100 * dead / self.sae.cfg.d_sae:.1f}%",
            },
            refresh=False,
        )

    def _log_row(self, output: TrainStepOutput) -> dict[str, Any]:
        """The metrics row of a logging step (data-parallel trainers reduce it)."""
        row = step_metrics(output)
        row.update(
            {
                "sparsity/dead_features": int(self.dead_neurons.sum()),
                "sparsity/mean_passes_since_fired": float(self.n_forward_passes_since_fired.mean()),
                **self._details_metrics(),
            }
        )
        return row

    def _details_metrics(self) -> dict[str, Any]:
        """Learning rate, samples seen and the scheduled coefficients (the same on
        every rank)."""
        return {
            "details/current_learning_rate": self.optimizer.param_groups[0]["lr"],
            "details/n_training_samples": self.state.n_training_samples,
            **{f"details/{k}_coefficient": v for k, v in self.get_coefficients().items()},
        }

    def _maybe_evaluate(self) -> None:
        every = (
            self.trainer_cfg.logger.wandb_log_frequency
            * self.trainer_cfg.logger.eval_every_n_wandb_logs
        )
        if self.evaluator is None or self.state.n_training_steps % every != 0:
            return
        self.sae.eval()
        with torch.no_grad():
            if self._sae_lens_evaluator:
                results = self.evaluator(self.sae, self.data_provider, self.scaler)
            else:
                results = self.evaluator(self.sae)
        self.sae.train()
        self.metrics.log(results, self.state.n_training_steps)

    def _maybe_reset_sparsity(self) -> None:
        steps = self.state.n_training_steps
        if steps > 0 and steps % self.trainer_cfg.feature_sampling_window == 0:
            log_sparsity = self.log_feature_sparsity
            self.metrics.log(
                {
                    "metrics/mean_log10_feature_sparsity": float(log_sparsity.mean()),
                    "sparsity/below_1e-5": int((self.feature_sparsity < 1e-5).sum()),
                    "sparsity/below_1e-6": int((self.feature_sparsity < 1e-6).sum()),
                },
                steps,
            )
            self.act_freq_scores.zero_()
            self.state.n_frac_active_samples = 0

    def _checkpoint_if_needed(self) -> None:
        """Write the next scheduled checkpoint once the run has passed its threshold.

        The threshold is dropped before the checkpoint is written, so the checkpoint's
        own list no longer holds it: a run resumed from it writes exactly the
        checkpoints the uninterrupted run writes after that point."""
        if (
            self.checkpoint_thresholds
            and self.state.n_training_samples > self.checkpoint_thresholds[0]
        ):
            self.checkpoint_thresholds.pop(0)
            if self.trainer_cfg.checkpoint_path is None:
                # thresholds without a folder: only a save_checkpoint_fn to call (SAELens)
                if self.save_checkpoint_fn is not None:
                    self.save_checkpoint_fn(checkpoint_path=None)
                return
            name = str(self.state.n_training_samples)
            self.check_weights_finite(f"checkpoint {name}")
            self.save_checkpoint(name)

    # ------------------------------------------------------------------ checkpoints
    # the data-parallel and latent-sharded trainers override save_checkpoint,
    # load_checkpoint and _state_dict, and build theirs from the pieces below
    def save_checkpoint(self, name: str, base_path: str | Path | None = None) -> Path:
        """Write ``<checkpoint_path>/<name>/`` atomically: the SAE (SAELens format,
        training config), the trainer state, the data position and the run config."""
        base = Path(base_path if base_path is not None else self.trainer_cfg.checkpoint_path)
        final = base / name

        def write(folder: Path) -> None:
            self.sae.save_model(folder, sparsity=self.log_feature_sparsity)
            self._write_trainer_files(folder)

        # the whole folder is swapped in: a kill at any moment leaves the old checkpoint
        # or the new one, complete (fastsae.loading.atomic_dir)
        replace_dir(final, write)
        if self.save_checkpoint_fn is not None:
            self.save_checkpoint_fn(checkpoint_path=final)
        return final

    @contextlib.contextmanager
    def _pending_batch_dropped(self, drop: bool) -> Iterator[None]:
        """While active (when ``drop``), the pending batch is not part of what is saved:
        under data parallelism it is only this rank's rows."""
        pending = self._pending_batch
        if drop:
            self._pending_batch = None
        try:
            yield
        finally:
            self._pending_batch = pending

    def _write_trainer_files(self, folder: Path) -> None:
        """Everything of a checkpoint but the SAE: trainer state, data position,
        normalisation, an interrupted step's pending batch, the run config."""
        torch.save(self._state_dict(), folder / TRAINER_STATE_FILENAME)
        write_data_position(folder / DATA_STATE_FILENAME, self.data_provider)
        self.scaler.save(folder)
        write_pending_batch(folder, self._pending_batch)
        write_runner_cfg(folder, self.cfg)

    def _state_dict(self) -> dict[str, Any]:
        """What ``trainer_state.pt`` holds."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "coefficient_schedulers": {
                k: s.state_dict() for k, s in self.coefficient_schedulers.items()
            },
            "state": asdict(self.state),
            "act_freq_scores": self.act_freq_scores,
            "n_forward_passes_since_fired": self.n_forward_passes_since_fired,
            "checkpoint_thresholds": list(self.checkpoint_thresholds),
            "rng": rng_states(),
            "sae_buffers": {k: v for k, v in self.sae.named_buffers()},
            "data_replicas": self._data_replica()[1],
        }

    def _data_replica(self) -> tuple[int, int]:
        """``(index, count)``: which of the run's data replicas this rank's provider
        draws (``count > 1`` when each data-parallel rank runs the model on its own
        token rows, see ``ActivationsStore.shard_for_data_parallel``)."""
        shard = getattr(self.data_provider, "row_shard", (0, 1))
        return int(shard[0]), int(shard[1])

    def _write_data_replica_state(self, folder: Path) -> None:
        """This replica's data position (when the replicas draw their own rows)."""
        index, count = self._data_replica()
        if count > 1:
            write_data_position(
                folder / DATA_REPLICA_FILENAME.format(replica=index), self.data_provider
            )

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore SAE weights, optimizer, schedules, counters and data position from a
        checkpoint directory written by :meth:`save_checkpoint`."""
        path = recover_checkpoint(path)
        self.check_checkpoint_sae_config(path)
        self.sae.load_weights_from_checkpoint(path)
        state = load_torch_file(
            path / TRAINER_STATE_FILENAME, "trainer state", map_location=self.sae.device
        )
        if state.get("latent_shards"):
            # written by a latent-sharded run: its shards' optimizer states, concatenated
            named = list(self.sae.named_parameters())
            d_sae = self.sae.cfg.d_sae
            whole = read_latent_range(path, state, [n for n, _ in named], d_sae, 0, d_sae)
            load_optimizer_state_by_name(
                self.optimizer, named, whole["optimizer"], whole["param_groups"]
            )
            state = {**state, **{k: whole[k] for k in FIRING_KEYS}}
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self._load_progress(state)
        for name, value in state.get("sae_buffers", {}).items():
            owner, _, attr = name.rpartition(".")
            module = self.sae.get_submodule(owner) if owner else self.sae
            setattr(module, attr, value.to(self.sae.device))
        self._load_run_files(path, state)

    def check_checkpoint_sae_config(self, path: Path) -> None:
        """Raise naming ``<path>/cfg.json`` when the SAE config it records differs from
        the one this run trains (another ``d_sae``, ``k``, architecture, normalisation,
        dtype...): a resume continues the run that wrote the checkpoint, so an edit of
        either is an error, not silently ignored. ``device`` and the metadata may differ."""
        check_sae_config(path, self.sae.cfg)

    def _load_progress(self, state: dict[str, Any]) -> None:
        """Schedules, counters, checkpoint thresholds and the firing statistics
        (``[d_sae]``, or this shard's) of a loaded trainer state."""
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for name, s in state["coefficient_schedulers"].items():
            self.coefficient_schedulers[name].load_state_dict(s)
        self.state = TrainerState(**state["state"])
        self.act_freq_scores = state["act_freq_scores"].to(self.act_freq_scores.device)
        self.n_forward_passes_since_fired = state["n_forward_passes_since_fired"].to(
            self.n_forward_passes_since_fired.device
        )
        self.checkpoint_thresholds = list(state["checkpoint_thresholds"])

    def _load_run_files(self, path: Path, state: dict[str, Any]) -> None:
        """The part of a resume every trainer shares: RNG states, normalisation, an
        interrupted step's pending batch, the data position, the metrics file. Rank 0
        warns when the run config that wrote the checkpoint trained something else."""
        main_rank = getattr(self, "rank", 0) == 0
        if main_rank:
            warn_runner_config_changes(path, self.cfg)
        restore_rng_states(state["rng"])
        self.scaler.load(path, normalisation=self.sae.cfg.normalize_activations)
        self._pending_batch = read_pending_batch(path)
        load_data_position(
            path,
            self.data_provider,
            int(state.get("data_replicas", 1)),
            self._data_replica(),
            warn=main_rank,  # once per run, not once per rank
        )
        self.metrics.truncate_after(self.state.n_training_steps)
