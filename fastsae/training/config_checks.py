"""Field checks of the runner config (:mod:`fastsae.training.config`).

``check_runner_config`` validates every field of a
:class:`~fastsae.training.config.LanguageModelSAERunnerConfig` (and fills the defaults
that depend on other fields: ``lr_end``, ``llm_device``, ``act_store_device``,
``model_from_pretrained_kwargs``, ``logger.run_name``); ``resolve_sae_config`` turns the
``sae=`` argument (a training SAE config, a dict, or ``None`` with flat SAE fields) into
the training SAE config the runner holds. Errors name the field.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from fastsae.saes.config import NORMALIZE_ACTIVATIONS, str_to_dtype
from fastsae.training.config_flat import sae_config_from_flat, suggest
from fastsae.training.saes.base import TrainingSAEConfig


def _positive_int(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def resolve_sae_config(
    sae: TrainingSAEConfig | dict[str, Any] | None,
    flat_sae: dict[str, Any],
    *,
    dtype: str,
    device: str,
    names: dict[str, Any],
) -> TrainingSAEConfig:
    """The runner's training SAE config from ``sae=`` and the flat SAE keyword arguments
    (``names``: the runner config's fields by name, for did-you-mean hints)."""
    if isinstance(sae, dict):
        sae = TrainingSAEConfig.from_dict({"dtype": dtype, "device": device, **sae})
    if sae is None:
        sae = sae_config_from_flat(flat_sae, dtype=dtype, device=device, runner_fields=list(names))
    elif flat_sae:
        sae_fields = dict.fromkeys(f.name for f in fields(sae)) if is_dataclass(sae) else {}
        raise ValueError(
            "LanguageModelSAERunnerConfig: unknown fields "
            f"{sorted(flat_sae)} (with sae= given, SAE fields belong in the SAE config)"
            + suggest(flat_sae, {**names, **sae_fields})
        )
    if not isinstance(sae, TrainingSAEConfig):
        raise TypeError(
            "sae must be a training SAE config (e.g. TopKTrainingSAEConfig), "
            f"got {type(sae).__name__}"
        )
    return sae


def check_runner_config(cfg: Any) -> None:
    """Validate a runner config's fields and fill the defaults that depend on others."""
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
        _positive_int(cfg, name)
    if cfg.data_parallel_mode not in (None, "shard", "split"):
        raise ValueError(
            f"data_parallel_mode must be None, 'shard' or 'split', got {cfg.data_parallel_mode!r}"
        )
    if cfg.data_parallel_mode == "shard" and cfg.use_cached_activations:
        raise ValueError(
            "data_parallel_mode='shard' runs the model on each rank's own token rows; "
            "with use_cached_activations use 'split' (or None)"
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
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
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
    if cfg.lr_warm_up_steps + cfg.lr_decay_steps > cfg.total_training_steps:
        raise ValueError(
            f"lr_warm_up_steps + lr_decay_steps ({cfg.lr_warm_up_steps} + "
            f"{cfg.lr_decay_steps}) exceed the run's {cfg.total_training_steps} steps"
        )
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {cfg.max_grad_norm!r}")
    str_to_dtype(cfg.dtype)
    if cfg.llm_device is None:
        cfg.llm_device = cfg.device
    if cfg.act_store_device is None or cfg.act_store_device == "with_model":
        cfg.act_store_device = cfg.llm_device
    if cfg.activations_mixing_fraction != 0.5:
        raise ValueError(
            "activations_mixing_fraction: fastsae's shuffling buffer always keeps half of "
            f"its activations for mixing (0.5), got {cfg.activations_mixing_fraction!r}"
        )
    if cfg.use_chat_formatting:
        raise ValueError("use_chat_formatting=True is not supported by fastsae's store yet")
    prefetch = cfg.prefetch_llm_batches  # accepted for SAELens configs; no effect here
    if not isinstance(prefetch, (bool, int)) or (not isinstance(prefetch, bool) and prefetch < 0):
        raise ValueError(f"prefetch_llm_batches must be a bool or an int >= 0, got {prefetch!r}")
    if cfg.use_cached_activations and not cfg.cached_activations_path:
        raise ValueError("use_cached_activations=True needs cached_activations_path")
    if not cfg.use_cached_activations and not cfg.dataset_path:
        raise ValueError(
            "dataset_path is empty: give a Hugging Face dataset, a local file or folder "
            "(or use_cached_activations with cached_activations_path)"
        )
    cfg.seqpos_slice = tuple(cfg.seqpos_slice)
    if not 1 <= len(cfg.seqpos_slice) <= 3:
        raise ValueError(f"seqpos_slice must have 1 to 3 entries, got {cfg.seqpos_slice!r}")
    if cfg.sae.normalize_activations not in NORMALIZE_ACTIVATIONS:
        raise ValueError(f"sae.normalize_activations: {cfg.sae.normalize_activations!r}")
    if cfg.model_from_pretrained_kwargs is None:
        cfg.model_from_pretrained_kwargs = (
            {"center_writing_weights": False} if cfg.model_class_name == "HookedTransformer" else {}
        )
    if cfg.logger.log_to_wandb:
        try:
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
