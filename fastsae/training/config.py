"""``LanguageModelSAERunnerConfig``: SAELens 6.x's training config, nested or flat.

Two spellings build the same config:

* 6.x nested: ``LanguageModelSAERunnerConfig(sae=TopKTrainingSAEConfig(d_in=768,
  d_sae=16384, k=64), hook_name=..., ...)``
* the older flat form of the tutorials: ``LanguageModelSAERunnerConfig(architecture=
  "topk", d_in=768, expansion_factor=16, activation_fn_kwargs={"k": 64},
  l1_coefficient=..., log_to_wandb=..., ...)``: SAE fields go to ``cfg.sae``, logging
  fields to ``cfg.logger``; reading them flat (``cfg.l1_coefficient``) still works.

Every field is validated before anything runs, with errors that name the field.
``to_dict``/``to_json``/``to_yaml`` and ``from_dict``/``from_json``/``from_yaml``
round-trip the nested form. The field checks live in :mod:`fastsae.training.config_checks`,
the serialisation helpers in :mod:`fastsae.training.config_io`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fastsae.training.config_checks import (
    check_positive_int,
    check_runner_config,
    resolve_sae_config,
)
from fastsae.training.config_fields import check_field_types, reject_unknown_keys
from fastsae.training.config_flat import LEGACY_IGNORED
from fastsae.training.config_io import (
    atomic_write_text,
    load_yaml,
    read_mapping,
    runner_config_to_dict,
)
from fastsae.training.saes.base import TrainingSAEConfig


@dataclass
class LoggingConfig:
    """Where metrics go. JSONL + PNG locally always; Weights & Biases when ``log_to_wandb``.

    ``wandb_log_frequency``: log every this many steps (JSONL, wandb, progress bar).
    ``eval_every_n_wandb_logs``: run the evals every this many logs.
    """

    log_to_wandb: bool = False
    wandb_project: str = "sae_lens_training"
    wandb_id: str | None = None
    run_name: str | None = None
    wandb_entity: str | None = None
    wandb_log_frequency: int = 10
    eval_every_n_wandb_logs: int = 100
    log_activations_store_to_wandb: bool = False
    log_optimizer_state_to_wandb: bool = False
    log_weights_to_wandb: bool = True

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
class LanguageModelSAERunnerConfig:
    """Everything a training run needs (SAELens 6.x names and defaults, with the
    deliberate differences noted on the field).

    Model and data: ``model_name`` (TransformerLens name, a Hugging Face model id, or a
    local folder), ``model_class_name`` (``"HookedTransformer"``, TransformerLens 3;
    ``"TransformerBridge"``, TransformerLens 4; or ``"AutoModel"`` for any
    ``transformers`` model), ``hook_name`` (TransformerLens hook, or the module path
    of a ``transformers`` model such as ``encoder.layer.3``), ``hook_head_index``,
    ``dataset_path`` (HF dataset, local file or folder), ``streaming``,
    ``is_dataset_tokenized``, ``context_size``, ``prepend_bos``,
    ``exclude_special_tokens``, ``seqpos_slice``, ``disable_concat_sequences``,
    ``sequence_separator_token``, ``use_cached_activations`` / ``cached_activations_path``
    (activations written by ``fastsae cache``).

    Batching: ``train_batch_size_tokens`` (SAE batch), ``store_batch_size_prompts``
    (model batch), ``n_batches_in_buffer`` (shuffling buffer), ``training_tokens``.

    Optimisation: ``lr``, ``adam_beta1``/``adam_beta2``, ``lr_scheduler_name``
    (``constant``, ``cosineannealing``, ``cosineannealingwarmrestarts``),
    ``lr_warm_up_steps``, ``lr_decay_steps``, ``lr_end`` (default lr/10),
    ``n_restart_cycles``, ``max_grad_norm`` (gradient clipping; SAELens hard-codes 1.0),
    ``autocast`` (bf16 autocast of the SAE step), ``dead_feature_window`` (steps without
    firing after which a latent is dead), ``feature_sampling_window``,
    ``dead_feature_threshold``, ``skip_nonfinite_batches`` (fastsae addition: skip a
    batch whose step is NaN/inf with a warning instead of stopping the run).

    Outputs: ``checkpoint_path`` (a run id is appended), ``n_checkpoints``,
    ``save_final_checkpoint``, ``resume_from_checkpoint``, ``output_path`` (final SAE,
    ``metrics.jsonl``, ``training_curves.png``; fastsae addition), ``logger``
    (:class:`LoggingConfig`), ``n_eval_batches``, ``eval_batch_size_prompts``.

    Devices: ``device`` (SAE), ``llm_device``, ``act_store_device``, ``dtype``,
    ``autocast_lm``, ``seed``.

    Multi-GPU (fastsae additions): under ``torchrun`` the run is data parallel by
    default. ``latent_shards`` (default 1): when > 1, the SAE's per-latent parameters
    (``W_enc``, ``b_enc``, ``W_dec``, JumpReLU's ``threshold``, and their Adam state) are
    split over that many ranks (:mod:`fastsae.training.sharded_trainer`); it must divide
    the world size (the ranks form a ``WORLD_SIZE / latent_shards`` data-parallel x
    ``latent_shards`` mesh) and ``d_sae``, and needs a ``topk``, ``batchtopk``,
    ``standard`` or ``jumprelu`` SAE with ``normalize_activations="none"``. ``data_parallel_mode``: how
    the data-parallel replicas get their rows of each global batch: ``"shard"`` (the
    default for a live model) each replica tokenizes its own documents (every
    replica-th document) and runs the model on their rows, so that work is divided too; ``"split"`` (the
    default, and the only mode, for cached activations) every replica computes the whole
    global batch and keeps its rows: the batches are then those of a single-process run
    and a checkpoint resumes exactly under any world size. A ``"shard"`` checkpoint
    resumes exactly under the same number of replicas; under another it continues from
    the furthest saved stream position (the saved shuffling buffers are skipped, with a
    warning).
    """

    sae: TrainingSAEConfig
    model_name: str = "gelu-2l"
    model_class_name: str = "HookedTransformer"
    hook_name: str = "blocks.0.hook_mlp_out"
    hook_head_index: int | None = None
    dataset_path: str = ""
    dataset_trust_remote_code: bool = False
    streaming: bool = True
    is_dataset_tokenized: bool = True
    context_size: int = 128
    use_cached_activations: bool = False
    cached_activations_path: str | None = None
    from_pretrained_path: str | None = None
    n_batches_in_buffer: int = 20
    training_tokens: int = 2_000_000
    store_batch_size_prompts: int = 32
    seqpos_slice: tuple[int | None, ...] = (None,)
    disable_concat_sequences: bool = False
    sequence_separator_token: int | str | None = "bos"
    activations_mixing_fraction: float = 0.5
    use_chat_formatting: bool = False
    prefetch_llm_batches: bool | int = False
    device: str = "cpu"
    llm_device: str | None = None
    act_store_device: str | None = None
    seed: int = 42
    dtype: str = "float32"
    prepend_bos: bool = True
    autocast: bool = False
    autocast_lm: bool = False
    compile_llm: bool = False
    llm_compilation_mode: str | None = None
    compile_sae: bool = False
    sae_compilation_mode: str | None = None
    train_batch_size_tokens: int = 4096
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr: float = 3e-4
    lr_scheduler_name: str = "constant"
    lr_warm_up_steps: int = 0
    lr_end: float | None = None
    lr_decay_steps: int = 0
    n_restart_cycles: int = 1
    max_grad_norm: float | None = 1.0
    dead_feature_window: int = 1000
    feature_sampling_window: int = 2000
    dead_feature_threshold: float = 1e-8
    n_eval_batches: int = 10
    eval_batch_size_prompts: int | None = None
    logger: LoggingConfig = field(default_factory=LoggingConfig)
    n_checkpoints: int = 0
    checkpoint_path: str | None = "checkpoints"
    save_final_checkpoint: bool = False
    output_path: str | None = "output"
    resume_from_checkpoint: str | None = None
    verbose: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model_from_pretrained_kwargs: dict[str, Any] | None = None
    exclude_special_tokens: bool | list[int] = False
    n_batches_for_norm_estimate: int = 1000
    run_id: str | None = None
    latent_shards: int = 1
    data_parallel_mode: str | None = None
    # a step whose loss or gradient is NaN/inf stops the run with NonFiniteLossError
    # (naming the step and the batch rows); True skips such a batch with a warning
    # instead (nothing of it applied, counted in metrics as details/n_skipped_batches)
    skip_nonfinite_batches: bool = False

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
        self.logger = _logging_config(self.logger)
        for key, value in logger_kwargs.items():
            setattr(self.logger, key, value)
        self.logger.__post_init__()
        self.sae = resolve_sae_config(
            sae, flat_sae, dtype=self.dtype, device=self.device, names=[*names, *_LOGGER_KEYS]
        )
        self.__post_init__()

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        check_runner_config(self)  # fastsae.training.config_checks

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

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        """Nested, JSON/YAML-ready dict (``sae`` holds the SAE config with its architecture)."""
        return runner_config_to_dict(self)

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
        return cls(sae=sae, **data)

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    def to_yaml(self, path: str | Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_json(cls, path: str | Path) -> LanguageModelSAERunnerConfig:
        return cls.from_dict(read_mapping(Path(path), json.loads))

    @classmethod
    def from_yaml(cls, path: str | Path) -> LanguageModelSAERunnerConfig:
        return cls.from_dict(read_mapping(Path(path), load_yaml))

    @classmethod
    def from_file(cls, path: str | Path) -> LanguageModelSAERunnerConfig:
        """``.yaml``/``.yml`` or ``.json`` by extension."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            return cls.from_yaml(path)
        if path.suffix == ".json":
            return cls.from_json(path)
        raise ValueError(f"{path}: config files must end in .yaml, .yml or .json")
