"""Llama Scope (OpenMOSS / fnlp): JumpReLU SAEs of Llama-3.1-8B and of its R1 distill.

``llama_scope`` (repos ``fnlp/Llama3_1-8B-Base-LX{A,M,R}-{8,32}x``, one folder per
layer such as ``Llama3_1-8B-Base-L5R-8x``): ``hyperparams.json`` and
``checkpoints/final.safetensors``. The SAEs were trained on inputs scaled to norm
``sqrt(d_model)`` on average (``dataset_average_activation_norm.in``); the registry's
``norm_scaling_factor`` folds that scaling into the weights after loading, and the one
scalar ``jump_relu_threshold`` of the file is multiplied by the same dataset factor and
given to every latent, as SAELens does.

``llama_scope_r1_distill`` (``fnlp/Llama-Scope-R1-Distill``, folders such as
``800M-Slimpajama-0-OpenR1-Math-220k/L5R``): ``config.json`` (``d_model``,
``expansion_factor``, ``hook_point_in``) and ``sae_weights.safetensors`` with a
per-latent ``log_jumprelu_threshold``.

Both store ``encoder.weight [d_sae, d_in]`` / ``decoder.weight [d_in, d_sae]``
(``nn.Linear`` layout), transposed here to SAELens's ``W_enc [d_in, d_sae]`` /
``W_dec [d_sae, d_in]``; ``b_dec`` is not subtracted from the input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastsae.loading.disk import SAE_WEIGHTS_FILENAME
from fastsae.loading.hub import (
    fetch_json,
    fetch_safetensors,
    field,
    in_folder,
    number,
)
from fastsae.saes.config import str_to_dtype

LLAMA_SCOPE_MODEL = "meta-llama/Llama-3.1-8B"
HYPERPARAMS_FILENAME = "hyperparams.json"
CHECKPOINT_FILENAME = "checkpoints/final.safetensors"
R1_DISTILL_CONFIG_FILENAME = "config.json"
LINEAR_KEYS = ["encoder.weight", "decoder.weight", "encoder.bias", "decoder.bias"]


def _shared_fields(device: str | None) -> dict[str, Any]:
    """What every Llama Scope SAE has (SAELens's values for these releases)."""
    cfg: dict[str, Any] = {
        "architecture": "jumprelu",
        "model_name": LLAMA_SCOPE_MODEL,
        "hook_head_index": None,
        "activation_fn": "relu",
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "cerebras/SlimPajama-627B",
        "context_size": 1024,
        "dataset_trust_remote_code": True,
        "apply_b_dec_to_input": False,
        "normalize_activations": "expected_average_only_in",
    }
    if device is not None:
        cfg["device"] = device
    return cfg


def llama_scope_config(
    hyperparams: dict[str, Any],
    device: str | None,
    cfg_overrides: dict[str, Any] | None = None,
    where: str = HYPERPARAMS_FILENAME,
) -> dict[str, Any]:
    """The SAELens config of a Llama Scope SAE from its ``hyperparams.json``.

    ``jump_relu_threshold`` is the file's threshold times the dataset norm factor
    ``sqrt(d_model) / dataset_average_activation_norm["in"]``, the units the weights
    are in once the registry's norm scaling factor is folded into them.
    """
    d_in = number(hyperparams, "d_model", where=where, integer=True)
    average_norm = number(hyperparams, "dataset_average_activation_norm", "in", where=where)
    if average_norm <= 0:
        raise ValueError(
            f"{where}: 'dataset_average_activation_norm.in' must be positive, got {average_norm!r}"
        )
    dataset_factor = d_in**0.5 / average_norm
    cfg = _shared_fields(device)
    cfg.update(
        jump_relu_threshold=number(hyperparams, "jump_relu_threshold", where=where)
        * dataset_factor,
        d_in=d_in,
        d_sae=number(hyperparams, "d_sae", where=where, integer=True),
        dtype="bfloat16",
        hook_name=field(hyperparams, "hook_point_in", where=where),
    )
    cfg.update(cfg_overrides or {})
    return cfg


def _linear_to_sae(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        "W_enc": weights["encoder.weight"].T,
        "W_dec": weights["decoder.weight"].T,
        "b_enc": weights["encoder.bias"],
        "b_dec": weights["decoder.bias"],
    }


def llama_scope_sae_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A Llama Scope folder: ``hyperparams.json`` + ``checkpoints/final.safetensors``."""
    config_file = in_folder(folder_name, HYPERPARAMS_FILENAME)
    hyperparams = fetch_json(repo_id, config_file, force_download)
    cfg = llama_scope_config(hyperparams, device, cfg_overrides, where=f"{repo_id}/{config_file}")
    weights = fetch_safetensors(
        repo_id,
        in_folder(folder_name, CHECKPOINT_FILENAME),
        LINEAR_KEYS,
        device=device,
        dtype=cfg.get("dtype"),
        force_download=force_download,
    )
    state_dict = _linear_to_sae(weights)
    # one scalar threshold for every latent (Gemma Scope's are per latent)
    state_dict["threshold"] = torch.full(
        (cfg["d_sae"],),
        cfg["jump_relu_threshold"],
        dtype=str_to_dtype(cfg["dtype"]),
        device=cfg.get("device", "cpu"),
    )
    return cfg, state_dict, None


def llama_scope_r1_distill_config(
    config: dict[str, Any],
    device: str | None,
    cfg_overrides: dict[str, Any] | None = None,
    where: str = R1_DISTILL_CONFIG_FILENAME,
) -> dict[str, Any]:
    """The SAELens config of a Llama Scope R1 distill SAE from its ``config.json``
    (``d_sae = d_model * expansion_factor``)."""
    d_in = number(config, "d_model", where=where, integer=True)
    expansion = number(config, "expansion_factor", where=where)
    d_sae = d_in * expansion
    if d_sae != int(d_sae):
        raise ValueError(
            f"{where}: d_model * expansion_factor = {d_in} * {expansion} is not a whole "
            "number of latents"
        )
    cfg = _shared_fields(device)
    cfg.update(
        d_in=d_in,
        d_sae=int(d_sae),
        dtype="float32",
        hook_name=field(config, "hook_point_in", where=where),
    )
    cfg.update(cfg_overrides or {})
    return cfg


def llama_scope_r1_distill_sae_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A Llama Scope R1 distill folder: ``config.json`` + ``sae_weights.safetensors``
    (per-latent thresholds stored as ``log_jumprelu_threshold``)."""
    config_file = in_folder(folder_name, R1_DISTILL_CONFIG_FILENAME)
    config = fetch_json(repo_id, config_file, force_download)
    cfg = llama_scope_r1_distill_config(
        config, device, cfg_overrides, where=f"{repo_id}/{config_file}"
    )
    weights = fetch_safetensors(
        repo_id,
        in_folder(folder_name, SAE_WEIGHTS_FILENAME),
        [*LINEAR_KEYS, "log_jumprelu_threshold"],
        device=device,
        dtype=cfg.get("dtype"),
        force_download=force_download,
    )
    state_dict = _linear_to_sae(weights)
    state_dict["threshold"] = weights["log_jumprelu_threshold"].exp()
    return cfg, state_dict, None
