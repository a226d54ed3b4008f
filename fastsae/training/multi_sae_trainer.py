"""``MultiSAETrainer``: several SAEs trained in lockstep on one multi-hook activation stream
(SAELens 6's ``sae_lens.training.multi_sae_trainer``).

Each SAE has its own :class:`~fastsae.training.trainer.SAETrainer` (its optimizer, LR
schedule, coefficient schedules, activation scaler, dead-latent and sparsity tracking,
non-finite step handling and metrics are exactly those of a single-SAE run); this module
only routes each ``{hook_name: [batch, d_in]}`` batch to the SAEs that read that hook,
runs the evaluator and writes multi-SAE checkpoints:

``<checkpoint_path>/<name>/`` holds one sub-folder per SAE (the files a single-SAE
checkpoint holds, without the data position), ``multi_trainer_state.json`` (the
coordinator's counters and pending checkpoint thresholds) and whatever the
``save_checkpoint_fn`` writes there (the runner: the activation store's state and the
runner config). The folder is written complete beside its place and swapped in as a
whole (:mod:`fastsae.loading.atomic_dir`), so a kill leaves the old checkpoint or the new
one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastsae.loading.atomic_dir import clean_stale, recover_dir, replace_dir
from fastsae.loading.disk import read_json
from fastsae.saes.training_sae import TrainingSAE, TrainStepOutput
from fastsae.training.activation_scaler import ActivationScaler
from fastsae.training.config import SAETrainerConfig
from fastsae.training.interrupts import deferred_sigint
from fastsae.training.metrics import MetricsLogger
from fastsae.training.nonfinite import NonFiniteLossError
from fastsae.training.trainer import SAETrainer, SaveCheckpointFn, trainer_config

MULTI_TRAINER_STATE_FILENAME = "multi_trainer_state.json"

__all__ = [
    "MULTI_TRAINER_STATE_FILENAME",
    "MultiSAEEvaluatorProtocol",
    "MultiSAETrainer",
    "PerSAETrainer",
    "SingleHookView",
]


class MultiSAEEvaluatorProtocol(Protocol):
    """``evaluator(saes=, data_provider=, activation_scalers=, hook_names=) -> dict``:
    metrics keyed ``{sae_name}/...`` (SAELens 6's multi-SAE evaluator signature)."""

    def __call__(
        self,
        saes: dict[str, TrainingSAE],
        data_provider: Iterator[dict[str, Tensor]],
        activation_scalers: dict[str, ActivationScaler],
        hook_names: dict[str, str],
    ) -> dict[str, Any]: ...


class SingleHookView:
    """One hook's batches of a multi-hook data provider, as ``Iterator[Tensor]``."""

    def __init__(self, source: Iterator[dict[str, Tensor]], hook_name: str):
        self.source = source
        self.hook_name = hook_name

    def __iter__(self) -> SingleHookView:
        return self

    def __next__(self) -> Tensor:
        batch = next(self.source)
        if self.hook_name not in batch:
            raise KeyError(
                f"the data provider's batch has no hook {self.hook_name!r}; it has {list(batch)}"
            )
        return batch[self.hook_name]


class _PrefixedRun:
    """A W&B run whose logged keys get ``prefix`` (one SAE's metrics in a shared run)."""

    def __init__(self, run: Any, prefix: str):
        self.run = run
        self.prefix = prefix

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        self.run.log({f"{self.prefix}{k}": v for k, v in row.items()}, step=step)


class PerSAETrainer(SAETrainer):
    """One SAE's :class:`SAETrainer` as :class:`MultiSAETrainer` drives it: the same
    step, schedules, statistics, metrics and checkpoint files, with the loop's parts
    called one step at a time (the coordinator draws the batches, checkpoints and
    evaluates)."""

    @property
    def pending_batch(self) -> Tensor | None:
        """A batch drawn for this SAE but not trained on yet (an interrupted step)."""
        return self._pending_batch

    def hold(self, batch: Tensor) -> None:
        """Record ``batch`` as this SAE's next batch before any SAE steps on it, so an
        interrupt during the multi-SAE step leaves it pending (and checkpointed)."""
        self._pending_batch = batch

    def begin_step(self) -> None:
        """Close the sparsity window when it is full (once per step, as ``fit`` does)."""
        if self.state.n_training_steps != self._sparsity_checked_at:
            self._sparsity_checked_at = self.state.n_training_steps
            self._maybe_reset_sparsity()

    def train_pending(self, pbar: Any) -> TrainStepOutput | None:
        """Train on the pending batch as one step of ``fit``: the step (a non-finite one
        skipped or raised as ``skip_nonfinite_batches`` says), counters, the logging
        row on the logging cadence. Returns None when the batch was skipped."""
        batch = self._pending_batch
        if batch is None:
            raise RuntimeError("train_pending called without a pending batch (hold() first)")
        try:
            output = self.step(batch)
        except NonFiniteLossError as e:
            self._skip_or_raise(e)
            self._pending_batch = None
            return None
        self._consecutive_skips = 0
        self._pending_batch = None
        self.state.n_training_steps += 1
        if self.state.n_training_steps % self.trainer_cfg.logger.wandb_log_frequency == 0:
            self._log(output, pbar)
        return output

    def estimate_normalisation(self, batches: list[Tensor]) -> None:
        """Estimate the SAE's input normalisation (when its config asks for one and no
        checkpoint gave it) from ``batches``."""
        mode = self.sae.cfg.normalize_activations
        n, d_in = len(batches), self.sae.cfg.d_in
        if mode == "expected_average_only_in" and self.scaler.scaling_factor is None:
            self.scaler.estimate_scaling_factor(iter(batches), n, d_in)
        elif mode == "covariance_whitening" and not self.scaler.whitening:
            self.scaler.estimate_whitening(iter(batches), n, d_in)

    def needs_normalisation(self) -> bool:
        mode = self.sae.cfg.normalize_activations
        return (mode == "expected_average_only_in" and self.scaler.scaling_factor is None) or (
            mode == "covariance_whitening" and not self.scaler.whitening
        )

    def log_metrics(self, row: dict[str, Any], step: int) -> None:
        """A row into this SAE's metrics (its ``metrics.jsonl``, its W&B keys)."""
        self.metrics.log(row, step)

    def write_checkpoint_files(self, folder: Path) -> None:
        """This SAE's part of a checkpoint into ``folder`` (which the caller swaps in):
        the SAE (SAELens format) with its sparsity, the trainer state, the
        normalisation, a pending batch."""
        self.check_weights_finite(f"checkpoint {folder.name}")
        self.sae.save_model(folder, sparsity=self.log_feature_sparsity)
        self._write_trainer_files(folder)

    def finish(self) -> None:
        """End of training: final metadata (L0, dead latents), normalisation folded into
        the weights, the training curves plotted."""
        self._finish()


class MultiSAETrainer:
    """Train the SAEs of ``saes`` in lockstep on one multi-hook stream (SAELens 6's
    ``MultiSAETrainer(cfg, saes, hook_names, data_provider, evaluator=None,
    save_checkpoint_fn=None)``).

    Each step draws one ``{hook_name: [batch, d_in]}`` batch from ``data_provider`` and
    gives every SAE its hook's rows; ``trainers[name]`` is the SAE's own
    :class:`PerSAETrainer`, built from ``cfg`` with the checkpoints left to this
    coordinator. ``evaluator`` (:class:`MultiSAEEvaluatorProtocol`) runs every
    ``wandb_log_frequency * eval_every_n_wandb_logs`` steps. ``save_checkpoint_fn
    (checkpoint_path=...)`` is called while a checkpoint folder is written, with that
    folder: what it writes there is part of the checkpoint (None: no folder is written).
    ``run_dir``: each SAE's metrics go to ``<run_dir>/<name>/metrics.jsonl``; a W&B run
    (``wandb_run``, or the active one when ``cfg.logger.log_to_wandb``) gets them keyed
    ``<name>/...``.
    """

    def __init__(
        self,
        cfg: SAETrainerConfig | Any,
        saes: Mapping[str, TrainingSAE],
        hook_names: Mapping[str, str],
        data_provider: Iterator[dict[str, Tensor]],
        evaluator: MultiSAEEvaluatorProtocol | None = None,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
        *,
        run_dir: str | Path | None = None,
        wandb_run: Any = None,
        show_progress: bool = True,
    ):
        if not saes:
            raise ValueError("saes must hold at least one SAE")
        if set(saes) != set(hook_names):
            raise ValueError(
                f"saes and hook_names must have the same keys; got {sorted(saes)} and "
                f"{sorted(hook_names)}"
            )
        for name in saes:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"SAE name {name!r} must be a non-empty folder name without '/'")
        self.cfg = trainer_config(cfg)
        self.saes = dict(saes)
        self.hook_names = dict(hook_names)
        self.data_provider = data_provider
        self.evaluator = evaluator
        self.save_checkpoint_fn = save_checkpoint_fn
        self.show_progress = show_progress
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if wandb_run is None and self.cfg.logger.log_to_wandb:
            wandb_run = _active_wandb_run()
        self.wandb_run = wandb_run
        # evaluator results that name no SAE (the SAEs' own rows are in <run_dir>/<name>/)
        self.metrics = MetricsLogger(self.run_dir, wandb_run)
        # the coordinator writes the checkpoints; each SAE's trainer only its files
        per_sae_cfg = replace(
            self.cfg, n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False
        )
        self.trainers: dict[str, PerSAETrainer] = {
            name: PerSAETrainer(
                per_sae_cfg,
                sae,
                SingleHookView(data_provider, self.hook_names[name]),
                run_dir=self.run_dir / name if self.run_dir is not None else None,
                wandb_run=_PrefixedRun(wandb_run, f"{name}/") if wandb_run is not None else None,
                show_progress=False,
            )
            for name, sae in self.saes.items()
        }
        self.n_training_steps = 0
        self.checkpoint_thresholds: list[int] = []
        if self.cfg.n_checkpoints > 0 and (
            self.cfg.checkpoint_path is not None or save_checkpoint_fn is not None
        ):
            total = self.cfg.total_training_samples
            step = math.ceil(total / (self.cfg.n_checkpoints + 1))
            self.checkpoint_thresholds = list(range(0, total, step))[1:]

    # ------------------------------------------------------------------ progress
    @property
    def n_training_samples(self) -> int:
        """Samples every SAE has trained on (they advance together unless one skipped a
        non-finite batch)."""
        return min(t.state.n_training_samples for t in self.trainers.values())

    @property
    def total_training_samples(self) -> int:
        return self.cfg.total_training_samples

    def _unfinished(self) -> dict[str, PerSAETrainer]:
        total = self.total_training_samples
        return {n: t for n, t in self.trainers.items() if t.state.n_training_samples < total}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, TrainingSAE]:
        """Train every SAE to ``total_training_samples``; returns the SAEs with their
        normalisation folded in.

        Ctrl-C (SIGINT) finishes the current step, writes an ``interrupted_<samples>``
        checkpoint (when ``checkpoint_path`` is set) and raises KeyboardInterrupt; a
        second Ctrl-C stops at once (the SAEs that had not stepped on the batch keep it
        pending in that checkpoint)."""
        self._estimate_normalisation()
        pbar = tqdm(
            total=self.total_training_samples,
            initial=self.n_training_samples,
            desc="Training SAEs",
            unit="tok",
            unit_scale=True,
            disable=not self.show_progress,
        )
        quiet = tqdm(disable=True)  # the per-SAE logging rows' postfix goes nowhere
        with deferred_sigint() as interrupted:
            try:
                while self._unfinished():
                    before = self.n_training_samples
                    self._step(quiet)
                    self._maybe_evaluate()
                    self._checkpoint_if_needed()
                    pbar.update(self.n_training_samples - before)
                    if interrupted():
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                pbar.close()
                if self.cfg.checkpoint_path is not None:
                    path = self.save_checkpoint(f"interrupted_{self.n_training_samples}")
                    print(f"\nInterrupted: checkpoint saved to {path}")
                raise
        pbar.close()
        quiet.close()
        for trainer in self.trainers.values():
            trainer.finish()
        if self.cfg.save_final_checkpoint:
            self.save_checkpoint(f"final_{self.n_training_samples}")
        return self.saes

    def _step(self, pbar: Any) -> dict[str, TrainStepOutput | None]:
        """One step: the SAEs with a pending batch (a resumed interrupted step) train on
        it; else one batch is drawn and every unfinished SAE trains on its hook's rows."""
        unfinished = self._unfinished()
        pending = {n: t for n, t in unfinished.items() if t.pending_batch is not None}
        if not pending:
            batch = next(self.data_provider)
            missing = sorted({self.hook_names[n] for n in unfinished} - set(batch))
            if missing:
                raise KeyError(
                    f"the data provider's batch has no activations for hooks {missing}; "
                    f"it has {list(batch)}"
                )
            for name, trainer in unfinished.items():
                trainer.hold(batch[self.hook_names[name]])
            pending = unfinished
            self.n_training_steps += 1
        outputs: dict[str, TrainStepOutput | None] = {}
        for name, trainer in pending.items():
            trainer.begin_step()
            outputs[name] = trainer.train_pending(pbar)
        return outputs

    @torch.no_grad()
    def _estimate_normalisation(self) -> None:
        """The normalisation statistics of every SAE that needs them, from one shared
        set of ``n_batches_for_norm_estimate`` multi-hook batches."""
        needs = [name for name, t in self.trainers.items() if t.needs_normalisation()]
        if not needs:
            return
        cached = [next(self.data_provider) for _ in range(self.cfg.n_batches_for_norm_estimate)]
        for name in needs:
            hook = self.hook_names[name]
            self.trainers[name].estimate_normalisation([b[hook] for b in cached])

    def _maybe_evaluate(self) -> None:
        every = self.cfg.logger.wandb_log_frequency * self.cfg.logger.eval_every_n_wandb_logs
        if self.evaluator is None or self.n_training_steps % every != 0:
            return
        for sae in self.saes.values():
            sae.eval()
        try:
            with torch.no_grad():
                results = self.evaluator(
                    saes=self.saes,
                    data_provider=self.data_provider,
                    activation_scalers={n: t.scaler for n, t in self.trainers.items()},
                    hook_names=self.hook_names,
                )
        finally:
            for sae in self.saes.values():
                sae.train()
        self.log_evaluation(results)

    def log_evaluation(self, results: Mapping[str, Any]) -> None:
        """Route ``{name}/{metric}`` results to that SAE's metrics (as ``metric``); the
        other keys go to the run's own rows (``<run_dir>/metrics.jsonl``, W&B as they
        are)."""
        rows: dict[str, dict[str, Any]] = {name: {} for name in self.trainers}
        run_row: dict[str, Any] = {}
        for key, value in results.items():
            name, sep, metric = key.partition("/")
            if sep and name in rows:
                rows[name][metric] = value
            else:
                run_row[key] = value
        for name, row in rows.items():
            if row:
                self.trainers[name].log_metrics(row, self.trainers[name].state.n_training_steps)
        if run_row:
            self.metrics.log(run_row, self.n_training_steps)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_if_needed(self) -> None:
        """The next scheduled checkpoint once every SAE passed its threshold (dropped
        before writing, so a run resumed from it writes the same later checkpoints)."""
        if self.checkpoint_thresholds and self.n_training_samples > self.checkpoint_thresholds[0]:
            self.checkpoint_thresholds.pop(0)
            self.save_checkpoint(str(self.n_training_samples))

    def save_checkpoint(
        self, checkpoint_name: str, wandb_aliases: list[str] | None = None
    ) -> Path | None:
        """Write ``<checkpoint_path>/<checkpoint_name>/`` (see the module docstring) and
        return it; with ``checkpoint_path`` None nothing is written and
        ``save_checkpoint_fn(checkpoint_path=None)`` is called. ``wandb_aliases`` is
        accepted for SAELens's signature; checkpoints are not uploaded to W&B."""
        del wandb_aliases
        if self.cfg.checkpoint_path is None:
            if self.save_checkpoint_fn is not None:
                self.save_checkpoint_fn(checkpoint_path=None)
            return None
        final = Path(self.cfg.checkpoint_path) / checkpoint_name

        def write(folder: Path) -> None:
            for name, trainer in self.trainers.items():
                sub = folder / name
                sub.mkdir()
                trainer.write_checkpoint_files(sub)
            state = {
                "n_training_steps": self.n_training_steps,
                "checkpoint_thresholds": list(self.checkpoint_thresholds),
                "sae_names": list(self.trainers),
                "hook_names": self.hook_names,
            }
            (folder / MULTI_TRAINER_STATE_FILENAME).write_text(json.dumps(state, indent=2))
            if self.save_checkpoint_fn is not None:
                self.save_checkpoint_fn(checkpoint_path=folder)

        return replace_dir(final, write)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint :meth:`save_checkpoint` wrote: every SAE's weights,
        optimizer, schedules, statistics, normalisation and pending batch, and the
        coordinator's counters. The data position is the data provider's own (the
        runner restores the store from the same folder)."""
        path = recover_dir(Path(path))
        clean_stale(path.parent)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such multi-SAE checkpoint folder")
        missing = [name for name in self.trainers if not (path / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"checkpoint {path} has no sub-folder for the SAEs {missing} (it has "
                f"{sorted(p.name for p in path.iterdir() if p.is_dir())}); a multi-SAE "
                "checkpoint holds one sub-folder per SAE name of the run"
            )
        state_file = path / MULTI_TRAINER_STATE_FILENAME
        state = read_json(state_file) if state_file.is_file() else None
        if state is not None and state.get("hook_names", self.hook_names) != self.hook_names:
            raise ValueError(
                f"{state_file}: the checkpoint's SAEs read the hooks {state['hook_names']}, "
                f"this run's read {self.hook_names}"
            )
        for name, trainer in self.trainers.items():
            trainer.load_checkpoint(path / name)
        if state is not None:
            self.n_training_steps = int(state["n_training_steps"])
            self.checkpoint_thresholds = [int(t) for t in state["checkpoint_thresholds"]]
        else:
            self.n_training_steps = max(t.state.n_training_steps for t in self.trainers.values())


def _active_wandb_run() -> Any:
    try:
        import wandb  # optional dependency (the fastsae[wandb] extra)
    except ImportError:
        raise ValueError(
            "logger.log_to_wandb=True but wandb is not installed: pip install 'fastsae[wandb]'"
        ) from None
    if wandb.run is None:
        raise ValueError(
            "logger.log_to_wandb=True: call wandb.init() before creating the MultiSAETrainer "
            "(or pass wandb_run=, or set log_to_wandb=False)"
        )
    return wandb.run
