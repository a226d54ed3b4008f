"""Transcoders published for circuit-tracer (attribution graphs), one file per layer.

``mwhanna_transcoder`` (Michael Hanna's Qwen 3 transcoders): ``layer_L.safetensors``
at the repo root (``W_enc [d_sae, d_in]``, ``W_dec [d_sae, d_out]``, ``b_enc``,
``b_dec``), the training run's W&B config (``wandb-config.yaml``, in some repos
misspelt ``wanb-config.yaml``: ``d_model``, ``d_feature``, ``batch_size``) and a
``config.yaml`` naming the model (absent from the 14B repos: the model is then read
from the repo id). ReLU; read at the MLP's input, written at its output.

``mntss_clt_layer_transcoder`` (cross-layer transcoders by mntss): per source layer L,
``W_enc_L.safetensors`` (``W_enc_L [d_sae, d_in]``, ``b_enc_L``, ``b_dec_L``) and
``W_dec_L.safetensors`` (``W_dec_L [d_sae, n_target_layers, d_out]``), plus a
``config.yaml`` with ``model_name``, ``feature_input_hook`` and
``feature_output_hook``. The folder name is the layer. A layer loads as a
single-layer transcoder whose decoder is the sum of its per-target-layer decoders
(good for feature activations, not for reconstructions; a warning says so).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import Tensor

from fastsae.loading.hub import fetch, field, read_weights, read_yaml, require_keys

MWHANNA_WANDB_CFG_FILENAMES = ("wandb-config.yaml", "wanb-config.yaml")
CIRCUIT_TRACER_CFG_FILENAME = "config.yaml"


def _wandb_value(cfg: dict[str, Any], key: str, where: str) -> Any:
    """A W&B config entry's value (``key: {value: ...}``)."""
    entry = field(cfg, key, where=where)
    if not isinstance(entry, dict) or "value" not in entry:
        raise ValueError(f"{where}: {key!r} is {entry!r}, expected a mapping with a 'value'")
    return entry["value"]


# ---------------------------------------------------------------------------- mwhanna_transcoder
def _mwhanna_model_name(repo_id: str, force_download: bool) -> str:
    """The model from the repo's ``config.yaml``, or from a ``qwen3-<size>b`` repo id."""
    local = fetch(repo_id, CIRCUIT_TRACER_CFG_FILENAME, force_download, required=False)
    if local is not None:
        where = f"{repo_id}/{CIRCUIT_TRACER_CFG_FILENAME}"
        return field(read_yaml(local, where), "model_name", where=where)
    size = re.search(r"qwen3-(\d+(?:\.\d+)?)b", repo_id)
    if size is None:
        raise ValueError(
            f"{repo_id}: no {CIRCUIT_TRACER_CFG_FILENAME} naming the model, and the repo id "
            "names no Qwen3 size (qwen3-<N>b)"
        )
    return f"Qwen/Qwen3-{size.group(1)}B"


def mwhanna_transcoder_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """One layer of an mwhanna transcoder set; ``folder_name`` is its file,
    ``layer_L.safetensors``."""
    weights_file = folder_name.strip("/")
    layer_text = weights_file.removesuffix(".safetensors").split("_")[-1]
    if not layer_text.isdigit():
        raise ValueError(
            f"{repo_id}/{weights_file}: expected a layer file named layer_<N>.safetensors"
        )
    layer = int(layer_text)

    wandb_path, wandb_name = None, None
    for name in MWHANNA_WANDB_CFG_FILENAMES:
        wandb_path = fetch(repo_id, name, force_download, required=False)
        if wandb_path is not None:
            wandb_name = name
            break
    if wandb_path is None:
        raise FileNotFoundError(
            f"{repo_id}: missing the training config (looked for "
            f"{list(MWHANNA_WANDB_CFG_FILENAMES)})"
        )
    where_cfg = f"{repo_id}/{wandb_name}"
    wandb_cfg = read_yaml(wandb_path, where_cfg)
    d_model = _wandb_value(wandb_cfg, "d_model", where_cfg)

    cfg = {
        "architecture": "transcoder",
        "d_in": d_model,
        "d_out": d_model,
        "d_sae": _wandb_value(wandb_cfg, "d_feature", where_cfg),
        "dtype": "float32",
        "device": device,
        "activation_fn": "relu",
        "normalize_activations": "none",
        "model_name": _mwhanna_model_name(repo_id, force_download),
        "hook_name": f"blocks.{layer}.mlp.hook_in",
        "hook_name_out": f"blocks.{layer}.hook_mlp_out",
        "dataset_path": "monology/pile-uncopyrighted",
        # SAELens records the run's batch size here
        "context_size": _wandb_value(wandb_cfg, "batch_size", where_cfg),
        "apply_b_dec_to_input": False,
        "model_from_pretrained_kwargs": {"fold_ln": False},
        **(cfg_overrides or {}),
    }

    path = fetch(repo_id, weights_file, force_download)
    assert path is not None
    state = read_weights(path, device, cfg.get("dtype"))
    where = f"{repo_id}/{weights_file}"
    require_keys(state, ["W_enc", "W_dec", "b_enc", "b_dec"], where)
    if state["W_enc"].ndim != 2:
        raise ValueError(
            f"{where}: W_enc has shape {list(state['W_enc'].shape)}, expected [d_sae, d_in]"
        )
    state["W_enc"] = state["W_enc"].T.contiguous()  # stored [d_sae, d_in]
    if "W_skip" in state:
        # a skip connection (circuit-tracer's optional W_skip [d_out, d_in]) is part of
        # the transcoder's output: keep it rather than drop it
        cfg["architecture"] = "skip_transcoder"
    return cfg, state, None


# ---------------------------------------------------------------------------- mntss CLT layer
def mntss_clt_layer_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """Layer ``folder_name`` (an int, as a string) of an mntss cross-layer transcoder,
    as a single-layer transcoder with the layer's decoders summed."""
    layer = folder_name.strip("/")
    if not layer.isdigit():
        raise ValueError(
            f"{repo_id}: folder {folder_name!r} is not a layer number (an mntss CLT layer "
            "is named by its index, e.g. '3')"
        )
    warnings.warn(
        f"{repo_id} layer {layer}: a cross-layer transcoder layer is loaded as a single-layer "
        "transcoder whose decoder is the sum of all its per-target-layer decoders: use it "
        "for feature activations, not for reconstructions",
        UserWarning,
        stacklevel=2,
    )
    cfg_path = fetch(repo_id, CIRCUIT_TRACER_CFG_FILENAME, force_download)
    assert cfg_path is not None
    where_cfg = f"{repo_id}/{CIRCUIT_TRACER_CFG_FILENAME}"
    info = read_yaml(cfg_path, where_cfg)
    model_name = field(info, "model_name", where=where_cfg)
    hook_in = field(info, "feature_input_hook", where=where_cfg)
    hook_out = field(info, "feature_output_hook", where=where_cfg)

    enc_file, dec_file = f"W_enc_{layer}.safetensors", f"W_dec_{layer}.safetensors"
    enc_path = fetch(repo_id, enc_file, force_download)
    dec_path = fetch(repo_id, dec_file, force_download)
    assert enc_path is not None and dec_path is not None
    dtype = (cfg_overrides or {}).get("dtype", "float32")
    enc = read_weights(enc_path, device, dtype)
    dec = read_weights(dec_path, device, dtype)
    w_enc, b_enc, b_dec, w_dec = (
        f"W_enc_{layer}",
        f"b_enc_{layer}",
        f"b_dec_{layer}",
        f"W_dec_{layer}",
    )
    require_keys(enc, [w_enc, b_enc, b_dec], f"{repo_id}/{enc_file}")
    require_keys(dec, [w_dec], f"{repo_id}/{dec_file}")
    if enc[w_enc].ndim != 2:
        raise ValueError(
            f"{repo_id}/{enc_file}: {w_enc} has shape {list(enc[w_enc].shape)}, expected "
            "[d_sae, d_in]"
        )
    if dec[w_dec].ndim != 3:
        raise ValueError(
            f"{repo_id}/{dec_file}: {w_dec} has shape {list(dec[w_dec].shape)}, expected "
            "[d_sae, n_target_layers, d_out]"
        )
    with torch.no_grad():
        state = {
            "W_enc": enc[w_enc].T.contiguous(),  # stored [d_sae, d_in]
            "b_enc": enc[b_enc],
            "b_dec": enc[b_dec],
            "W_dec": dec[w_dec].sum(dim=1),
        }

    cfg = {
        "architecture": "transcoder",
        "d_in": state["W_enc"].shape[0],
        "d_out": state["b_dec"].shape[0],
        "d_sae": state["b_enc"].shape[0],
        "dtype": "float32",
        "device": device,
        "activation_fn": "relu",
        "normalize_activations": "none",
        "model_name": model_name,
        "hook_name": f"blocks.{layer}.{hook_in}",
        "hook_name_out": f"blocks.{layer}.{hook_out}",
        "apply_b_dec_to_input": False,
        "model_from_pretrained_kwargs": {"fold_ln": False},
        **(cfg_overrides or {}),
    }
    return cfg, state, None
