"""The older flat form of the runner config (SAELens < 6 and its tutorials):
``architecture``, ``expansion_factor``, ``activation_fn(_kwargs)``, ``l1_coefficient``,
``use_ghost_grads``, ... translated into the nested 6.x training SAE config, and the
SAELens < 6 keys that 6.x dropped (accepted with a warning, see
:mod:`fastsae.training.config`)."""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any

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
    kwargs = dict(flat.pop("activation_fn_kwargs", None) or {})
    arch = flat.pop("architecture", None)
    if arch is None:
        arch = "topk" if activation_fn == "topk" else "standard"
    if activation_fn not in (None, "relu", "topk"):
        raise ValueError(f"activation_fn must be 'relu' or 'topk', got {activation_fn!r}")
    if activation_fn == "topk" and arch not in ("topk", "batchtopk", "matryoshka_batchtopk"):
        raise ValueError(f"activation_fn='topk' does not go with architecture={arch!r}")
    cfg_cls = training_config_class_for_architecture(arch)
    if "d_in" not in flat:
        raise ValueError("the flat config form needs d_in (or pass sae=...Config(d_in=...))")
    expansion = flat.pop("expansion_factor", None)
    if "d_sae" not in flat or flat["d_sae"] is None:
        factor = 4 if expansion is None else expansion
        if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
            raise ValueError(f"expansion_factor must be a positive int, got {factor!r}")
        flat["d_sae"] = flat["d_in"] * factor
    elif expansion is not None and flat["d_sae"] != flat["d_in"] * expansion:
        raise ValueError(
            f"d_sae={flat['d_sae']} and expansion_factor={expansion} disagree for d_in={flat['d_in']}"
        )
    if isinstance(flat.get("normalize_activations"), bool):
        flat["normalize_activations"] = (
            "expected_average_only_in" if flat["normalize_activations"] else "none"
        )
    if flat.get("use_ghost_grads") and arch != "standard":
        raise ValueError(f"use_ghost_grads is only for architecture='standard', not {arch!r}")
    if flat.get("use_ghost_grads") is False and arch != "standard":
        flat.pop("use_ghost_grads")
    kwargs.update(flat)
    valid = {f.name for f in fields(cfg_cls)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(
            f"LanguageModelSAERunnerConfig: unknown fields {unknown} for architecture {arch!r}"
            + suggest(
                dict.fromkeys(unknown), {**dict.fromkeys(runner_fields), **dict.fromkeys(valid)}
            )
        )
    kwargs.setdefault("dtype", dtype)
    kwargs.setdefault("device", device)
    return cfg_cls(**kwargs)


def suggest(unknown: dict[str, Any], known: dict[str, Any]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(known), n=1)
        if close:
            hints.append(f"{key!r} -> did you mean {close[0]!r}?")
    return ("; " + "; ".join(hints)) if hints else ""
