"""Temporal SAEs (https://arxiv.org/abs/2511.01836) from ``canrager/temporalSAEs``
(format ``temporal``), read into :class:`fastsae.saes.temporal.TemporalSAE`.

A folder such as ``gemma-2-2B/layer_12/temporal`` holds ``conf.yaml`` (``llm.dimin``;
``sae.exp_factor``, ``n_heads``, ``n_attn_layers``, ``bottleneck_factor``,
``sae_diff_type``, ``kval_topk``, ``tied_weights``, ``scaling_factor``;
``data.dtype``) and ``latest_ckpt.safetensors``: ``D [d_sae, d_in]`` (decoder),
``b [d_in]``, ``E [d_in, d_sae]`` when the weights are untied, and the attention layers
``attn_layers.*`` under SAELens's names already. The layer is the ``layer_{n}`` of the
folder (hook ``blocks.{n}.hook_resid_post``); inputs are multiplied by
``sae.scaling_factor`` (``normalize_activations="constant_scalar_rescale"``).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from fastsae.loading.hub import (
    fetch_safetensors,
    fetch_yaml,
    field,
    in_folder,
    number,
)

CONFIG_FILENAME = "conf.yaml"
CHECKPOINT_FILENAME = "latest_ckpt.safetensors"
_LAYER_PATTERN = re.compile(r"layer_(\d+)")


def temporal_config(
    conf: dict[str, Any],
    folder_name: str,
    device: str | None,
    cfg_overrides: dict[str, Any] | None = None,
    where: str = CONFIG_FILENAME,
) -> dict[str, Any]:
    """The SAELens config of a temporal SAE from its ``conf.yaml`` and folder name."""
    layer = _LAYER_PATTERN.search(folder_name)
    if layer is None:
        raise ValueError(
            f"{where}: no layer in the folder name {folder_name!r} (expected 'layer_{{n}}', "
            "as in 'gemma-2-2B/layer_12/temporal')"
        )
    d_in = number(conf, "llm", "dimin", where=where, integer=True)
    exp_factor = number(conf, "sae", "exp_factor", where=where)

    def sae(key: str) -> Any:
        return field(conf, "sae", key, where=where)

    cfg = {
        "architecture": "temporal",
        "hook_name": f"blocks.{int(layer.group(1))}.hook_resid_post",
        "d_in": d_in,
        "d_sae": int(d_in * exp_factor),
        "n_heads": sae("n_heads"),
        "n_attn_layers": sae("n_attn_layers"),
        "bottleneck_factor": sae("bottleneck_factor"),
        "sae_diff_type": sae("sae_diff_type"),
        "kval_topk": sae("kval_topk"),
        "tied_weights": sae("tied_weights"),
        "dtype": field(conf, "data", "dtype", where=where),
        "device": device if device is not None else "cpu",
        "normalize_activations": "constant_scalar_rescale",
        "activation_normalization_factor": sae("scaling_factor"),
        "apply_b_dec_to_input": True,
    }
    cfg.update(cfg_overrides or {})
    return cfg


def temporal_sae_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A temporal SAE folder: ``conf.yaml`` + ``latest_ckpt.safetensors``."""
    config_file = in_folder(folder_name, CONFIG_FILENAME)
    conf = fetch_yaml(repo_id, config_file, force_download)
    cfg = temporal_config(
        conf, folder_name, device, cfg_overrides, where=f"{repo_id}/{config_file}"
    )
    raw = fetch_safetensors(
        repo_id,
        in_folder(folder_name, CHECKPOINT_FILENAME),
        ["D", "b"],
        device=device,
        dtype=cfg.get("dtype"),
        force_download=force_download,
    )
    state_dict = {k: v for k, v in raw.items() if k.startswith("attn_layers.")}
    state_dict["W_dec"] = raw["D"]
    state_dict["b_dec"] = raw["b"]
    if "E" in raw:  # untied weights only
        state_dict["W_enc"] = raw["E"]
    return cfg, state_dict, None
