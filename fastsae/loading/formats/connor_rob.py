"""Connor Kissane and Rob Krzyzanowski's attention-output SAEs of GPT-2 small (format
``connor_rob_hook_z``, repo ``ckkissane/attn-saes-gpt2-small-all-layers``).

Each SAE is a ``torch.save`` state dict ``<name>.pt`` already in SAELens's names and
orientation (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``)
beside ``<name>_cfg.json`` (``act_size``, ``dict_size``, ``act_name``). The SAEs read
``hook_z`` with the heads concatenated (``d_in = n_heads * d_head``), so inputs are
reshaped (``reshape_activations="hook_z"``); ReLU, ``b_dec`` subtracted from the input.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fastsae.loading.hub import fetch_json, fetch_torch_weights, field, number


def connor_rob_cfg_filename(folder_name: str) -> str:
    """``"<name>.pt"`` -> ``"<name>_cfg.json"`` (the config beside the weights)."""
    return folder_name.split(".pt")[0] + "_cfg.json"


def connor_rob_hook_z_config(
    old_cfg: dict[str, Any],
    device: str | None,
    cfg_overrides: dict[str, Any] | None = None,
    where: str = "cfg.json",
) -> dict[str, Any]:
    """The SAELens config of one of these SAEs from its ``_cfg.json``."""
    return {
        "architecture": "standard",
        "d_in": number(old_cfg, "act_size", where=where, integer=True),
        "d_sae": number(old_cfg, "dict_size", where=where, integer=True),
        "dtype": "float32",
        "device": device if device is not None else "cpu",
        "model_name": "gpt2-small",
        "hook_name": field(old_cfg, "act_name", where=where),
        "hook_head_index": None,
        "activation_fn": "relu",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext",
        "context_size": 128,
        "normalize_activations": "none",
        "dataset_trust_remote_code": True,
        "reshape_activations": "hook_z",
        **(cfg_overrides or {}),
    }


def connor_rob_hook_z_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """One hook_z SAE (``folder_name`` is its ``.pt`` file)."""
    cfg_file = connor_rob_cfg_filename(folder_name)
    old_cfg = fetch_json(repo_id, cfg_file, force_download)
    cfg = connor_rob_hook_z_config(old_cfg, device, cfg_overrides, where=f"{repo_id}/{cfg_file}")
    state_dict = fetch_torch_weights(
        repo_id,
        folder_name,
        ["W_enc", "W_dec", "b_enc", "b_dec"],
        device=device,
        force_download=force_download,
    )
    return cfg, state_dict, None
