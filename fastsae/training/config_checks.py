"""Field checks of the runner config (:mod:`fastsae.training.config`).

``check_runner_config`` validates every field of a
:class:`~fastsae.training.config.LanguageModelSAERunnerConfig` (and fills the defaults
that depend on other fields: ``lr_end``, ``llm_device``, ``act_store_device``,
``model_from_pretrained_kwargs``, ``logger.run_name``); ``resolve_sae_config`` turns the
``sae=`` argument (a training SAE config, a dict, or ``None`` with flat SAE fields) into
the training SAE config the runner holds. Errors name the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from fastsae.saes.config import NORMALIZE_ACTIVATIONS, str_to_dtype
from fastsae.training.config_fields import check_field_types, reject_unknown_keys
from fastsae.training.config_flat import build_training_sae_config, sae_config_from_flat
from fastsae.training.saes.base import TrainingSAEConfig, training_config_class_for_architecture


def check_positive_int(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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


def check_buffer_holds_a_batch(
    n_batches_in_buffer: int,
    store_batch_size_prompts: int,
    n_pos: int,
    train_batch_size_tokens: int,
) -> int:
    """The shuffling buffer's size in tokens; an error when it cannot hold one batch."""
    buffer_tokens = n_batches_in_buffer * store_batch_size_prompts * n_pos
    if buffer_tokens < train_batch_size_tokens:
        raise ValueError(
            f"the buffer (n_batches_in_buffer * store_batch_size_prompts * positions = "
            f"{n_batches_in_buffer} * {store_batch_size_prompts} * {n_pos} = {buffer_tokens}"
            f") must hold at least train_batch_size_tokens={train_batch_size_tokens}"
        )
    return buffer_tokens


def _check_types(cfg: Any) -> None:
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


def _check_the_run_trains(cfg: Any) -> None:
    """Refuse the settings under which a run would train nothing, or silently not do
    what it was asked (before the model loads)."""
    if cfg.training_tokens < cfg.train_batch_size_tokens:
        raise ValueError(
            f"training_tokens={cfg.training_tokens} is less than one batch "
            f"(train_batch_size_tokens={cfg.train_batch_size_tokens}): the run would train "
            "no step; raise training_tokens or lower train_batch_size_tokens"
        )
    n_pos = check_seqpos_slice(cfg.seqpos_slice, cfg.context_size)
    if not cfg.use_cached_activations:
        check_buffer_holds_a_batch(
            cfg.n_batches_in_buffer,
            cfg.store_batch_size_prompts,
            n_pos,
            cfg.train_batch_size_tokens,
        )
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


def check_runner_config(cfg: Any) -> None:
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
    if not cfg.use_cached_activations and not cfg.dataset_path:
        raise ValueError(
            "dataset_path is empty: give a Hugging Face dataset, a local file or folder "
            "(or use_cached_activations with cached_activations_path)"
        )
    cfg.seqpos_slice = tuple(cfg.seqpos_slice)
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
