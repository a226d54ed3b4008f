"""qresearch's SAE of DeepSeek-R1-Distill-Llama-8B (format ``deepseek_r1``).

The repo (``qresearch/DeepSeek-R1-Distill-Llama-8B-SAE-l19``) holds one ``torch.save``
file, ``DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt``, with ``encoder.weight
[d_sae, d_in]``, ``encoder.bias``, ``decoder.weight [d_in, d_sae]`` and
``decoder.bias`` (``nn.Linear`` layout, transposed here). No config ships with it: the
sizes are the model's (:data:`D_IN`, 16x expansion), the layer is the ``l{n}`` in the
file name (hook ``blocks.{n}.hook_resid_post``); ``b_dec`` is not subtracted from the
input.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from fastsae.loading.hub import fetch_torch_weights

MODEL_NAME = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
D_IN = 4096  # Llama-3.1-8B's hidden size
D_SAE = 4096 * 16
_LAYER_PATTERN = re.compile(r"l(\d+)")


def deepseek_r1_config(
    repo_id: str,
    folder_name: str,
    device: str | None,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The SAELens config of the SAE in file ``folder_name`` (layer from its name)."""
    match = _LAYER_PATTERN.search(folder_name)
    if match is None:
        raise ValueError(
            f"{repo_id}/{folder_name}: no layer number in the file name (expected "
            "'l{n}', as in 'DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt')"
        )
    layer = int(match.group(1))
    return {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "bfloat16",
        "context_size": 1024,
        "model_name": MODEL_NAME,
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": "lmsys/lmsys-chat-1m",
        "dataset_trust_remote_code": True,
        "sae_lens_training_version": None,
        "activation_fn": "relu",
        "normalize_activations": "none",
        "device": device if device is not None else "cpu",
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": False,
        **(cfg_overrides or {}),
    }


def deepseek_r1_sae_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """The qresearch DeepSeek R1 distill SAE (``folder_name`` is the ``.pt`` file)."""
    cfg = deepseek_r1_config(repo_id, folder_name, device, cfg_overrides)
    weights = fetch_torch_weights(
        repo_id,
        folder_name,
        ["encoder.weight", "decoder.weight", "encoder.bias", "decoder.bias"],
        device=device,
        force_download=force_download,
    )
    state_dict = {
        "W_enc": weights["encoder.weight"].T,
        "W_dec": weights["decoder.weight"].T,
        "b_enc": weights["encoder.bias"],
        "b_dec": weights["decoder.bias"],
    }
    return cfg, state_dict, None
