"""Several SAEs trained from one model forward pass per store batch (SAELens 6's
``sae_lens.multi_sae_training_runner``).

``MultiSAETrainingRunner(MultiSAETrainingRunnerConfig(saes={...}, hook_names=...)).run()``
trains N SAEs (of any architectures) on one or several hooks of one model: a multi-hook
:class:`~fastsae.training.data.activations_store.ActivationsStore` captures every hook
from a single forward and shuffles the hooks' activations together (their rows stay the
same tokens), and :class:`~fastsae.training.multi_sae_trainer.MultiSAETrainer` gives each
SAE its own :class:`~fastsae.training.trainer.SAETrainer` (optimizer, LR schedule,
coefficient schedules, activation scaler, sparsity tracking), as a single-SAE run has.

Outputs, as SAELens writes them: ``<output_path>/<name>/`` per SAE (the inference SAE,
``sparsity.safetensors``, its ``metrics.jsonl``) and ``<output_path>/runner_cfg.json``;
checkpoints ``<checkpoint_path>/<run id>/<samples>/<name>/`` with the store's state and
``runner_cfg.json`` beside the SAE folders. ``resume_from_checkpoint`` continues from
such a checkpoint exactly.

Limits (SAELens's V1 limits): no command line (configs are built in Python); no
``from_pretrained_path`` per SAE (resume from a multi-SAE checkpoint instead, or pass
``override_saes``); no cached activations; no ``compile_sae``; one process (no data
parallelism or latent sharding). Each raises naming the option.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fastsae.atomic_files import atomic_write_text
from fastsae.evals.config import EvalConfig
from fastsae.evals.run import run_evals
from fastsae.loading.atomic_dir import recover_dir
from fastsae.saes.config import SAE_LENS_FORMAT_VERSION
from fastsae.saes.registry import training_sae_class_for_architecture
from fastsae.saes.training_sae import TrainingSAE, TrainingSAEConfig
from fastsae.training.activation_scaler import ActivationScaler
from fastsae.training.checkpoints import RUNNER_CFG_FILENAME
from fastsae.training.config import (
    LoggingConfig,
    SAETrainerConfig,
    check_mixing_fraction,
    check_seqpos_slice,
)
from fastsae.training.data.activations_store import ActivationsStore
from fastsae.training.data.text_loading import HfDataset
from fastsae.training.multi_sae_trainer import MultiSAETrainer, SingleHookView
from fastsae.training.runner import check_devices_available, load_model, seed_everything

__all__ = [
    "MultiSAEEvaluator",
    "MultiSAETrainingRunner",
    "MultiSAETrainingRunnerConfig",
    "PerSAEEvaluator",
]

PerSAEEvaluator = Callable[[TrainingSAE, Iterator[Tensor], ActivationScaler], dict[str, Any]]
"""A user evaluator run for each SAE: ``(sae, its hook's batches, its scaler) -> dict``;
the runner keys its results ``<sae name>/...``."""

# options of a single-SAE runner config that the multi-SAE runner does not have, and why
_UNSUPPORTED_OPTIONS = {
    "sae": "give the SAE configs as saes={name: config, ...}",
    "hook_name": "give hook_names={name: hook, ...} (or one hook name for every SAE)",
    "hook_head_index": "give hook_head_indices={name: head, ...} (or one int for every SAE)",
    "use_cached_activations": "cached activations are not supported in multi-hook mode",
    "cached_activations_path": "cached activations are not supported in multi-hook mode",
    "from_pretrained_path": (
        "from_pretrained_path is not supported per SAE: resume from a multi-SAE "
        "checkpoint (resume_from_checkpoint) or pass override_saes to the runner"
    ),
    "compile_sae": "compile_sae=True is not supported (compile_llm is)",
    "sae_compilation_mode": "compile_sae is not supported (compile_llm is)",
    "latent_shards": "the multi-SAE runner trains in one process (no latent sharding)",
    "data_parallel_mode": "the multi-SAE runner trains in one process (no data parallelism)",
}
_POSITIVE_INTS = (
    "context_size",
    "n_batches_in_buffer",
    "training_tokens",
    "store_batch_size_prompts",
    "train_batch_size_tokens",
    "dead_feature_window",
    "feature_sampling_window",
    "n_eval_batches",
    "n_batches_for_norm_estimate",
    "n_restart_cycles",
)


@dataclass
class MultiSAETrainingRunnerConfig:
    """A multi-SAE run: SAELens 6's fields and defaults, fastsae's additions last.

    ``saes`` maps a name of your choice (the SAE's output and checkpoint folder) to a
    training SAE config; the architectures may differ. ``hook_names`` maps the same names
    to hook names (TransformerLens hooks or module paths), or is one hook name for every
    SAE; ``hook_head_indices`` likewise (a dict, one int, or None). SAEs that share a
    hook must agree on ``d_in`` and the head index. The other fields mean what they mean
    in :class:`~fastsae.training.config.LanguageModelSAERunnerConfig` and apply to every
    SAE (each SAE has its own optimizer and schedules built from them).
    """

    saes: Mapping[str, TrainingSAEConfig]
    hook_names: Mapping[str, str] | str

    hook_head_indices: dict[str, int | None] | int | None = None

    # data
    model_name: str = "gelu-2l"
    model_class_name: str = "HookedTransformer"
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    streaming: bool = True
    use_chat_formatting: bool = False
    context_size: int = 128

    # activation store
    n_batches_in_buffer: int = 20
    training_tokens: int = 2_000_000
    store_batch_size_prompts: int = 32
    seqpos_slice: tuple[int | None, ...] = (None,)
    disable_concat_sequences: bool = False
    sequence_separator_token: int | Literal["bos", "eos", "sep"] | None = "bos"
    activations_mixing_fraction: float = 0.5

    # devices
    device: str = "cpu"
    llm_device: str | None = None
    act_store_device: str | None = None
    prefetch_llm_batches: bool | int = False

    # performance
    seed: int = 42
    dtype: str = "float32"
    prepend_bos: bool = True
    autocast: bool = False
    autocast_lm: bool = False
    compile_llm: bool = False
    llm_compilation_mode: str | None = None

    # training
    train_batch_size_tokens: int = 4096
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr: float = 3e-4
    lr_scheduler_name: str = "constant"
    lr_warm_up_steps: int = 0
    lr_end: float | None = None
    lr_decay_steps: int = 0
    n_restart_cycles: int = 1

    # dead latents
    dead_feature_window: int = 1000
    feature_sampling_window: int = 2000
    dead_feature_threshold: float = 1e-8

    # evals
    n_eval_batches: int = 10
    eval_batch_size_prompts: int | None = None
    evaluator: PerSAEEvaluator | None = None

    # logging
    logger: LoggingConfig = field(default_factory=LoggingConfig)

    # outputs and checkpoints
    n_checkpoints: int = 0
    checkpoint_path: str | None = "checkpoints"
    save_final_checkpoint: bool = False
    output_path: str | None = "output"
    resume_from_checkpoint: str | None = None

    # misc
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model_from_pretrained_kwargs: dict[str, Any] | None = None
    sae_lens_version: str = SAE_LENS_FORMAT_VERSION
    sae_lens_training_version: str = SAE_LENS_FORMAT_VERSION
    exclude_special_tokens: bool | list[int] = False
    n_batches_for_norm_estimate: int = 1000
    """The batches the normalisation statistics are estimated on are held in memory
    together, every hook's (``n_hooks * d_in`` per token, not ``d_in``)."""

    # derived by __post_init__
    _hook_names_per_sae: dict[str, str] = field(default_factory=dict)
    _hook_head_indices_per_sae: dict[str, int | None] = field(default_factory=dict)

    # fastsae's additions
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm of every SAE, None for none (SAELens hard-codes 1.0)."""
    skip_nonfinite_batches: bool = False
    """A non-finite step of an SAE skips that SAE's batch with a warning instead of
    raising ``NonFiniteLossError``."""

    def __post_init__(self) -> None:
        if not isinstance(self.saes, Mapping) or not self.saes:
            raise ValueError("saes must be a non-empty mapping of SAE name -> training SAE config")
        for name, sae_cfg in self.saes.items():
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                raise ValueError(
                    f"SAE name {name!r}: names are folder names (non-empty, without '/')"
                )
            if not isinstance(sae_cfg, TrainingSAEConfig):
                raise TypeError(
                    f"saes[{name!r}] must be a training SAE config (e.g. "
                    f"TopKTrainingSAEConfig), got {type(sae_cfg).__name__}"
                )
        self._hook_names_per_sae = self._per_sae_hooks()
        self._hook_head_indices_per_sae = self._per_sae_heads()
        self._check_shared_hooks()
        if not isinstance(self.logger, LoggingConfig):
            raise TypeError(f"logger must be a LoggingConfig, got {type(self.logger).__name__}")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_seqpos_slice(self.seqpos_slice, self.context_size)
        check_mixing_fraction(self.activations_mixing_fraction)
        if not isinstance(self.use_chat_formatting, bool):
            raise ValueError(
                f"use_chat_formatting must be a bool, got {self.use_chat_formatting!r}"
            )
        if self.logger.run_name is None:
            archs = sorted({sae.architecture() for sae in self.saes.values()})
            self.logger.run_name = (
                f"multi-{'+'.join(archs)}-N{len(self.saes)}-LR-{self.lr}"
                f"-Tokens-{self.training_tokens:.3e}"
            )
        if self.model_from_pretrained_kwargs is None:
            self.model_from_pretrained_kwargs = (
                {"center_writing_weights": False}
                if self.model_class_name == "HookedTransformer"
                else {}
            )
        if self.llm_device is None:
            self.llm_device = self.device
        if self.act_store_device is None:
            self.act_store_device = self.device
        elif self.act_store_device == "with_model":
            self.act_store_device = self.llm_device
        if not isinstance(self.prefetch_llm_batches, (bool, int)) or self.prefetch_llm_batches < 0:
            raise ValueError(
                "prefetch_llm_batches must be a bool or a non-negative int "
                f"(0 / False: no prefetching), got {self.prefetch_llm_batches!r}"
            )
        if self.lr_end is None:
            self.lr_end = self.lr / 10
        if isinstance(self.checkpoint_path, str) and not self.checkpoint_path.strip():
            raise ValueError(
                "checkpoint_path is an empty string; give a folder or None (no checkpoints)"
            )
        if self.checkpoint_path is None and (self.n_checkpoints > 0 or self.save_final_checkpoint):
            raise ValueError(
                "n_checkpoints / save_final_checkpoint ask for checkpoints but checkpoint_path "
                "is None"
            )
        if self.checkpoint_path is not None:
            unique_id = self.logger.wandb_id or uuid.uuid4().hex[:8]
            self.checkpoint_path = f"{self.checkpoint_path}/{unique_id}"
        if isinstance(self.exclude_special_tokens, list) and not all(
            isinstance(x, int) and not isinstance(x, bool) for x in self.exclude_special_tokens
        ):
            raise ValueError("exclude_special_tokens list must contain only integers")
        self.to_sae_trainer_config()  # the trainer's fields checked now, naming the field

    def _per_sae_hooks(self) -> dict[str, str]:
        if isinstance(self.hook_names, str):
            if not self.hook_names:
                raise ValueError("hook_names must be a non-empty hook name or a mapping")
            return {name: self.hook_names for name in self.saes}
        if not isinstance(self.hook_names, Mapping):
            raise ValueError(
                f"hook_names must be a hook name or a mapping of SAE name -> hook name, got "
                f"{self.hook_names!r}"
            )
        extra = set(self.hook_names) - set(self.saes)
        missing = set(self.saes) - set(self.hook_names)
        if extra or missing:
            raise ValueError(
                "hook_names keys must match saes keys; "
                f"extra: {sorted(extra)}; missing: {sorted(missing)}"
            )
        for name, hook in self.hook_names.items():
            if not isinstance(hook, str) or not hook:
                raise ValueError(f"hook_names[{name!r}] must be a non-empty str, got {hook!r}")
        return {name: self.hook_names[name] for name in self.saes}

    def _per_sae_heads(self) -> dict[str, int | None]:
        heads = self.hook_head_indices
        if heads is None or (isinstance(heads, int) and not isinstance(heads, bool)):
            per_sae = {name: heads for name in self.saes}
        elif isinstance(heads, Mapping):
            extra = set(heads) - set(self.saes)
            if extra:
                raise ValueError(
                    f"hook_head_indices has unknown keys (not in saes): {sorted(extra)}"
                )
            per_sae = {name: heads.get(name) for name in self.saes}
        else:
            raise ValueError(f"hook_head_indices must be None, an int or a mapping, got {heads!r}")
        for name, head in per_sae.items():
            if head is not None and (isinstance(head, bool) or not isinstance(head, int)):
                raise ValueError(f"hook_head_indices[{name!r}] must be an int or None")
            if head is not None and head < 0:
                raise ValueError(f"hook_head_indices[{name!r}] must be >= 0, got {head}")
        return per_sae

    def _check_shared_hooks(self) -> None:
        d_ins: dict[str, int] = {}
        heads: dict[str, int | None] = {}
        for name, hook in self._hook_names_per_sae.items():
            d_in, head = self.saes[name].d_in, self._hook_head_indices_per_sae[name]
            if hook not in d_ins:
                d_ins[hook], heads[hook] = d_in, head
                continue
            if d_ins[hook] != d_in:
                raise ValueError(
                    f"SAEs sharing hook {hook!r} must have the same d_in; "
                    f"saw {d_ins[hook]} and {d_in} (saes[{name!r}])"
                )
            if heads[hook] != head:
                raise ValueError(
                    f"SAEs sharing hook {hook!r} must have the same hook_head_index; "
                    f"saw {heads[hook]} and {head} (saes[{name!r}])"
                )

    @property
    def hook_names_per_sae(self) -> dict[str, str]:
        return self._hook_names_per_sae

    @property
    def hook_head_indices_per_sae(self) -> dict[str, int | None]:
        return self._hook_head_indices_per_sae

    @property
    def total_training_tokens(self) -> int:
        return self.training_tokens

    @property
    def total_training_steps(self) -> int:
        return self.total_training_tokens // self.train_batch_size_tokens

    def to_sae_trainer_config(self) -> SAETrainerConfig:
        """What each SAE's trainer reads (the same for every SAE)."""
        return SAETrainerConfig(
            n_checkpoints=self.n_checkpoints,
            checkpoint_path=self.checkpoint_path,
            save_final_checkpoint=self.save_final_checkpoint,
            total_training_samples=self.total_training_tokens,
            device=self.device,
            autocast=self.autocast,
            lr=self.lr,
            lr_end=self.lr_end,
            lr_scheduler_name=self.lr_scheduler_name,
            lr_warm_up_steps=self.lr_warm_up_steps,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            lr_decay_steps=self.lr_decay_steps,
            n_restart_cycles=self.n_restart_cycles,
            train_batch_size_samples=self.train_batch_size_tokens,
            dead_feature_window=self.dead_feature_window,
            feature_sampling_window=self.feature_sampling_window,
            logger=self.logger,
            n_batches_for_norm_estimate=self.n_batches_for_norm_estimate,
            max_grad_norm=self.max_grad_norm,
            skip_nonfinite_batches=self.skip_nonfinite_batches,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field but ``evaluator`` (a function) and the derived
        per-SAE dicts; ``saes`` holds each SAE's ``to_dict()``."""
        excluded = {"evaluator", "saes", "_hook_names_per_sae", "_hook_head_indices_per_sae"}
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name in excluded:
                continue
            value = getattr(self, f.name)
            if f.name == "logger":
                value = asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            d[f.name] = value
        d["saes"] = {name: cfg.to_dict() for name, cfg in self.saes.items()}
        return d


def _reject_unsupported_options(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def checked(self: MultiSAETrainingRunnerConfig, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key in _UNSUPPORTED_OPTIONS:
                raise ValueError(
                    f"MultiSAETrainingRunnerConfig has no option {key!r}: "
                    f"{_UNSUPPORTED_OPTIONS[key]}"
                )
        init(self, *args, **kwargs)

    return checked


MultiSAETrainingRunnerConfig.__init__ = _reject_unsupported_options(  # type: ignore[method-assign]
    MultiSAETrainingRunnerConfig.__init__
)


@dataclass
class MultiSAEEvaluator:
    """The evaluator of a multi-SAE run (SAELens 6's): :func:`fastsae.evals.run_evals`
    for each SAE in turn (spliced into ``model`` at its hook: CE loss recovered, L2
    norms, sparsity, variance), keyed ``<name>/<group>/<metric>``, when ``model`` is a
    TransformerLens model; the metrics the training rows already log (L0, L1, explained
    variance, MSE) are left out. Then
    ``user_evaluator(sae, its hook's batches, its scaler)`` for each SAE, keyed
    ``<name>/<key>``."""

    model: Any
    activations_store: ActivationsStore
    eval_batch_size_prompts: int | None
    n_eval_batches: int
    model_kwargs: Mapping[str, Any]
    user_evaluator: PerSAEEvaluator | None = None

    def __call__(
        self,
        saes: dict[str, TrainingSAE],
        data_provider: Iterator[dict[str, Tensor]],
        activation_scalers: dict[str, ActivationScaler],
        hook_names: dict[str, str],
    ) -> dict[str, Any]:
        store = self.activations_store
        excluded = store.exclude_special_tokens
        exclude: bool | list[int] = False if excluded is None else excluded.tolist()
        eval_config = EvalConfig(
            batch_size_prompts=self.eval_batch_size_prompts,
            n_eval_reconstruction_batches=self.n_eval_batches,
            n_eval_sparsity_variance_batches=self.n_eval_batches,
            compute_ce_loss=True,
            compute_l2_norms=True,
            compute_sparsity_metrics=True,
            compute_variance_metrics=True,
        )
        already_logged = {
            ("sparsity", "l0"),
            ("sparsity", "l1"),
            ("reconstruction_quality", "explained_variance"),
            ("reconstruction_quality", "explained_variance_legacy"),
            ("reconstruction_quality", "mse"),
        }
        out: dict[str, Any] = {}
        # run_evals takes token rows from the store (stopping its prefetch thread, whose
        # batches are made again, identically, afterwards); it splices SAEs into
        # TransformerLens models only
        spliceable = hasattr(self.model, "run_with_hooks")
        for name, sae in saes.items() if spliceable else ():
            metrics, _ = run_evals(
                sae,
                store,
                self.model,
                activation_scaler=activation_scalers[name],
                eval_config=eval_config,
                model_kwargs=dict(self.model_kwargs),
                exclude_special_tokens=exclude,
            )
            for group, values in metrics.items():
                for key, value in values.items():
                    if (group, key) not in already_logged:
                        out[f"{name}/{group}/{key}"] = value
        if self.user_evaluator is not None:
            for name, sae in saes.items():
                view = SingleHookView(data_provider, hook_names[name])
                for key, value in self.user_evaluator(sae, view, activation_scalers[name]).items():
                    out[f"{name}/{key}"] = value
        return out


class MultiSAETrainingRunner:
    """Train the SAEs of ``cfg`` from one model: ``MultiSAETrainingRunner(cfg).run()``
    returns ``{name: training SAE}`` (SAELens 6's runner).

    ``override_model`` / ``override_dataset``: use these instead of loading
    ``cfg.model_name`` / ``cfg.dataset_path``; ``override_saes``: start from these
    training SAEs (the keys of ``cfg.saes``) instead of fresh ones;
    ``override_tokenizer``: the tokenizer of a ``transformers`` override_model.
    """

    def __init__(
        self,
        cfg: MultiSAETrainingRunnerConfig,
        override_dataset: HfDataset | None = None,
        override_model: Any = None,
        override_saes: Mapping[str, TrainingSAE] | None = None,
        *,
        override_tokenizer: Any = None,
        show_progress: bool = True,
    ):
        if not isinstance(cfg, MultiSAETrainingRunnerConfig):
            raise TypeError(f"cfg must be a MultiSAETrainingRunnerConfig, got {type(cfg).__name__}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                "MultiSAETrainingRunner trains in one process; it was launched with "
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} (torchrun)"
            )
        self.cfg = cfg
        self.show_progress = show_progress
        check_devices_available(cfg)
        if override_saes is not None:
            extra = set(override_saes) - set(cfg.saes)
            missing = set(cfg.saes) - set(override_saes)
            if extra or missing:
                raise ValueError(
                    f"override_saes keys must match cfg.saes; extra: {sorted(extra)}; "
                    f"missing: {sorted(missing)}"
                )
        if override_dataset is None and not cfg.dataset_path:
            raise ValueError(
                "dataset_path is empty: give a Hugging Face dataset, a local file or folder, "
                "or override_dataset"
            )
        seed_everything(cfg.seed)
        self.tokenizer = override_tokenizer
        if override_model is not None:
            self.model = override_model
        else:
            self.model, self.tokenizer = load_model(cfg)  # type: ignore[arg-type]
        if cfg.compile_llm:
            self.model = torch.compile(self.model, mode=cfg.llm_compilation_mode)
        hooks = list(dict.fromkeys(cfg.hook_names_per_sae.values()))
        hook_d_ins: dict[str, int] = {}
        hook_heads: dict[str, int | None] = {}
        for name, hook in cfg.hook_names_per_sae.items():
            hook_d_ins.setdefault(hook, cfg.saes[name].d_in)
            hook_heads.setdefault(hook, cfg.hook_head_indices_per_sae[name])
        self.activations_store = ActivationsStore.from_config_multi_hook(
            self.model,
            dataset=override_dataset if override_dataset is not None else cfg.dataset_path,
            hook_names=hooks,
            hook_d_ins=hook_d_ins,
            hook_head_indices=hook_heads,
            streaming=cfg.streaming,
            context_size=cfg.context_size,
            n_batches_in_buffer=cfg.n_batches_in_buffer,
            total_training_tokens=cfg.training_tokens,
            store_batch_size_prompts=cfg.store_batch_size_prompts,
            train_batch_size_tokens=cfg.train_batch_size_tokens,
            prepend_bos=cfg.prepend_bos,
            device=cfg.act_store_device or cfg.device,
            dtype=cfg.dtype,
            model_kwargs=cfg.model_kwargs,
            autocast_lm=cfg.autocast_lm,
            dataset_trust_remote_code=cfg.dataset_trust_remote_code,
            seqpos_slice=tuple(cfg.seqpos_slice),
            exclude_special_tokens=cfg.exclude_special_tokens,
            disable_concat_sequences=cfg.disable_concat_sequences,
            sequence_separator_token=cfg.sequence_separator_token,
            activations_mixing_fraction=cfg.activations_mixing_fraction,
            use_chat_formatting=cfg.use_chat_formatting,
            tokenizer=self.tokenizer,
            seed=cfg.seed,
            prefetch_llm_batches=cfg.prefetch_llm_batches,
        )
        self.activations_store.show_progress = show_progress
        if override_saes is None:
            self.saes: dict[str, TrainingSAE] = {
                name: training_sae_class_for_architecture(sae_cfg.architecture())(sae_cfg)
                for name, sae_cfg in cfg.saes.items()
            }
        else:
            self.saes = {name: override_saes[name] for name in cfg.saes}
        for sae in self.saes.values():
            sae.to(cfg.device)
        self.evaluator = MultiSAEEvaluator(
            model=self.model,
            activations_store=self.activations_store,
            eval_batch_size_prompts=cfg.eval_batch_size_prompts,
            n_eval_batches=cfg.n_eval_batches,
            model_kwargs=cfg.model_kwargs,
            user_evaluator=cfg.evaluator,
        )
        self.trainer: MultiSAETrainer | None = None

    def run(self) -> dict[str, TrainingSAE]:
        """Train; write each SAE (inference format) to ``<output_path>/<name>/`` and the
        runner config to ``<output_path>/runner_cfg.json``; return the training SAEs."""
        cfg = self.cfg
        self._set_sae_metadata()
        run_dir = Path(cfg.output_path) if cfg.output_path is not None else None
        wandb_run = None
        if cfg.logger.log_to_wandb:
            import wandb  # optional dependency (the fastsae[wandb] extra): only when logging

            wandb_run = wandb.init(
                project=cfg.logger.wandb_project,
                entity=cfg.logger.wandb_entity,
                config=cfg.to_dict(),
                name=cfg.logger.run_name,
                id=cfg.logger.wandb_id,
            )
        try:
            trainer = self.trainer = MultiSAETrainer(
                cfg.to_sae_trainer_config(),
                self.saes,
                cfg.hook_names_per_sae,
                self.activations_store.get_multi_hook_data_loader(),
                evaluator=self.evaluator,
                save_checkpoint_fn=self._save_runner_checkpoint_files,
                run_dir=run_dir,
                wandb_run=wandb_run,
                show_progress=self.show_progress,
            )
            if cfg.resume_from_checkpoint is not None:
                path = recover_dir(Path(cfg.resume_from_checkpoint))
                trainer.load_checkpoint(path)
                self.activations_store.load_from_checkpoint(path)
            saes = trainer.fit()
        finally:
            self.activations_store.close()  # stop the store's prefetch thread, if any
            if wandb_run is not None:
                wandb_run.finish()
        if run_dir is not None:
            self._save_final_outputs(run_dir, trainer)
        return saes

    def _set_sae_metadata(self) -> None:
        cfg = self.cfg
        for name, sae in self.saes.items():
            md = sae.cfg.metadata
            md.dataset_path = cfg.dataset_path
            md.hook_name = cfg.hook_names_per_sae[name]
            md.model_name = cfg.model_name
            md.model_class_name = cfg.model_class_name
            md.hook_head_index = cfg.hook_head_indices_per_sae[name]
            md.context_size = cfg.context_size
            md.seqpos_slice = list(cfg.seqpos_slice)
            md.model_from_pretrained_kwargs = cfg.model_from_pretrained_kwargs
            md.prepend_bos = cfg.prepend_bos
            md.exclude_special_tokens = cfg.exclude_special_tokens
            md.sequence_separator_token = cfg.sequence_separator_token
            md.disable_concat_sequences = cfg.disable_concat_sequences

    def _runner_cfg_text(self) -> str:
        return json.dumps(self.cfg.to_dict(), indent=2, default=str)

    def _save_runner_checkpoint_files(self, checkpoint_path: Path | None) -> None:
        """Inside each checkpoint folder: the store's exact position and the runner
        config (SAELens's file names)."""
        if checkpoint_path is None:
            return
        self.activations_store.save_to_checkpoint(checkpoint_path)
        (Path(checkpoint_path) / RUNNER_CFG_FILENAME).write_text(self._runner_cfg_text())

    def _save_final_outputs(self, base: Path, trainer: MultiSAETrainer) -> None:
        """``<base>/<name>/``: each inference SAE with its log sparsity (one folder swap
        each); ``<base>/runner_cfg.json``."""
        base.mkdir(parents=True, exist_ok=True)
        for name, sae in self.saes.items():
            sae.to_inference_sae().save_model(
                base / name, sparsity=trainer.trainers[name].log_feature_sparsity
            )
        atomic_write_text(base / RUNNER_CFG_FILENAME, self._runner_cfg_text())
