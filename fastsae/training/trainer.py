"""``SAETrainer``: the training loop, kept apart from the data and the model.

Three separate pieces, so data parallelism and latent sharding can replace one
without touching the others:

* the **step** (:meth:`SAETrainer.step`): the SAE's ``training_forward_pass``,
  backward, clipping, Adam, schedules, dead-latent statistics;
* the **data**: any iterator of ``[batch, d_in]`` activation tensors (an
  ``ActivationsStore``, a ``CachedActivationsStore``, a list); when it has
  ``state_dict``/``load_state_dict`` a checkpoint records its position;
* the **state** (:class:`TrainerState` + optimizer + schedulers): what a checkpoint
  saves so that a resumed run continues with exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastsae.training.activation_scaler import ActivationScaler
from fastsae.training.checkpoints import (  # noqa: F401 - re-exported names
    DATA_REPLICA_FILENAME,
    DATA_STATE_FILENAME,
    PENDING_BATCH_FILENAME,
    RUNNER_CFG_FILENAME,
    TRAINER_STATE_FILENAME,
    CheckpointingMixin,
    TrainerState,
    _move_into_place,
)
from fastsae.training.interrupts import deferred_sigint
from fastsae.training.metrics import MetricsLogger, step_metrics
from fastsae.training.optim import CoefficientScheduler, fused_adam_kwargs, get_lr_scheduler
from fastsae.training.saes.base import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainStepInput,
    TrainStepOutput,
)

Evaluator = Callable[[TrainingSAE], dict[str, Any]]


class SAETrainer(CheckpointingMixin):
    """Train ``sae`` on batches from ``data_provider`` as ``cfg`` says.

    ``cfg`` is a :class:`~fastsae.training.config.LanguageModelSAERunnerConfig` (or any
    object with its optimisation/logging fields). ``evaluator(sae) -> dict`` runs every
    ``wandb_log_frequency * eval_every_n_wandb_logs`` steps. ``run_dir`` receives
    ``metrics.jsonl``/``training_curves.png``; checkpoints go to ``cfg.checkpoint_path``.
    """

    def __init__(
        self,
        cfg: Any,
        sae: TrainingSAE,
        data_provider: Iterator[Tensor],
        evaluator: Evaluator | None = None,
        *,
        run_dir: str | Path | None = None,
        wandb_run: Any = None,
        show_progress: bool = True,
    ):
        self.cfg = cfg
        self.sae = sae.to(cfg.device)
        self.data_provider = data_provider
        self.evaluator = evaluator
        self.show_progress = show_progress
        self.state = TrainerState()
        self.scaler = ActivationScaler()
        self.metrics = MetricsLogger(run_dir, wandb_run)
        d_sae = sae.cfg.d_sae
        device = torch.device(cfg.device)
        self.act_freq_scores = torch.zeros(d_sae, device=device)
        self.n_forward_passes_since_fired = torch.zeros(d_sae, device=device)
        self.optimizer = torch.optim.Adam(
            sae.parameters(),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            **fused_adam_kwargs(sae.parameters()),
        )
        self.lr_scheduler = get_lr_scheduler(
            cfg.lr_scheduler_name,
            self.optimizer,
            training_steps=self.total_training_steps,
            lr=cfg.lr,
            warm_up_steps=cfg.lr_warm_up_steps,
            decay_steps=cfg.lr_decay_steps,
            lr_end=cfg.lr_end,
            num_cycles=cfg.n_restart_cycles,
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
            if cfg.autocast
            else contextlib.nullcontext()
        )
        # a batch drawn from the data but not trained on yet (an interrupted step)
        self._pending_batch: Tensor | None = None
        self.last_metrics: dict[str, float] = {}
        self.tokens_per_second: float | None = None

    # ------------------------------------------------------------------ derived
    @property
    def total_training_samples(self) -> int:
        return self.cfg.training_tokens

    @property
    def total_training_steps(self) -> int:
        return self.cfg.training_tokens // self.cfg.train_batch_size_tokens

    @property
    def dead_neurons(self) -> Tensor:
        """``[d_sae]`` bool: latents that have not fired for ``dead_feature_window`` steps."""
        return self.n_forward_passes_since_fired > self.cfg.dead_feature_window

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
        n = self.cfg.n_checkpoints
        if n <= 0 or self.cfg.checkpoint_path is None:
            return []
        total = self.total_training_samples
        return list(range(0, total, math.ceil(total / (n + 1))))[1:]

    # ------------------------------------------------------------------ the step
    def step(self, batch: Tensor) -> TrainStepOutput:
        """One optimizer step on a raw ``[batch, d_in]`` activation batch.

        Nothing of the run's state changes until the gradients exist: an exception
        (e.g. KeyboardInterrupt) raised during the forward/backward leaves the trainer
        as it was, so the batch can be replayed.
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
        ) % self.cfg.logger.wandb_log_frequency == 0
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
        except BaseException:
            # undo the step's side effects (BatchTopK's threshold EMA, gradients)
            with torch.no_grad():
                for name, value in sae.named_buffers():
                    value.copy_(buffers[name])
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self._after_backward()
        with torch.no_grad():
            fired, n_tokens = self._reduce_fired(output.fired(), batch.shape[0])
            self.n_forward_passes_since_fired += 1
            self.n_forward_passes_since_fired[fired > 0] = 0
            self.act_freq_scores += fired
            self.state.n_frac_active_samples += n_tokens
        self.state.n_training_samples += n_tokens
        if self.cfg.max_grad_norm is not None:
            self._clip_gradients(self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        self._after_optimizer_step()
        output.weights_updated()
        return output

    # hooks for data parallelism (fastsae.training.distributed); no-ops on one process
    def _after_backward(self) -> None:
        """Runs once every ``.grad`` is filled, before clipping and the optimizer."""

    def _clip_gradients(self, max_norm: float) -> None:
        """Clip the gradients' global L2 norm to ``max_norm`` (latent sharding overrides it)."""
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), max_norm)

    def _reduce_fired(self, fired: Tensor, n_tokens: int) -> tuple[Tensor, int]:
        """This step's per-latent firing counts ``[d_sae]`` and token count, over all data."""
        return fired, n_tokens

    def _after_optimizer_step(self) -> None:
        """Runs after the optimizer and schedules stepped."""

    # ------------------------------------------------------------------ the loop
    def _estimate_normalisation(self) -> None:
        mode = self.sae.cfg.normalize_activations
        n, d_in = self.cfg.n_batches_for_norm_estimate, self.sae.cfg.d_in
        if mode == "expected_average_only_in" and self.scaler.scaling_factor is None:
            self.scaler.estimate_scaling_factor(self.data_provider, n, d_in)
        elif mode == "covariance_whitening" and not self.scaler.whitening:
            self.scaler.estimate_whitening(self.data_provider, n, d_in)

    def fit(self) -> TrainingSAE:
        """Train until ``training_tokens``; returns the SAE (normalisation folded in).

        Ctrl-C (SIGINT) finishes the current step, writes an ``interrupted_<tokens>``
        checkpoint and raises KeyboardInterrupt; a second Ctrl-C stops at once.
        """
        self._estimate_normalisation()
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
                    self._maybe_reset_sparsity()
                    batch = self._pending_batch
                    if batch is None:
                        batch = next(self.data_provider)
                    self._pending_batch = batch
                    samples_before = self.state.n_training_samples
                    output = self.step(batch)
                    self._pending_batch = None
                    self.state.n_training_steps += 1
                    if self.state.n_training_steps % self.cfg.logger.wandb_log_frequency == 0:
                        self._log(output, pbar)
                    self._maybe_evaluate()
                    self._checkpoint_if_needed()
                    pbar.update(self.state.n_training_samples - samples_before)
                    if interrupted():
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                pbar.close()
                if self.cfg.checkpoint_path is not None:
                    path = self.save_checkpoint(f"interrupted_{self.state.n_training_samples}")
                    print(f"\nInterrupted: checkpoint saved to {path}")
                raise
        pbar.close()
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            self.tokens_per_second = (self.state.n_training_samples - start_samples) / elapsed
        self._finish()
        return self.sae

    def _finish(self) -> None:
        if self.state.n_frac_active_samples > 0:
            self.sae.cfg.metadata.l0 = float(self.feature_sparsity.sum())
            self.sae.cfg.metadata.num_dead_features = int(self.dead_neurons.sum())
        self.scaler.fold_into(self.sae)
        if self.cfg.save_final_checkpoint and self.cfg.checkpoint_path is not None:
            self.save_checkpoint(f"final_{self.state.n_training_samples}")
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
        every = self.cfg.logger.wandb_log_frequency * self.cfg.logger.eval_every_n_wandb_logs
        if self.evaluator is None or self.state.n_training_steps % every != 0:
            return
        self.sae.eval()
        with torch.no_grad():
            results = self.evaluator(self.sae)
        self.sae.train()
        self.metrics.log(results, self.state.n_training_steps)

    def _maybe_reset_sparsity(self) -> None:
        steps = self.state.n_training_steps
        if steps > 0 and steps % self.cfg.feature_sampling_window == 0:
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
        if (
            self.checkpoint_thresholds
            and self.state.n_training_samples > self.checkpoint_thresholds[0]
        ):
            self.save_checkpoint(str(self.state.n_training_samples))
            self.checkpoint_thresholds.pop(0)
