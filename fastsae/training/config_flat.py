"""The older flat form of the runner config (SAELens < 6 and its tutorials):
``architecture``, ``expansion_factor``, ``activation_fn(_kwargs)``, ``l1_coefficient``,
``use_ghost_grads``, ... translated into the nested 6.x training SAE config, and the
SAELens < 6 keys that 6.x dropped (accepted with a warning, see
:mod:`fastsae.training.config`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, fields
from typing import Any

from fastsae.training.config_fields import check_field_types, reject_unknown_keys
from fastsae.training.saes.base import TrainingSAEConfig, training_config_class_for_architecture

# Flat-form keys of SAELens < 6 that 6.x dropped. Accepted with a warning when set to
# the behaviour fastsae has anyway; anything else is an error.
LEGACY_IGNORED = {
    "hook_layer": None,
    "hook_eval": None,
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
    "sae_lens_version": None,
    "sae_lens_training_version": None,
    "model_class_name_eval": None,
    "resume": None,
}
# flat keys that only describe the SAE
SAE_FLAT_KEYS = {"architecture", "expansion_factor", "activation_fn", "activation_fn_kwargs"}


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
