"""Google DeepMind's Gemma Scope layouts that are not plain ``params.npz`` SAE folders.

``gemma_3`` (Gemma Scope 2, for Gemma 3): one folder per SAE,
``<site>[_all]/layer_L_width_W_l0_S[_affine]/`` with ``params.safetensors``
(``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``,
``threshold``, and ``affine_skip_connection [d_in, d_out]`` for skip transcoders)
and, in most folders, a ``config.json`` (``architecture: jump_relu``, ``model_name``,
``hf_hook_point_in`` / ``hf_hook_point_out``, ``affine_connection``). Where the
``config.json`` is absent, model, hooks and skip connection are read from the repo
id and folder name. The site is the folder name's ``resid_post`` / ``attn_out`` /
``mlp_out`` / ``transcoder`` / ``clt``. A cross-layer transcoder (``clt/...``) stores
one file per source layer, ``clt/<variant>/params_layer_L.safetensors`` (folder name
``clt/<variant>/params_layer_L``), whose ``w_dec [d_sae, n_target_layers, d_out]``
is summed over the target layers into one single-layer decoder.

``gemma_2_transcoder`` (Gemma Scope transcoders, for Gemma 2):
``layer_L/width_W/average_l0_N/params.npz``, JumpReLU, reading the MLP's normalised
input and writing its output; the model is named by the repo id.

Sizes come from the weights; hooks follow TransformerLens names as SAELens gives them.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastsae.loading.disk import read_json
from fastsae.loading.hub import fetch, in_folder, read_weights, require_keys

GEMMA_3_WEIGHTS_FILENAME = "params.safetensors"
GEMMA_3_CFG_FILENAME = "config.json"
GEMMA_2_TRANSCODER_FILENAME = "params.npz"

# what every Gemma Scope 2 SAE was trained and evaluated on (SAELens's values)
_GEMMA_3_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "hook_head_index": None,
    "finetuning_scaling_factor": False,
    "sae_lens_training_version": None,
    "prepend_bos": True,
    "dataset_path": "monology/pile-uncopyrighted",
    "context_size": 1024,
    "apply_b_dec_to_input": False,
    "normalize_activations": "none",
    "reshape_activations": "none",
}


def _layer_in(text: str) -> int | None:
    match = re.search(r"layer_(\d+)", text)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------- gemma_3
def gemma_3_site(folder_name: str) -> str:
    """``resid_post``, ``attn_out``, ``mlp_out``, ``transcoder`` or ``clt``: what a Gemma
    Scope 2 folder holds, from its name."""
    found = [s for s in ("resid_post", "attn_out", "mlp_out") if s in folder_name]
    if "clt" in folder_name:
        found.append("clt")
    elif "transcoder" in folder_name:
        found.append("transcoder")
    if len(found) != 1:
        what = "names no" if not found else f"names several sites {found}, not one"
        raise ValueError(
            f"Gemma Scope 2 folder {folder_name!r} {what} site (resid_post, attn_out, "
            "mlp_out, transcoder or clt)"
        )
    return found[0]


def gemma_3_weights_file(folder_name: str) -> str:
    """The weights file of a Gemma Scope 2 folder name, as a path in the repo (a CLT
    layer's name is its file's name without ``.safetensors``)."""
    folder = folder_name.strip("/")
    if gemma_3_site(folder) == "clt":
        return f"{folder}.safetensors"
    return in_folder(folder, GEMMA_3_WEIGHTS_FILENAME)


def _gemma_3_hooks(site: str, layer: int) -> dict[str, str]:
    """TransformerLens hook names (SAELens's) and the Hugging Face module points the
    SAE reads (and, for transcoders, writes) when the folder has no ``config.json``."""
    layer_hf = f"model.layers.{layer}"
    if site in ("transcoder", "clt"):
        return {
            "hook_name": f"blocks.{layer}.hook_mlp_in",
            "hook_name_out": f"blocks.{layer}.hook_mlp_out",
            "hf_hook_point_in": f"{layer_hf}.pre_feedforward_layernorm.output",
            "hf_hook_point_out": f"{layer_hf}.post_feedforward_layernorm.output",
        }
    hook, hf_in = {
        "resid_post": (f"blocks.{layer}.hook_resid_post", f"{layer_hf}.output"),
        # the attention SAEs read the heads' concatenated outputs: hook_z, not reshaped
        "attn_out": (f"blocks.{layer}.attn.hook_z", f"{layer_hf}.self_attn.o_proj.input"),
        "mlp_out": (
            f"blocks.{layer}.hook_mlp_out",
            f"{layer_hf}.post_feedforward_layernorm.output",
        ),
    }[site]
    return {"hook_name": hook, "hf_hook_point_in": hf_in}


def gemma_3_model_name(name: str) -> str:
    """A Gemma Scope 2 config's (or repo's) model name as the Hugging Face model id:
    ``gemma-v3-4b-pt`` -> ``google/gemma-3-4b-pt``; the 270m base model has no
    ``-pt`` suffix on the hub."""
    if "google" not in name:
        name = f"google/{name}"
    name = name.replace("-v3", "-3")
    if "270m" in name:
        name = name.replace("-pt", "")
    return name


def _gemma_3_raw_cfg(
    repo_id: str, folder: str, site: str, layer: int, force_download: bool
) -> tuple[dict[str, Any], str]:
    """The folder's ``config.json`` (or what its names say when it has none) and
    where it came from, for error messages."""
    cfg_file = in_folder(folder, GEMMA_3_CFG_FILENAME)
    local = fetch(repo_id, cfg_file, force_download, required=False)
    hooks = _gemma_3_hooks(site, layer)
    if local is not None:
        raw = read_json(local)
        where = f"{repo_id}/{cfg_file}"
        if "model_name" not in raw:
            raise ValueError(f"{where}: no 'model_name' (found {sorted(raw)})")
    else:
        raw = {
            "architecture": "jump_relu",
            "model_name": repo_id.replace("gemma-scope-2", "gemma-3"),
            "hf_hook_point_in": hooks["hf_hook_point_in"],
        }
        if "hf_hook_point_out" in hooks:
            raw["hf_hook_point_out"] = hooks["hf_hook_point_out"]
        if site in ("transcoder", "clt"):
            raw["affine_connection"] = "affine" in folder
        where = f"{repo_id}/{folder} (no {GEMMA_3_CFG_FILENAME}: read from the names)"
    if raw.get("architecture") != "jump_relu":
        raise ValueError(
            f"{where}: architecture {raw.get('architecture')!r}; Gemma Scope 2 SAEs are 'jump_relu'"
        )
    return raw, where


def gemma_3_sae_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A Gemma Scope 2 SAE, transcoder, skip transcoder or CLT layer (see the module
    docstring): JumpReLU, ``b_dec`` not subtracted from the input."""
    folder = folder_name.strip("/")
    site = gemma_3_site(folder)
    layer = _layer_in(folder)
    if layer is None:
        raise ValueError(f"{repo_id}/{folder}: no layer_<N> in the Gemma Scope 2 folder name")
    raw, raw_where = _gemma_3_raw_cfg(repo_id, folder, site, layer, force_download)
    hooks = _gemma_3_hooks(site, layer)
    transcoder = site in ("transcoder", "clt")
    skip = transcoder and bool(raw.get("affine_connection", False))

    cfg: dict[str, Any] = {
        "architecture": (
            ("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder")
            if transcoder
            else "jumprelu"
        ),
        **_GEMMA_3_DEFAULTS,
        "model_name": gemma_3_model_name(raw["model_name"]),
        "hook_name": hooks["hook_name"],
        "hf_hook_name": raw.get("hf_hook_point_in"),
        "device": device,
    }
    if transcoder:
        cfg["hook_name_out"] = hooks["hook_name_out"]
        cfg["hf_hook_name_out"] = raw.get("hf_hook_point_out")
    cfg.update(cfg_overrides or {})

    weights_file = gemma_3_weights_file(folder)
    where = f"{repo_id}/{weights_file}"
    path = fetch(repo_id, weights_file, force_download)
    assert path is not None
    raw_state = read_weights(path, device, cfg.get("dtype"))
    require_keys(raw_state, ["w_enc", "w_dec", "b_enc", "b_dec", "threshold"], where)
    w_enc, w_dec = raw_state["w_enc"], raw_state["w_dec"]
    if w_enc.ndim != 2:
        raise ValueError(f"{where}: w_enc has shape {list(w_enc.shape)}, expected [d_in, d_sae]")
    if site == "clt":
        if w_dec.ndim != 3:
            raise ValueError(
                f"{where}: a CLT layer's w_dec has shape {list(w_dec.shape)}, expected "
                "[d_sae, n_target_layers, d_out]"
            )
        warnings.warn(
            f"{where}: a cross-layer transcoder layer is loaded as a single-layer transcoder "
            f"whose decoder is the sum of its {w_dec.shape[1]} per-target-layer decoders: "
            "use it for feature activations, not for reconstructions",
            UserWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            w_dec = w_dec.sum(dim=1)
    d_in, d_sae = w_enc.shape
    cfg.update(d_in=d_in, d_sae=d_sae)
    if transcoder:
        cfg["d_out"] = w_dec.shape[-1]

    state = {
        "W_enc": w_enc,
        "W_dec": w_dec.contiguous(),
        "b_enc": raw_state["b_enc"],
        "b_dec": raw_state["b_dec"],
        "threshold": raw_state["threshold"],
    }
    affine = raw_state.get("affine_skip_connection")
    if skip and affine is None:
        raise ValueError(
            f"{where}: no 'affine_skip_connection', but {raw_where} says the transcoder "
            "has an affine skip connection"
        )
    if affine is not None:
        if not skip:
            raise ValueError(
                f"{where}: has an 'affine_skip_connection', but {raw_where} does not say "
                f"the {site} SAE has one (affine_connection)"
            )
        # stored [d_in, d_out]; SAELens's W_skip is [d_out, d_in]
        state["W_skip"] = affine.T.contiguous()
    return cfg, state, None


# ---------------------------------------------------------------------------- gemma_2_transcoder
# model of a Gemma Scope transcoder repo, by the size in its id (instruction-tuned first)
_GEMMA_2_MODELS = {
    "2b-it": "gemma-2-2b-it",
    "2b": "gemma-2-2b",
    "9b-it": "gemma-2-9b-it",
    "9b": "gemma-2-9b",
    "27b-it": "gemma-2-27b-it",
    "27b": "gemma-2-27b",
}

# the spellings of each weight in Gemma Scope transcoder npz files (lower-cased)
_GEMMA_2_TRANSCODER_KEYS = {
    "w_enc": "W_enc",
    "wenc": "W_enc",
    "w_e": "W_enc",
    "w_dec": "W_dec",
    "wdec": "W_dec",
    "w_d": "W_dec",
    "b_enc": "b_enc",
    "benc": "b_enc",
    "b_e": "b_enc",
    "b_dec": "b_dec",
    "bdec": "b_dec",
    "b_d": "b_dec",
    "threshold": "threshold",
}


def _read_npz(path: Path, device: str) -> dict[str, Tensor]:
    try:
        with np.load(path) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: truncated or corrupt npz file ({e})") from None
    return {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in arrays.items()}


def gemma_2_transcoder_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A Gemma Scope (Gemma 2) transcoder: ``layer_L/width_W/average_l0_N/params.npz``."""
    folder = folder_name.strip("/")
    layer = _layer_in(folder)
    if layer is None:
        layer = _layer_in(repo_id)
    if layer is None:
        raise ValueError(f"{repo_id}/{folder}: no layer_<N> in the folder name or repo id")
    model = next((name for key, name in _GEMMA_2_MODELS.items() if key in repo_id), None)
    if model is None:
        raise ValueError(
            f"{repo_id}: cannot tell which Gemma 2 model the transcoders are for (the repo "
            f"id names none of the sizes {list(_GEMMA_2_MODELS)})"
        )

    weights_file = in_folder(folder, GEMMA_2_TRANSCODER_FILENAME)
    where = f"{repo_id}/{weights_file}"
    path = fetch(repo_id, weights_file, force_download)
    assert path is not None
    state: dict[str, Tensor] = {}
    for key, tensor in _read_npz(path, device).items():
        name = _GEMMA_2_TRANSCODER_KEYS.get(key.lower())
        if name is not None:
            state[name] = tensor
    require_keys(state, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], where)
    for name in ("W_enc", "W_dec"):
        if state[name].ndim != 2:
            raise ValueError(f"{where}: {name} has shape {list(state[name].shape)}, expected 2-D")
    d_in, d_sae = state["W_enc"].shape

    cfg = {
        "architecture": "jumprelu_transcoder",
        "d_in": d_in,
        "d_out": state["W_dec"].shape[1],
        "d_sae": d_sae,
        "dtype": "float32",
        "device": device,
        "activation_fn": "relu",
        "normalize_activations": "none",
        "model_name": model,
        "hook_name": f"blocks.{layer}.ln2.hook_normalized",
        "hook_name_out": f"blocks.{layer}.hook_mlp_out",
        "hook_head_index": None,
        "hook_head_index_out": None,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": 1024,
        "apply_b_dec_to_input": False,
        **(cfg_overrides or {}),
    }
    return cfg, state, None
