"""``LanguageModelSAERunnerConfig``: SAELens 6.x's training config, nested or flat.

The module holds, in this order:

* :class:`LoggingConfig` and :class:`LanguageModelSAERunnerConfig`, each field with its
  docstring, in SAELens 6's field order (fastsae's additions last);
* :class:`SAETrainerConfig`: what :class:`~fastsae.training.trainer.SAETrainer` itself
  reads (SAELens 6's trainer config), which a runner config converts to
  (``to_sae_trainer_config``);
* ``check_runner_config``: every field validated before anything runs, with errors that
  name the field (and the defaults that depend on other fields filled);
* the ``sae=`` argument and the older flat form of SAELens < 6 (``architecture``,
  ``expansion_factor``, ``activation_fn_kwargs``, ...) turned into a training SAE config;
* the generic key and type checks every level of the config uses (``reject_unknown_keys``,
  ``check_field_types``);
* serialisation: ``to_dict``/``to_json``/``to_yaml`` and ``from_dict``/``from_json``/
  ``from_yaml`` round-trip the nested form.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
import types
import typing
import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from fastsae.atomic_files import atomic_write_text
from fastsae.saes.config import NORMALIZE_ACTIVATIONS, SAE_LENS_FORMAT_VERSION, str_to_dtype
from fastsae.saes.training_sae import TrainingSAEConfig, training_config_class_for_architecture
from fastsae.training.recipe import apply_sae_recipe, check_inits, recipe_settings

T_TRAINING_SAE_CONFIG = TypeVar("T_TRAINING_SAE_CONFIG", bound=TrainingSAEConfig)


@dataclass
class LoggingConfig:
    """Where metrics go: JSONL + PNG locally always; Weights & Biases when ``log_to_wandb``."""

    log_to_wandb: bool = False
    """Log to Weights & Biases too (needs ``wandb``; SAELens defaults to True)."""
    log_activations_store_to_wandb: bool = False
    """Accepted for SAELens configs; fastsae does not read it."""
    log_optimizer_state_to_wandb: bool = False
    """Accepted for SAELens configs; fastsae does not read it."""
    log_weights_to_wandb: bool = True
    """Accepted for SAELens configs; fastsae does not read it."""
    wandb_project: str = "sae_lens_training"
    """The Weights & Biases project."""
    wandb_id: str | None = None
    """The Weights & Biases run id (None: a new one)."""
    run_name: str | None = None
    """The run's name (None: ``{architecture}-{d_sae}-LR-{lr}-Tokens-{training_tokens}``)."""
    wandb_entity: str | None = None
    """The Weights & Biases entity (None: the default one)."""
    wandb_log_frequency: int = 10
    """Log every this many steps (JSONL, Weights & Biases, progress bar)."""
    eval_every_n_wandb_logs: int = 100
    """Run the evals every this many logs."""

    def __post_init__(self) -> None:
        for name in ("wandb_log_frequency", "eval_every_n_wandb_logs"):
            check_positive_int(self, name)


_LOGGER_KEYS = {f.name for f in fields(LoggingConfig)}


def _logging_config(logger: Any) -> LoggingConfig:
    """``logger=`` as a :class:`LoggingConfig` (a mapping's keys and types checked)."""
    if isinstance(logger, LoggingConfig):
        return logger
    if not isinstance(logger, dict):
        raise ValueError(f"logger must be a LoggingConfig or a mapping, got {logger!r}")
    reject_unknown_keys("logger", logger, _LOGGER_KEYS)
    check_field_types("logger.", LoggingConfig, logger)
    return LoggingConfig(**logger)


@dataclass(init=False)
class LanguageModelSAERunnerConfig(Generic[T_TRAINING_SAE_CONFIG]):
    """Everything a training run needs: SAELens 6.x's names and defaults (deliberate
    differences noted on the field), validated on construction.

    Two spellings build the same config:

    * 6.x nested: ``LanguageModelSAERunnerConfig(sae=TopKTrainingSAEConfig(d_in=768,
      d_sae=16384, k=64), hook_name=..., ...)``
    * the older flat form of the tutorials: ``LanguageModelSAERunnerConfig(architecture=
      "topk", d_in=768, expansion_factor=16, activation_fn_kwargs={"k": 64},
      l1_coefficient=..., log_to_wandb=..., ...)``: SAE fields go to ``cfg.sae``, logging
      fields to ``cfg.logger``; reading them flat (``cfg.l1_coefficient``) still works.
    """

    sae: T_TRAINING_SAE_CONFIG
    """The SAE to train (e.g. ``TopKTrainingSAEConfig``), or a mapping of its fields with its
    ``architecture``; built from the flat SAE fields when not given."""

    # ---------------------------------------------------------------- model and data
    model_name: str = "gelu-2l"
    """The model: a TransformerLens name, a Hugging Face model id, or a local folder."""
    model_class_name: str = "HookedTransformer"
    """``"HookedTransformer"`` (TransformerLens 3), ``"TransformerBridge"`` (TransformerLens
    4) or ``"AutoModel"`` (any ``transformers`` model)."""
    hook_name: str = "blocks.0.hook_mlp_out"
    """Where the activations are read: a TransformerLens hook, or the module path of a
    ``transformers`` model (``encoder.layer.3``)."""
    hook_eval: str = "NOT_IN_USE"
    """Deprecated in SAELens 6 and unused there too: a value other than the default warns."""
    hook_head_index: int | None = None
    """With a hook that has a head dimension, the one head to train on."""
    dataset_path: str = ""
    """A Hugging Face dataset, a local file or a local folder (not needed with
    ``use_cached_activations``)."""
    dataset_trust_remote_code: bool = False
    """Let the dataset run its own loading code (SAELens defaults to True)."""
    streaming: bool = True
    """Stream the dataset instead of downloading it whole."""
    is_dataset_tokenized: bool = True
    """Accepted for SAELens configs; the dataset's column (text or token ids) decides."""
    use_chat_formatting: bool = False
    """Tokenize each document with the tokenizer's chat template (``apply_chat_template``)
    and pack the ids into rows like text, as SAELens 6 does. The store reads the first of
    the columns "conversation", "conversations", "messages" (lists of ``{"role",
    "content"}`` messages) or "text" (each string one user message); the tokenizer must
    have a ``chat_template``."""
    context_size: int = 128
    """Tokens per sequence the model runs on."""
    use_cached_activations: bool = False
    """Train on activations written by ``fastsae cache`` instead of running the model."""
    cached_activations_path: str | None = None
    """The cached activations' folder; required with ``use_cached_activations`` (SAELens
    derives a default from the dataset, model and hook)."""

    # ---------------------------------------------------------------- SAE
    from_pretrained_path: str | None = None
    """A saved SAE whose weights the training starts from (fine-tuning)."""

    # ---------------------------------------------------------------- activations store
    n_batches_in_buffer: int = 20
    """Contexts the shuffling buffer holds (``n_batches_in_buffer * context_size``
    activations after ``seqpos_slice``, as in sae-lens 6; at least one training batch);
    a larger buffer shuffles better."""
    training_tokens: int = 2_000_000
    """Tokens to train on: ``training_tokens // train_batch_size_tokens`` steps."""
    store_batch_size_prompts: int = 32
    """Prompts per model batch when generating activations."""
    seqpos_slice: tuple[int | None, ...] = (None,)
    """The positions of each sequence trained on, as ``slice`` arguments (``(start,
    stop[, step])``, step > 0), e.g. ``(5, -5)``."""
    disable_concat_sequences: bool = False
    """Don't concatenate documents into sequences: documents shorter than
    ``context_size`` are dropped."""
    sequence_separator_token: int | str | None = "bos"
    """The token put between concatenated documents: a token id, ``"bos"``, ``"eos"``,
    ``"sep"``, or None for none."""
    activations_mixing_fraction: float = 0.5
    """Fraction of the shuffling buffer kept to mix with new activations (higher: more
    mixing, more model batches per served batch); 0 serves activations in order."""

    # ---------------------------------------------------------------- devices and dtype
    device: str = "cpu"
    """Device of the SAE, and the default for the model."""
    llm_device: str | None = None
    """Device of the model (None: ``device``)."""
    act_store_device: str | None = None
    """Device of the shuffling buffer (None or ``"with_model"``: ``llm_device``; SAELens
    uses ``device`` for None)."""
    prefetch_llm_batches: bool | int = False
    """Run the model on the next token batches on a background thread while training
    (True: one batch ahead; an int n: up to n); the batches, their order and exact resume
    are the same as without it."""
    seed: int = 42
    """Seed of the SAE's initialisation and of the data order."""
    dtype: str = "float32"
    """Dtype of the SAE and the activations (``"float32"``, ``"bfloat16"``, ...)."""
    prepend_bos: bool = True
    """Prepend the BOS token to each sequence; use what the model was trained with."""

    # ---------------------------------------------------------------- performance
    autocast: bool = False
    """bf16 autocast of the SAE training step."""
    autocast_lm: bool = False
    """bf16 autocast of the model's forward while generating activations."""
    compile_llm: bool = False
    """Accepted for SAELens configs (``torch.compile`` of the model); no effect here."""
    llm_compilation_mode: str | None = None
    """Accepted for SAELens configs (the model's ``torch.compile`` mode); no effect here."""
    compile_sae: bool = False
    """Accepted for SAELens configs (``torch.compile`` of the SAE); no effect here."""
    sae_compilation_mode: str | None = None
    """Accepted for SAELens configs (the SAE's ``torch.compile`` mode); no effect here."""

    # ---------------------------------------------------------------- optimisation
    train_batch_size_tokens: int = 4096
    """Tokens (activations) per SAE training step."""
    adam_beta1: float = 0.9
    """Adam's beta1, in [0, 1)."""
    adam_beta2: float = 0.999
    """Adam's beta2, in [0, 1)."""
    lr: float = 3e-4
    """The learning rate."""
    lr_scheduler_name: str = "constant"
    """``"constant"``, ``"cosineannealing"`` or ``"cosineannealingwarmrestarts"``."""
    lr_warm_up_steps: int = 0
    """Steps of linear warm-up to ``lr`` at the start."""
    lr_end: float | None = None
    """The learning rate the cosine schedules anneal to, and the linear decay starts from
    (None: ``lr / 10``)."""
    lr_decay_steps: int = 0
    """Steps of linear decay to 0 at the end (from ``lr_end``, or ``lr`` when constant)."""
    n_restart_cycles: int = 1
    """Cycles of ``"cosineannealingwarmrestarts"``."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm, None for none (fastsae addition: SAELens hard-codes 1.0)."""

    # ---------------------------------------------------------------- dead latents
    dead_feature_window: int = 1000
    """Steps without firing after which a latent counts as dead."""
    feature_sampling_window: int = 2000
    """Steps over which firing frequencies are measured (and logged) before a reset."""
    dead_feature_threshold: float = 1e-8
    """Accepted for SAELens configs; fastsae does not read it."""

    # ---------------------------------------------------------------- evals and logging
    n_eval_batches: int = 10
    """Batches each eval runs on."""
    eval_batch_size_prompts: int | None = None
    """Prompts per eval batch (None: ``store_batch_size_prompts``)."""
    logger: LoggingConfig = field(default_factory=LoggingConfig)
    """Where metrics go (:class:`LoggingConfig`, or a mapping of its fields)."""

    # ---------------------------------------------------------------- outputs and checkpoints
    n_checkpoints: int = 0
    """Checkpoints saved during training, evenly spaced."""
    checkpoint_path: str | None = "checkpoints"
    """Folder of the checkpoints; the run id is appended (None: no checkpoints)."""
    save_final_checkpoint: bool = False
    """Also save a checkpoint when training ends."""
    output_path: str | None = "output"
    """Folder of the final SAE, ``metrics.jsonl`` and ``training_curves.png`` (None: none
    written)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder to resume the run from."""

    # ---------------------------------------------------------------- misc
    verbose: bool = True
    """Log the run's plan (steps, buffer, sparsity windows) to ``fastsae.logger`` at INFO."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the model's forward when generating activations."""
    model_from_pretrained_kwargs: dict[str, Any] | None = None
    """Keyword arguments of the model's ``from_pretrained`` (None:
    ``{"center_writing_weights": False}`` for ``HookedTransformer``, else ``{}``)."""
    sae_lens_version: str = SAE_LENS_FORMAT_VERSION
    """The SAELens version whose format this config is (what sae-lens writes here)."""
    sae_lens_training_version: str = SAE_LENS_FORMAT_VERSION
    """The SAELens training version the run matches; written to the SAE's metadata."""
    exclude_special_tokens: bool | list[int] = False
    """Drop the activations of special tokens: True for all of the tokenizer's, or a list of
    token ids."""
    n_batches_for_norm_estimate: int = 1000
    """Batches the activation-norm scaling factor is estimated on (with
    ``normalize_activations="expected_average_only_in"``)."""

    # ---------------------------------------------------------------- fastsae additions
    run_id: str | None = None
    """The run's id, the name of its checkpoint folder (None: a random one)."""
    latent_shards: int = 1
    """Under ``torchrun``, split the SAE's per-latent parameters (``W_enc``, ``b_enc``,
    ``W_dec``, JumpReLU's ``threshold``, and their Adam state) over this many ranks
    (:mod:`fastsae.training.parallel.latent.trainer`). It must divide the world size (the
    ranks form a ``WORLD_SIZE / latent_shards`` data-parallel x ``latent_shards`` mesh) and
    ``d_sae``, and needs a ``topk``, ``batchtopk``, ``standard`` or ``jumprelu`` SAE with
    ``normalize_activations="none"``. 1: plain data parallel."""
    data_parallel_mode: str | None = None
    """How the data-parallel replicas get their rows of each global batch. ``"shard"`` (the
    default for a live model): each replica tokenizes its own documents (every replica-th
    one) and runs the model on their rows, so that work is divided too; a checkpoint
    resumes exactly under the same number of replicas, under another it continues from the
    furthest saved stream position (the saved shuffling buffers skipped, with a warning).
    ``"split"`` (the default, and the only mode, for cached activations): every replica
    computes the whole global batch and keeps its rows, so the batches are those of a
    single-process run and a checkpoint resumes exactly under any world size."""
    skip_nonfinite_batches: bool = False
    """A step whose loss or gradient is NaN/inf stops the run with ``NonFiniteLossError``
    (naming the step and the batch rows); True skips such a batch with a warning instead
    (nothing of it applied, counted in the metrics as ``details/n_skipped_batches``)."""
    b_dec_init: str = "zeros"
    """How ``b_dec`` starts: ``"zeros"`` (SAELens), or the ``"mean"`` or
    ``"geometric_median"`` of the first training batch (:mod:`fastsae.training.recipe`)."""
    decoder_init: str = "random"
    """How the decoder starts: ``"random"`` (SAELens: random directions at
    ``decoder_init_norm``) or ``"data"`` (row ``i`` along the ``i``-th activation read at
    the start, centred by ``b_dec``; the encoder is the transpose either way)."""
    recipe: str | None = None
    """None: SAELens's training. ``"fastsae"``: fastsae's recipe
    (:data:`fastsae.training.recipe.RECIPES`: initialisation from data, ...), setting
    each of its fields that this config's caller did not give."""

    def __init__(self, sae: TrainingSAEConfig | dict[str, Any] | None = None, **kwargs: Any):
        names = {f.name: f for f in fields(self)}
        runner_kwargs: dict[str, Any] = {}
        logger_kwargs: dict[str, Any] = {}
        flat_sae: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in names and key not in ("sae", "dtype", "device") or key in ("dtype", "device"):
                runner_kwargs[key] = value
            elif key in _LOGGER_KEYS:
                logger_kwargs[key] = value
            elif key in LEGACY_IGNORED:
                warnings.warn(
                    f"LanguageModelSAERunnerConfig: {key!r} is a SAELens < 6 option that "
                    "SAELens 6 (and fastsae) no longer use; it is ignored",
                    DeprecationWarning,
                    stacklevel=2,
                )
            else:
                flat_sae[key] = value
        for name, f in names.items():
            if name == "sae":
                continue
            if name in runner_kwargs:
                value = runner_kwargs[name]
            elif f.default is not MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            setattr(self, name, value)
        recipe = recipe_settings(self.recipe)
        for name, value in recipe.items():
            if "." not in name and name not in runner_kwargs:  # the caller's value wins
                setattr(self, name, value)
        self.logger = _logging_config(self.logger)
        for key, value in logger_kwargs.items():
            setattr(self.logger, key, value)
        self.logger.__post_init__()
        self.sae = resolve_sae_config(
            sae, flat_sae, dtype=self.dtype, device=self.device, names=[*names, *_LOGGER_KEYS]
        )
        self.sae = apply_sae_recipe(self.sae, recipe)
        self.__post_init__()
        if "dataset_path" in runner_kwargs and not self.use_cached_activations:
            # left out, it is asked for when the data is (SAETrainingRunner); given empty
            # (an unset shell variable), it is refused now
            require_dataset_path(self)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        check_runner_config(self)

    # ------------------------------------------------------------------ derived
    @property
    def total_training_steps(self) -> int:
        return self.training_tokens // self.train_batch_size_tokens

    @property
    def total_training_tokens(self) -> int:
        return self.training_tokens

    @property
    def d_in(self) -> int:
        return self.sae.d_in

    @property
    def tokens_per_buffer(self) -> int:
        return self.train_batch_size_tokens * self.context_size * self.n_batches_in_buffer

    def __getattr__(self, name: str) -> Any:
        # flat reads of SAE and logging fields (cfg.l1_coefficient, cfg.log_to_wandb)
        if name.startswith("_") or name in ("sae", "logger"):
            raise AttributeError(name)
        for owner in ("sae", "logger"):
            obj = self.__dict__.get(owner)
            if obj is not None and name in {f.name for f in fields(obj)}:
                return getattr(obj, name)
        raise AttributeError(f"LanguageModelSAERunnerConfig has no field {name!r}")

    def get_training_sae_cfg_dict(self) -> dict[str, Any]:
        """The training SAE config as a dict (``self.sae.to_dict()``), as SAELens has it."""
        return self.sae.to_dict()

    def to_sae_trainer_config(self) -> SAETrainerConfig:
        """What :class:`~fastsae.training.trainer.SAETrainer` reads of this run: SAELens's
        fields (tokens are the trainer's samples) and fastsae's ``max_grad_norm`` and
        ``skip_nonfinite_batches``. The ``logger`` is this config's own object."""
        return SAETrainerConfig(
            total_training_samples=self.total_training_tokens,
            train_batch_size_samples=self.train_batch_size_tokens,
            lr=self.lr,
            lr_end=self.lr_end,
            lr_scheduler_name=self.lr_scheduler_name,
            lr_warm_up_steps=self.lr_warm_up_steps,
            lr_decay_steps=self.lr_decay_steps,
            n_restart_cycles=self.n_restart_cycles,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            device=self.device,
            autocast=self.autocast,
            dead_feature_window=self.dead_feature_window,
            feature_sampling_window=self.feature_sampling_window,
            n_checkpoints=self.n_checkpoints,
            checkpoint_path=self.checkpoint_path,
            save_final_checkpoint=self.save_final_checkpoint,
            logger=self.logger,
            n_batches_for_norm_estimate=self.n_batches_for_norm_estimate,
            max_grad_norm=self.max_grad_norm,
            skip_nonfinite_batches=self.skip_nonfinite_batches,
            b_dec_init=self.b_dec_init,
            decoder_init=self.decoder_init,
        )

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        """Nested, JSON/YAML-ready dict (``sae`` holds the SAE config with its architecture)."""
        res: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "sae":
                value = value.to_dict()
                value["metadata"] = {
                    k: v
                    for k, v in value["metadata"].items()
                    if k not in ("training_architecture", "training_architecture_details")
                }
            elif f.name == "logger":
                value = asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            res[f.name] = value
        return res

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LanguageModelSAERunnerConfig:
        """Nested (``sae: {...}``) or flat (``architecture: topk, d_in: ...``) dicts."""
        if not isinstance(data, dict):
            raise TypeError(f"a runner config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        sae = data.pop("sae", None)
        if sae is not None and not isinstance(sae, (dict, TrainingSAEConfig)):
            raise ValueError(
                "sae must be a mapping of the SAE's fields (architecture, d_in, d_sae, ...), "
                f"got {sae!r}"
            )
        if isinstance(data.get("seqpos_slice"), list):
            data["seqpos_slice"] = tuple(data["seqpos_slice"])
        if data.get("dataset_path") == "":
            # what to_dict writes for a config built without one: read back as left out
            # (the runner asks for it when the data is needed)
            data.pop("dataset_path")
        return cls(sae=sae, **data)

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    def to_yaml(self, path: str | Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> LanguageModelSAERunnerConfig:
        """The config in a JSON file, with ``overrides`` (runner fields, e.g. ``recipe``)
        in place of the file's values."""
        return cls.from_dict({**read_mapping(Path(path), json.loads), **overrides})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> LanguageModelSAERunnerConfig:
        """The config in a YAML file, with ``overrides`` in place of the file's values."""
        return cls.from_dict({**read_mapping(Path(path), load_yaml), **overrides})

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> LanguageModelSAERunnerConfig:
        """``.yaml``/``.yml`` or ``.json`` by extension; ``overrides`` as in
        :meth:`from_json`."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            return cls.from_yaml(path, **overrides)
        if path.suffix == ".json":
            return cls.from_json(path, **overrides)
        raise ValueError(f"{path}: config files must end in .yaml, .yml or .json")


@dataclass
class SAETrainerConfig:
    """What :class:`~fastsae.training.trainer.SAETrainer` reads: SAELens 6's trainer
    config (its fields, order and defaults; fastsae's additions last), for training on
    activations of your own::

        SAETrainer(cfg=SAETrainerConfig(total_training_samples=..., train_batch_size_samples=...,
                   lr=...), sae=..., data_provider=...)

    A runner config gives one with ``to_sae_trainer_config()``. Validated on construction
    (errors name the field); ``lr_end`` None becomes ``lr / 10`` as in the runner config.
    """

    total_training_samples: int
    """Activations (samples) to train on: ``total_training_samples //
    train_batch_size_samples`` steps."""
    train_batch_size_samples: int
    """Activations per training step (the rows of each batch the data provider yields)."""
    lr: float = 3e-4
    """The learning rate."""
    lr_end: float | None = None
    """The learning rate the cosine schedules anneal to, and the linear decay starts from
    (None: ``lr / 10``)."""
    lr_scheduler_name: str = "constant"
    """``"constant"``, ``"cosineannealing"`` or ``"cosineannealingwarmrestarts"``."""
    lr_warm_up_steps: int = 0
    """Steps of linear warm-up to ``lr`` at the start."""
    lr_decay_steps: int = 0
    """Steps of linear decay to 0 at the end."""
    n_restart_cycles: int = 1
    """Cycles of ``"cosineannealingwarmrestarts"``."""
    adam_beta1: float = 0.9
    """Adam's beta1, in [0, 1)."""
    adam_beta2: float = 0.999
    """Adam's beta2, in [0, 1)."""
    device: str = "cpu"
    """Device of the SAE (and of the dead-latent statistics)."""
    autocast: bool = False
    """bf16 autocast of the training step."""
    dead_feature_window: int = 1000
    """Steps without firing after which a latent counts as dead."""
    feature_sampling_window: int = 2000
    """Steps over which firing frequencies are measured (and logged) before a reset."""
    n_checkpoints: int = 0
    """Checkpoints saved during training, evenly spaced."""
    checkpoint_path: str | None = None
    """Folder of the checkpoints (None: none written; a ``save_checkpoint_fn`` is still
    called, with ``checkpoint_path=None``, as in SAELens)."""
    save_final_checkpoint: bool = False
    """Also save a checkpoint when training ends."""
    logger: LoggingConfig = field(default_factory=lambda: LoggingConfig(log_to_wandb=False))
    """Logging cadence (``wandb_log_frequency``, ``eval_every_n_wandb_logs``) and W&B."""
    n_batches_for_norm_estimate: int = 1000
    """Batches the activation-norm scaling factor is estimated on (with
    ``normalize_activations="expected_average_only_in"``)."""

    # ---------------------------------------------------------------- fastsae additions
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm, None for none (SAELens hard-codes 1.0)."""
    skip_nonfinite_batches: bool = False
    """Skip a batch whose step is not finite (with a warning) instead of raising
    ``NonFiniteLossError``."""
    b_dec_init: str = "zeros"
    """``"zeros"`` (SAELens), ``"mean"`` or ``"geometric_median"`` of the first batch
    (:mod:`fastsae.training.recipe`)."""
    decoder_init: str = "random"
    """``"random"`` (SAELens) or ``"data"``: decoder rows along the first ``d_sae``
    activations, centred by ``b_dec`` (:mod:`fastsae.training.recipe`)."""

    def __post_init__(self) -> None:
        check_inits(self.b_dec_init, self.decoder_init)
        self.logger = _logging_config(self.logger)
        check_field_types(
            "", SAETrainerConfig, {f.name: getattr(self, f.name) for f in fields(self)},
            skip=("device",),
        )  # fmt: skip
        for name in (
            "total_training_samples",
            "train_batch_size_samples",
            "dead_feature_window",
            "feature_sampling_window",
            "n_restart_cycles",
            "n_batches_for_norm_estimate",
        ):
            check_positive_int(self, name)
        for name in ("lr_warm_up_steps", "lr_decay_steps", "n_checkpoints"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.total_training_samples < self.train_batch_size_samples:
            raise ValueError(
                f"total_training_samples={self.total_training_samples} is less than one batch "
                f"(train_batch_size_samples={self.train_batch_size_samples}): the run would "
                "train no step"
            )
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        check_lr_schedule(self, self.total_training_steps)
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if isinstance(self.checkpoint_path, str) and not self.checkpoint_path.strip():
            raise ValueError(
                "checkpoint_path is an empty string, which would mean the current folder; "
                "give a folder (use '.' for the current one) or leave it unset (None)"
            )

    @property
    def total_training_steps(self) -> int:
        return self.total_training_samples // self.train_batch_size_samples


# ======================================================================================
# checks
# Every field of a runner config validated (errors name the field), and the defaults
# that depend on other fields filled: lr_end, llm_device, act_store_device,
# model_from_pretrained_kwargs, logger.run_name.
# ======================================================================================


def check_positive_int(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_seqpos_slice(seqpos_slice: Any, context_size: int) -> int:
    """Validate ``seqpos_slice`` (1 to 3 ``slice`` arguments, a positive step) against
    ``context_size``; return the number of positions it keeps (an error when none)."""
    if not isinstance(seqpos_slice, (tuple, list)) or not 1 <= len(seqpos_slice) <= 3:
        raise ValueError(
            f"seqpos_slice must be a tuple of 1 to 3 ints/None (slice arguments), "
            f"got {seqpos_slice!r}"
        )
    for v in seqpos_slice:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"seqpos_slice entries must be int or None, got {seqpos_slice!r}")
    if len(seqpos_slice) == 3 and seqpos_slice[2] is not None and seqpos_slice[2] <= 0:
        raise ValueError(f"seqpos_slice step must be positive, got {seqpos_slice!r}")
    n_pos = len(range(context_size)[slice(*seqpos_slice)])
    if n_pos == 0:
        raise ValueError(
            f"seqpos_slice={tuple(seqpos_slice)!r} keeps no position of context_size={context_size}"
        )
    return n_pos


def check_mixing_fraction(fraction: Any) -> None:
    """``activations_mixing_fraction`` is a number in [0, 1]: the share of the shuffling
    buffer kept to mix with the next activations (0 serves them in order, unshuffled)."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not (0 <= fraction <= 1)
    ):
        raise ValueError(f"activations_mixing_fraction must be in [0, 1], got {fraction!r}")


def buffer_size_tokens(n_batches_in_buffer: int, n_pos: int, train_batch_size_tokens: int) -> int:
    """The shuffling buffer's size in activations: ``n_batches_in_buffer`` training
    contexts of ``n_pos`` positions each (sae-lens 6's meaning), and never less than one
    training batch (where sae-lens 6 raises, the buffer grows to one batch)."""
    return max(n_batches_in_buffer * n_pos, train_batch_size_tokens)


def _check_types(cfg: LanguageModelSAERunnerConfig) -> None:
    """Every scalar field of the runner, its ``logger`` and its ``sae`` holds a value of
    its annotated type (before any check compares or uses one)."""
    # dtype may be a torch.dtype and the devices torch.devices; their own checks read them
    devices = ("dtype", "device", "llm_device", "act_store_device")
    check_field_types(
        "", type(cfg), {f.name: getattr(cfg, f.name) for f in fields(cfg)}, skip=devices
    )
    logger = cfg.logger
    check_field_types(
        "logger.", type(logger), {f.name: getattr(logger, f.name) for f in fields(logger)}
    )
    sae = cfg.sae
    check_field_types(
        "sae.", type(sae), {f.name: getattr(sae, f.name) for f in fields(sae)}, skip=devices
    )


def _check_the_run_trains(cfg: LanguageModelSAERunnerConfig) -> None:
    """Refuse the settings under which a run would train nothing, or silently not do
    what it was asked (before the model loads)."""
    if cfg.training_tokens < cfg.train_batch_size_tokens:
        raise ValueError(
            f"training_tokens={cfg.training_tokens} is less than one batch "
            f"(train_batch_size_tokens={cfg.train_batch_size_tokens}): the run would train "
            "no step; raise training_tokens or lower train_batch_size_tokens"
        )
    check_seqpos_slice(cfg.seqpos_slice, cfg.context_size)
    if cfg.checkpoint_path is None:
        asked = [
            f"{name}={getattr(cfg, name)!r}"
            for name in ("n_checkpoints", "save_final_checkpoint")
            if getattr(cfg, name)
        ]
        if asked:
            raise ValueError(
                f"{' and '.join(asked)} ask for checkpoints but checkpoint_path is None: "
                "give checkpoint_path (or set n_checkpoints=0, save_final_checkpoint=False)"
            )


def check_lr_schedule(cfg: Any, total_training_steps: int) -> None:
    """The LR schedule's fields of a runner or trainer config (``lr_end`` None filled
    with ``lr / 10``)."""
    if cfg.lr_scheduler_name.lower() not in (
        "constant",
        "cosineannealing",
        "cosineannealingwarmrestarts",
    ):
        raise ValueError(
            "lr_scheduler_name must be 'constant', 'cosineannealing' or "
            f"'cosineannealingwarmrestarts', got {cfg.lr_scheduler_name!r}"
        )
    if cfg.lr_end is None:
        cfg.lr_end = cfg.lr / 10
    if cfg.lr_decay_steps > 0 and cfg.lr_end == 0:
        raise ValueError("lr_decay_steps > 0 needs lr_end > 0 (it decays from lr_end to 0)")
    if cfg.lr_warm_up_steps + cfg.lr_decay_steps > total_training_steps:
        raise ValueError(
            f"lr_warm_up_steps + lr_decay_steps ({cfg.lr_warm_up_steps} + "
            f"{cfg.lr_decay_steps}) exceed the run's {total_training_steps} steps"
        )


def require_dataset_path(cfg: Any) -> None:
    """Raise naming ``dataset_path`` when the run needs text data and the config names
    none (checked when the data is needed: a config may be built without one)."""
    if not cfg.dataset_path:
        raise ValueError(
            "dataset_path is empty: give a Hugging Face dataset, a local file or folder "
            "(or use_cached_activations with cached_activations_path)"
        )


def check_runner_config(cfg: LanguageModelSAERunnerConfig) -> None:
    """Validate a runner config's fields and fill the defaults that depend on others."""
    _check_types(cfg)
    for name in (
        "context_size",
        "n_batches_in_buffer",
        "training_tokens",
        "store_batch_size_prompts",
        "train_batch_size_tokens",
        "dead_feature_window",
        "feature_sampling_window",
        "n_restart_cycles",
        "n_batches_for_norm_estimate",
        "latent_shards",
    ):
        check_positive_int(cfg, name)
    if cfg.data_parallel_mode not in (None, "shard", "split"):
        raise ValueError(
            f"data_parallel_mode must be None, 'shard' or 'split', got {cfg.data_parallel_mode!r}"
        )
    if cfg.data_parallel_mode == "shard" and cfg.use_cached_activations:
        raise ValueError(
            "data_parallel_mode='shard' runs the model on each rank's own token rows; "
            "with use_cached_activations use 'split' (or None)"
        )
    check_inits(cfg.b_dec_init, cfg.decoder_init)
    if cfg.recipe is not None:
        recipe_settings(cfg.recipe, cfg.sae.architecture())  # a known recipe for this SAE
    if cfg.latent_shards > 1 and (cfg.b_dec_init, cfg.decoder_init) != ("zeros", "random"):
        raise ValueError(
            f"b_dec_init={cfg.b_dec_init!r} / decoder_init={cfg.decoder_init!r} (initialising "
            "from data) is not supported with latent_shards > 1; use latent_shards=1 or "
            "b_dec_init='zeros', decoder_init='random'"
        )
    if cfg.sae.d_sae % cfg.latent_shards:
        raise ValueError(
            f"latent_shards={cfg.latent_shards} must divide sae.d_sae={cfg.sae.d_sae} "
            "(each rank holds d_sae / latent_shards latents)"
        )
    for name in ("lr_warm_up_steps", "lr_decay_steps", "n_checkpoints", "n_eval_batches"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0):
        raise ValueError(f"lr must be > 0, got {cfg.lr!r}")
    _check_the_run_trains(cfg)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    check_lr_schedule(cfg, cfg.total_training_steps)
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {cfg.max_grad_norm!r}")
    str_to_dtype(cfg.dtype)
    if cfg.llm_device is None:
        cfg.llm_device = cfg.device
    if cfg.act_store_device is None or cfg.act_store_device == "with_model":
        cfg.act_store_device = cfg.llm_device
    check_mixing_fraction(cfg.activations_mixing_fraction)
    if cfg.hook_eval != "NOT_IN_USE":
        warnings.warn(
            "hook_eval is deprecated (as in SAELens 6) and not used: evaluation reads hook_name",
            DeprecationWarning,
            stacklevel=3,
        )
    if not isinstance(cfg.use_chat_formatting, bool):
        raise ValueError(f"use_chat_formatting must be a bool, got {cfg.use_chat_formatting!r}")
    prefetch = cfg.prefetch_llm_batches
    if not isinstance(prefetch, (bool, int)) or (not isinstance(prefetch, bool) and prefetch < 0):
        raise ValueError(f"prefetch_llm_batches must be a bool or an int >= 0, got {prefetch!r}")
    for name in (
        "output_path",
        "checkpoint_path",
        "cached_activations_path",
        "resume_from_checkpoint",
    ):
        value = getattr(cfg, name)
        # "" would mean the current folder: an unset shell variable writing (or reading) there
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                f"{name} is an empty string, which would mean the current folder; give a "
                "folder (use '.' for the current one) or leave it unset (null)"
            )
    if cfg.use_cached_activations and not cfg.cached_activations_path:
        raise ValueError("use_cached_activations=True needs cached_activations_path")
    cfg.seqpos_slice = tuple(cfg.seqpos_slice)
    if cfg.sae.normalize_activations not in NORMALIZE_ACTIVATIONS:
        raise ValueError(f"sae.normalize_activations: {cfg.sae.normalize_activations!r}")
    if cfg.model_from_pretrained_kwargs is None:
        cfg.model_from_pretrained_kwargs = (
            {"center_writing_weights": False} if cfg.model_class_name == "HookedTransformer" else {}
        )
    if cfg.logger.log_to_wandb:
        try:
            # optional dependency: wandb (the [wandb] extra); only whether it is installed
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError(
                "log_to_wandb=True but wandb is not installed: pip install 'fastsae[wandb]'"
            ) from None
    if cfg.logger.run_name is None:
        cfg.logger.run_name = (
            f"{cfg.sae.architecture()}-{cfg.sae.d_sae}-LR-{cfg.lr}-Tokens-"
            f"{cfg.training_tokens:3.3e}"
        )


# ======================================================================================
# the sae= argument and the flat form
# ``sae=`` (a training SAE config, a mapping, or None with the flat SAE fields) turned
# into the training SAE config the runner holds. The flat form is SAELens < 6's:
# ``architecture``, ``expansion_factor``, ``activation_fn(_kwargs)``, ``l1_coefficient``,
# ``use_ghost_grads``, ...; the SAELens < 6 keys that 6.x dropped are accepted with a
# warning (LEGACY_IGNORED).
# ======================================================================================

# Flat-form keys of SAELens < 6 that 6.x dropped: accepted with a DeprecationWarning and
# ignored (LanguageModelSAERunnerConfig.__init__).
LEGACY_IGNORED = {
    "hook_layer": None,
    "b_dec_init_method": None,
    "normalize_sae_decoder": None,
    "decoder_heuristic_init": None,
    "init_encoder_as_decoder_transpose": None,
    "scale_sparsity_penalty_by_decoder_norm": None,
    "decoder_orthogonal_init": None,
    "mse_loss_normalization": None,
    "noise_scale": None,
    "finetuning_method": None,
    "finetuning_tokens": None,
    "model_class_name_eval": None,
    "resume": None,
}
# flat keys that only describe the SAE
SAE_FLAT_KEYS = {"architecture", "expansion_factor", "activation_fn", "activation_fn_kwargs"}


def resolve_sae_config(
    sae: TrainingSAEConfig | dict[str, Any] | None,
    flat_sae: dict[str, Any],
    *,
    dtype: str,
    device: str,
    names: Iterable[str],
) -> TrainingSAEConfig:
    """The runner's training SAE config from ``sae=`` and the flat SAE keyword arguments
    (``names``: every name the runner config knows, for did-you-mean hints)."""
    names = list(names)
    if isinstance(sae, dict):
        sae = sae_config_from_dict(sae, dtype=dtype, device=device)
    if sae is None:
        sae = sae_config_from_flat(flat_sae, dtype=dtype, device=device, runner_fields=names)
    elif flat_sae:
        sae_fields = [f.name for f in fields(sae)] if is_dataclass(sae) else []
        reject_unknown_keys(
            "LanguageModelSAERunnerConfig",
            flat_sae,
            (),
            hints_from=[*names, *sae_fields],
            note=" (with sae= given, SAE fields belong in the SAE config)",
        )
    if not isinstance(sae, TrainingSAEConfig):
        raise TypeError(
            "sae must be a training SAE config (e.g. TopKTrainingSAEConfig) or a mapping "
            f"with its architecture, got {type(sae).__name__}"
        )
    return sae


def sae_config_from_dict(data: dict[str, Any], *, dtype: Any, device: Any) -> TrainingSAEConfig:
    """The training SAE config a runner config's ``sae:`` mapping describes, with errors
    that name the field: an unknown key (with a did-you-mean), a value of the wrong type,
    a missing ``d_sae`` (which ``expansion_factor`` x ``d_in`` may give instead).

    Unlike :meth:`TrainingSAEConfig.from_dict` (which reads cfg.json files written by any
    SAELens version and so ignores keys it does not know), nothing here is dropped: this
    mapping is written by a user, and a dropped ``topk: 4`` would train with k=100."""
    data = dict(data)
    arch = data.pop("architecture", None)
    if arch is None:
        raise ValueError(
            "sae: the mapping has no 'architecture' key (e.g. architecture: topk, "
            "jumprelu, batchtopk, standard)"
        )
    if not isinstance(arch, str):
        raise ValueError(f"sae.architecture must be a string, got {arch!r}")
    cfg_cls = training_config_class_for_architecture(arch)
    if "metadata" in data:
        metadata = data["metadata"]
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, Mapping):
            raise ValueError(f"sae.metadata must be a mapping, got {metadata!r}")
        # what the config itself records of its training architecture (to_dict)
        data["metadata"] = {
            k: v
            for k, v in metadata.items()
            if k not in ("training_architecture", "training_architecture_details")
        }
    return build_training_sae_config(
        cfg_cls,
        data,
        where=f"sae (architecture {arch!r})",
        prefix="sae.",
        default_expansion_factor=None,
        dtype=dtype,
        device=device,
    )


def sae_config_from_flat(
    flat: dict[str, Any], *, dtype: str, device: str, runner_fields: list[str]
) -> TrainingSAEConfig:
    """The older flat spelling -> a nested training SAE config (``runner_fields``: the
    runner config's field names, for did-you-mean hints)."""
    flat = dict(flat)
    activation_fn = flat.pop("activation_fn", None)
    fn_kwargs = flat.pop("activation_fn_kwargs", None)
    if fn_kwargs is None:
        fn_kwargs = {}
    if not isinstance(fn_kwargs, dict):
        raise ValueError(f"activation_fn_kwargs must be a mapping, got {fn_kwargs!r}")
    arch = flat.pop("architecture", None)
    if arch is None:
        arch = "topk" if activation_fn == "topk" else "standard"
    if activation_fn not in (None, "relu", "topk"):
        raise ValueError(f"activation_fn must be 'relu' or 'topk', got {activation_fn!r}")
    if activation_fn == "topk" and arch not in ("topk", "batchtopk", "matryoshka_batchtopk"):
        raise ValueError(f"activation_fn='topk' does not go with architecture={arch!r}")
    cfg_cls = training_config_class_for_architecture(arch)
    valid = [f.name for f in fields(cfg_cls)]
    reject_unknown_keys(
        "activation_fn_kwargs", fn_kwargs, valid, note=f" for architecture {arch!r}"
    )
    check_field_types("activation_fn_kwargs.", cfg_cls, fn_kwargs)
    if "d_in" not in flat:
        raise ValueError("the flat config form needs d_in (or pass sae=...Config(d_in=...))")
    if isinstance(flat.get("normalize_activations"), bool):
        flat["normalize_activations"] = (
            "expected_average_only_in" if flat["normalize_activations"] else "none"
        )
    if flat.get("use_ghost_grads") and arch != "standard":
        raise ValueError(f"use_ghost_grads is only for architecture='standard', not {arch!r}")
    if flat.get("use_ghost_grads") is False and arch != "standard":
        flat.pop("use_ghost_grads")
    kwargs = {**fn_kwargs, **flat}
    return build_training_sae_config(
        cfg_cls,
        kwargs,
        where="LanguageModelSAERunnerConfig",
        prefix="",
        note=f" for architecture {arch!r}",
        hints_from=runner_fields,
        default_expansion_factor=4,
        dtype=dtype,
        device=device,
    )


def build_training_sae_config(
    cfg_cls: type[TrainingSAEConfig],
    kwargs: dict[str, Any],
    *,
    where: str,
    prefix: str,
    note: str = "",
    hints_from: Iterable[str] = (),
    default_expansion_factor: int | None,
    dtype: Any,
    device: Any,
) -> TrainingSAEConfig:
    """``cfg_cls(**kwargs)`` after the checks that turn a user's typo into an error that
    names the field: unknown keys (with a did-you-mean), value types, missing required
    fields. ``d_sae`` may be given as ``expansion_factor`` (x ``d_in``); without either,
    ``default_expansion_factor`` (the flat form's 4) or an error when None.

    Args:
        where / note: the level and its qualifier for unknown-key messages.
        prefix: put before field names in type and missing-field messages (``"sae."``).
        hints_from: further names a misspelt key may have meant.
        dtype / device: the runner's, unless ``kwargs`` gives its own.
    """
    kwargs = dict(kwargs)
    valid = {f.name for f in fields(cfg_cls)}
    reject_unknown_keys(
        where, kwargs, valid | {"expansion_factor"}, hints_from=hints_from, note=note
    )
    expansion = kwargs.pop("expansion_factor", None)
    if kwargs.get("d_sae") is None:
        kwargs.pop("d_sae", None)
    check_field_types(prefix, cfg_cls, kwargs, skip=("dtype", "device"))
    if expansion is not None and (
        isinstance(expansion, bool) or not isinstance(expansion, int) or expansion <= 0
    ):
        raise ValueError(f"{prefix}expansion_factor must be a positive int, got {expansion!r}")
    if "d_in" in kwargs and "d_sae" not in kwargs:
        factor = default_expansion_factor if expansion is None else expansion
        if factor is not None:
            kwargs["d_sae"] = kwargs["d_in"] * factor
    elif (
        "d_in" in kwargs and expansion is not None and kwargs["d_sae"] != kwargs["d_in"] * expansion
    ):
        raise ValueError(
            f"{prefix}d_sae={kwargs['d_sae']} and {prefix}expansion_factor={expansion} "
            f"disagree for {prefix}d_in={kwargs['d_in']}"
        )
    missing = [
        f.name
        for f in fields(cfg_cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in kwargs
    ]
    if missing:
        how = ""
        if "d_sae" in missing:
            how = " (or expansion_factor: d_sae = d_in * expansion_factor)"
        raise ValueError(
            f"{prefix.rstrip('.') or where}: missing required field"
            f"{'s' if len(missing) > 1 else ''} {missing}{how} for {cfg_cls.__name__}"
        )
    kwargs.setdefault("dtype", dtype)
    kwargs.setdefault("device", device)
    return cfg_cls(**kwargs)


# ======================================================================================
# key and type checks
# Shared by every level of the runner config: the top level, ``sae:``, ``logger:`` and
# the flat form's ``activation_fn_kwargs``.
#
# * ``reject_unknown_keys``: a key no field has is an error with a did-you-mean, never
#   dropped (a dropped ``topk: 4`` would train with the default k).
# * ``check_field_types``: scalar fields (int, float, bool, str, and lists / unions of them)
#   must hold a value of their annotated type, checked before the value is compared or
#   used, so a wrong type is an error that names the field instead of a raw ``TypeError``
#   (or a string ``"no"`` taken as a true bool).
# ======================================================================================

_UNION_ORIGINS = (typing.Union, types.UnionType)
_SCALAR_NAMES = {bool: "a bool", int: "an int", float: "a finite number", str: "a string"}


def reject_unknown_keys(
    where: str,
    given: Iterable[str],
    known: Collection[str],
    *,
    hints_from: Iterable[str] = (),
    note: str = "",
) -> None:
    """Raise ``ValueError`` naming the keys of ``given`` that are not in ``known``.

    Args:
        where: the level the keys were found at (``"LanguageModelSAERunnerConfig"``,
            ``"sae (architecture 'topk')"``, ``"logger"``), the message's start.
        given: the keys the user wrote.
        known: the keys that level accepts.
        hints_from: further names a misspelling may have meant (e.g. the runner's
            fields when the key was read as an SAE field); ``known`` always is one.
        note: appended to the list of unknown keys (why they are unknown here).
    """
    unknown = sorted(k for k in given if k not in known)
    if not unknown:
        return
    candidates = [str(k) for k in dict.fromkeys([*known, *hints_from])]
    hints = []
    for key in unknown:
        close = _closest(str(key), candidates)
        if close is not None:
            hints.append(f"{key!r} -> did you mean {close!r}?")
    plural = "s" if len(unknown) > 1 else ""
    raise ValueError(
        f"{where}: unknown field{plural} {unknown}{note}"
        + ("; " + "; ".join(hints) if hints else "")
    )


def _closest(key: str, candidates: list[str]) -> str | None:
    """difflib's closest candidate; failing that, one the key ends with once case and
    underscores are ignored (``topk`` / ``top_k`` -> ``k``), too short for difflib."""
    by_folded = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(key.lower(), list(by_folded), n=1)
    if close:
        return by_folded[close[0]]
    folded = key.lower().replace("_", "")
    ends = [c for c in candidates if folded.endswith(c.lower().replace("_", ""))]
    return max(ends, key=len) if ends else None


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field_types(
    where: str, cls: type, values: Mapping[str, Any], *, skip: Collection[str] = ()
) -> None:
    """Raise ``ValueError`` for a value of ``values`` that does not fit the annotation of
    the field of dataclass ``cls`` of the same name.

    Only annotations built from ``int``, ``float``, ``bool``, ``str``, ``None``,
    ``Literal``, ``Any`` and ``list``/``tuple``/``dict`` of those are checked; fields
    typed by a class (``metadata``, ``logger``) have checks of their own, as have the
    names in ``skip``. An int is a number, a bool is not; numbers must be finite; a
    string field also takes an ``os.PathLike`` (path fields are often pathlib.Path objects).

    Args:
        where: prefix of the field name in the message (``""``, ``"sae."``, ``"logger."``).
        cls: the dataclass whose annotations are the expected types.
        values: field name -> value (names ``cls`` does not have are not checked here).
        skip: fields to leave to their own checks (e.g. ``dtype``, which may be a
            ``torch.dtype``).
    """
    hints = _type_hints(cls)
    for name, value in values.items():
        if name in skip or name not in hints:
            continue
        hint = hints[name]
        expected = _describe(hint)
        if expected is None or _fits(hint, value):
            continue
        message = f"{where}{name} must be {expected}, got {value!r} ({type(value).__name__})"
        if isinstance(value, str) and _is_number(value) and "number" in expected:
            message += ": a quoted number is a string; write it without quotes"
        raise ValueError(message)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe(hint: Any) -> str | None:
    """The English for a checkable annotation; None for one this check leaves alone."""
    if hint is Any:
        return "anything"
    if hint is type(None):
        return "null"
    if hint in _SCALAR_NAMES:
        return _SCALAR_NAMES[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in _UNION_ORIGINS:
        parts = [_describe(a) for a in args]
        return None if None in parts else " or ".join(parts)  # type: ignore[arg-type]
    if origin in (list, tuple):
        item_args = [a for a in args if a is not Ellipsis]
        items = [_describe(a) for a in item_args]
        if None in items:
            return None
        return "a list" + (f" of ({' | '.join(items)})" if items else "")  # type: ignore[arg-type]
    if origin is dict or hint is dict:
        return "a mapping"
    return None


def _fits(hint: Any, value: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if hint is str:
        # path fields (output_path, dataset_path, ...) are often given as pathlib.Paths
        return isinstance(value, (str, os.PathLike))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in _UNION_ORIGINS:
        return any(_fits(a, value) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(
                _fits(a, v) for a, v in zip(args, value, strict=True)
            )
        item = args[0] if args else Any
        return all(_fits(item, v) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    return True


# ======================================================================================
# serialisation
# What the config's to_/from_json and to_/from_yaml use: the YAML loader, reading a
# YAML/JSON mapping from disk with errors that name the file, and atomic writes.
# ======================================================================================


class _ConfigYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a number in exponent notation without a dot or
    without a signed exponent (``1e-4``, ``1.0e4``, ``3E5``) is a float, as in YAML 1.2,
    not a string (YAML 1.1): configs write learning rates that way."""


_ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse a YAML config (safe loader; exponent-notation numbers are floats)."""
    return yaml.load(text, Loader=_ConfigYamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_mapping(path: Path, parse: Any) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = parse(path.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.')}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data
