"""Goodfire's SAEs of Llama-3.x-Instruct models (format ``goodfire``).

Each repo holds one ``torch.save`` file of an ``nn.Linear`` encoder and decoder
(``encoder_linear.weight [d_sae, d_in]`` / ``.bias``, ``decoder_linear.weight
[d_in, d_sae]`` / ``.bias``), transposed here; ReLU, ``b_dec`` not subtracted from the
input. No config ships with them: the two published SAEs are described in
:data:`GOODFIRE_SAES`, and any other repo or file is refused (its sizes are unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fastsae.loading.hub import fetch_torch_weights


@dataclass(frozen=True)
class GoodfireSAE:
    """One published Goodfire SAE: its weight file and what it was trained on."""

    filename: str
    d_in: int
    d_sae: int
    model_name: str
    layer: int


GOODFIRE_SAES: dict[str, GoodfireSAE] = {
    "Goodfire/Llama-3.3-70B-Instruct-SAE-l50": GoodfireSAE(
        "Llama-3.3-70B-Instruct-SAE-l50.pt", 8192, 65536, "meta-llama/Llama-3.3-70B-Instruct", 50
    ),
    "Goodfire/Llama-3.1-8B-Instruct-SAE-l19": GoodfireSAE(
        "Llama-3.1-8B-Instruct-SAE-l19.pth", 4096, 65536, "meta-llama/Llama-3.1-8B-Instruct", 19
    ),
}


def goodfire_config(
    repo_id: str,
    folder_name: str,
    device: str | None,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The SAELens config of a published Goodfire SAE (``folder_name`` is its file)."""
    sae = GOODFIRE_SAES.get(repo_id)
    if sae is None or folder_name != sae.filename:
        known = [f"{repo}/{s.filename}" for repo, s in GOODFIRE_SAES.items()]
        raise ValueError(
            f"unsupported Goodfire SAE {repo_id}/{folder_name}: its sizes and hook are not "
            f"known; the known ones are {known}"
        )
    cfg: dict[str, Any] = {
        "architecture": "standard",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "model_name": sae.model_name,
        "hook_name": f"blocks.{sae.layer}.hook_resid_post",
        "hook_head_index": None,
        "dataset_path": "lmsys/lmsys-chat-1m",
        "apply_b_dec_to_input": False,
    }
    if device is not None:
        cfg["device"] = device
    cfg.update(cfg_overrides or {})
    return cfg


def goodfire_sae_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A Goodfire SAE file (``folder_name`` is the ``.pt`` / ``.pth`` file)."""
    cfg = goodfire_config(repo_id, folder_name, device, cfg_overrides)
    weights = fetch_torch_weights(
        repo_id,
        folder_name,
        [
            "encoder_linear.weight",
            "decoder_linear.weight",
            "encoder_linear.bias",
            "decoder_linear.bias",
        ],
        device=device,
        dtype=cfg.get("dtype", "float32"),
        force_download=force_download,
    )
    state_dict = {
        "W_enc": weights["encoder_linear.weight"].T,
        "W_dec": weights["decoder_linear.weight"].T,
        "b_enc": weights["encoder_linear.bias"],
        "b_dec": weights["decoder_linear.bias"],
    }
    return cfg, state_dict, None
