"""Qwen Scope (https://huggingface.co/collections/Qwen/qwen-scope): TopK SAEs on the
residual stream of Qwen3 / Qwen3.5 models.

A repo ``Qwen/SAE-Res-{model}-W{N}K-L0_{k}`` holds one ``layer{n}.sae.pt`` per layer:
a ``torch.save`` dict with ``W_enc [d_sae, d_in]``, ``W_dec [d_in, d_sae]``, ``b_enc``
and ``b_dec``. Nothing in the repo states the sizes: the width (``N * 1024`` latents)
and ``k`` come from the repo id, ``d_in`` from the model (:data:`QWEN_SCOPE_MODELS`),
the layer from the file name (hook ``blocks.{n}.hook_resid_post``, Hugging Face module
``model.layers.{n}``). Both matrices are stored the other way round from SAELens and are
transposed here; ``b_dec`` is not subtracted from the input.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from fastsae.loading.hub import fetch_torch_weights

# the model part of a Qwen Scope repo id -> (Hugging Face model id, hidden size)
QWEN_SCOPE_MODELS: dict[str, tuple[str, int]] = {
    "Qwen3-1.7B-Base": ("Qwen/Qwen3-1.7B-Base", 2048),
    "Qwen3-8B-Base": ("Qwen/Qwen3-8B-Base", 4096),
    "Qwen3-30B-A3B-Base": ("Qwen/Qwen3-30B-A3B-Base", 2048),
    "Qwen3.5-2B-Base": ("Qwen/Qwen3.5-2B-Base", 2048),
    "Qwen3.5-9B-Base": ("Qwen/Qwen3.5-9B-Base", 4096),
    "Qwen3.5-27B": ("Qwen/Qwen3.5-27B", 5120),
    "Qwen3.5-35B-A3B-Base": ("Qwen/Qwen3.5-35B-A3B-Base", 2048),
}
_REPO_PATTERN = re.compile(r"SAE-Res-(.+)-W(\d+)K-L0_(\d+)")
_FILE_PATTERN = re.compile(r"layer(\d+)\.sae\.pt")


def parse_qwen_scope_repo_id(repo_id: str) -> tuple[str, int, int]:
    """``"Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"`` -> ``("Qwen3-1.7B-Base", 32768, 50)``:
    the model key, ``d_sae`` and ``k``."""
    match = _REPO_PATTERN.search(repo_id)
    if match is None:
        raise ValueError(
            f"{repo_id}: not a Qwen Scope repo id (expected "
            "'Qwen/SAE-Res-{model}-W{width}K-L0_{k}', e.g. 'Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50')"
        )
    return match.group(1), int(match.group(2)) * 1024, int(match.group(3))


def qwen_scope_config(
    repo_id: str,
    folder_name: str,
    device: str | None,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The SAELens config of a Qwen Scope SAE, from its repo id and file name alone."""
    layer_match = _FILE_PATTERN.search(folder_name)
    if layer_match is None:
        raise ValueError(
            f"{repo_id}/{folder_name}: not a Qwen Scope layer file (expected 'layer{{n}}.sae.pt')"
        )
    layer = int(layer_match.group(1))
    model_key, d_sae, k = parse_qwen_scope_repo_id(repo_id)
    if model_key not in QWEN_SCOPE_MODELS:
        raise ValueError(
            f"{repo_id}: unknown Qwen Scope base model {model_key!r} (its hidden size is not "
            f"known); known models: {sorted(QWEN_SCOPE_MODELS)}"
        )
    model_name, d_in = QWEN_SCOPE_MODELS[model_key]
    return {
        "architecture": "topk",
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": k},
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "context_size": 1024,
        "model_name": model_name,
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hf_hook_name": f"model.layers.{layer}",
        "hook_head_index": None,
        "prepend_bos": True,
        # trained on Qwen's own pretraining data, which is not public
        "dataset_path": None,
        "sae_lens_training_version": None,
        "normalize_activations": "none",
        "device": device if device is not None else "cpu",
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": False,
        **(cfg_overrides or {}),
    }


def qwen_scope_sae_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A Qwen Scope ``layer{n}.sae.pt`` file (``folder_name`` is the file)."""
    cfg = qwen_scope_config(repo_id, folder_name, device, cfg_overrides)
    weights = fetch_torch_weights(
        repo_id,
        folder_name,
        ["W_enc", "W_dec", "b_enc", "b_dec"],
        device=device,
        force_download=force_download,
    )
    state_dict = {
        "W_enc": weights["W_enc"].T.contiguous(),
        "W_dec": weights["W_dec"].T.contiguous(),
        "b_enc": weights["b_enc"],
        "b_dec": weights["b_dec"],
    }
    return cfg, state_dict, None
