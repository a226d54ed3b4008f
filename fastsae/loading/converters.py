"""Converters for the foreign SAE formats users meet most.

Each converter reads a directory and returns ``(cfg_dict, state_dict)`` in
SAELens's pre-6.0 flat layout (``handle_config_defaulting`` brings it to 6.x),
with SAELens parameter names and orientation:

- Gemma Scope (``params.npz``): JumpReLU, ``b_dec`` not subtracted from the input.
- EleutherAI sparsify (``cfg.json`` + ``sae.safetensors``): TopK.
- dictionary_learning (``ae.pt`` + ``config.json``): standard, gated, TopK,
  BatchTopK / Matryoshka BatchTopK (as JumpReLU), JumpReLU.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fastsae.loading.atomic_dir import recover_dir
from fastsae.loading.disk import (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    PretrainedSaeDiskLoader,
    build_sae,
    check_device,
    handle_config_defaulting,
    read_json,
    read_safetensors,
    sae_lens_disk_loader,
)
from fastsae.saes.config import dtype_to_str

if TYPE_CHECKING:  # annotations only: fastsae.saes.base imports this module
    from fastsae.saes.base import SAE

GEMMA_SCOPE_FILENAME = "params.npz"
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
DICTIONARY_LEARNING_FILENAME = "ae.pt"


def _layer_from(text: str) -> int | None:
    match = re.search(r"layers?[._](\d+)", text)
    return int(match.group(1)) if match else None


def _with_overrides(cfg: dict[str, Any], device: str, overrides: dict[str, Any] | None):
    cfg["device"] = device
    if overrides:
        cfg.update(overrides)
    return cfg


def _require(tensors: dict[str, Tensor], keys: list[str], where: Path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{where}: missing weights {missing} (found {sorted(tensors)})")


# ---------------------------------------------------------------------------- Gemma Scope
def gemma_scope_metadata(repo_id: str, folder: str) -> dict[str, Any]:
    """Model and hook of a Gemma Scope SAE, read from its repo id and folder name."""
    models = {"2b-it": "gemma-2-2b-it", "9b-it": "gemma-2-9b-it", "27b-it": "gemma-2-27b-it",
              "2b": "gemma-2-2b", "9b": "gemma-2-9b", "27b": "gemma-2-27b"}  # fmt: skip
    meta: dict[str, Any] = {"context_size": 1024, "prepend_bos": True}
    model = next((name for key, name in models.items() if key in repo_id), None)
    if model:
        meta["model_name"] = model
    layer = _layer_from(folder)
    if "embedding" in folder:
        meta["hook_name"] = "hook_embed"
    elif layer is not None:
        if "res" in repo_id:
            meta["hook_name"] = f"blocks.{layer}.hook_resid_post"
        elif "mlp" in repo_id:
            meta["hook_name"] = f"blocks.{layer}.hook_mlp_out"
        elif "att" in repo_id:
            meta["hook_name"] = f"blocks.{layer}.attn.hook_z"
    return meta


def gemma_scope_disk_loader(
    path: str | Path,
    device: str = "cpu",
    cfg_overrides: dict[str, Any] | None = None,
    *,
    repo_id: str = "",
    folder: str | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A Gemma Scope folder (``params.npz`` with W_enc, W_dec, b_enc, b_dec, threshold)."""
    path = Path(path)
    file = path / GEMMA_SCOPE_FILENAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: file not found")
    try:
        with np.load(file) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{file}: truncated or corrupt npz file ({e})") from None
    state = {
        ("W_" + k[2:] if k.startswith("w_") else k): torch.tensor(v, dtype=torch.float32)
        for k, v in arrays.items()
    }
    _require(state, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], file)
    d_in, d_sae = state["W_enc"].shape
    if folder is None:  # Gemma Scope folders are <layer_N | embedding>/width_W/average_l0_L
        folder = "/".join(path.parts[-3:])
    if "embedding" in folder:
        # Gemma scales embeddings by sqrt(d_model) after the hook these SAEs read
        state["W_enc"] = state["W_enc"] / d_in**0.5
        state["W_dec"] = state["W_dec"] * d_in**0.5
    cfg = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "activation_fn": "relu",
        "dataset_path": "monology/pile-uncopyrighted",
        **gemma_scope_metadata(repo_id, folder),
    }
    if "scaling_factor" in state:
        cfg["finetuning_scaling_factor"] = True
    return _with_overrides(cfg, device, cfg_overrides), state


# ---------------------------------------------------------------------------- sparsify
def sparsify_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An EleutherAI sparsify folder (``cfg.json`` + ``sae.safetensors``), as a TopK SAE.

    sparsify encodes ``topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))`` and
    decodes ``acts @ W_dec + b_dec``: SAELens's TopK with ``apply_b_dec_to_input=True``.
    """
    path = Path(path)
    raw = read_json(path / SAE_CFG_FILENAME)
    where = path / SAE_CFG_FILENAME
    if raw.get("activation", "topk") != "topk":
        raise ValueError(
            f"{where}: sparsify activation {raw['activation']!r} has no SAELens architecture "
            "(only 'topk' converts)"
        )
    if raw.get("transcode") or raw.get("skip_connection"):
        raise ValueError(
            f"{where}: sparsify transcoders / skip connections have no SAELens TopK "
            "equivalent and are not converted"
        )
    for key in ("d_in", "k"):
        if key not in raw:
            raise ValueError(f"{where}: missing {key!r} in sparsify config")
    file = path / SPARSIFY_WEIGHTS_FILENAME
    tensors = read_safetensors(file, device)
    _require(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], file)
    state = {
        "W_enc": tensors["encoder.weight"].T.contiguous(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    d_sae = raw.get("num_latents") or raw["d_in"] * raw.get("expansion_factor", 0)
    if d_sae != state["W_enc"].shape[1]:
        raise ValueError(
            f"{file}: encoder.weight has {state['W_enc'].shape[1]} latents but {where} "
            f"implies {d_sae}"
        )
    run_cfg_path = path.parent / "config.json"
    run_cfg = read_json(run_cfg_path) if run_cfg_path.is_file() else {}
    layer = _layer_from(path.name)
    if path.name == "embed_tokens":
        hook_name = "hook_embed"
    elif layer is not None:
        hook_name = f"blocks.{layer}.hook_resid_post"
    else:
        hook_name = None
    cfg = {
        "architecture": "topk",
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": raw["k"]},
        "d_in": raw["d_in"],
        "d_sae": d_sae,
        "dtype": dtype_to_str(state["W_enc"].dtype),
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "model_name": run_cfg.get("model", path.parent.name),
        "hook_name": hook_name,
        "hf_hook_name": path.name,
        "dataset_path": run_cfg.get("dataset"),
        "context_size": run_cfg.get("ctx_len"),
    }
    return _with_overrides(cfg, device, cfg_overrides), state


# ---------------------------------------------------------------------------- dictionary_learning
def _load_pt(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: file not found")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad pickles / zip files
        raise ValueError(f"{file}: truncated or corrupt torch file ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{file}: expected a state dict of tensors")
    return obj


def dictionary_learning_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A dictionary_learning folder (``ae.pt`` + ``config.json`` from its trainer)."""
    path = Path(path)
    file = path / DICTIONARY_LEARNING_FILENAME
    sd = _load_pt(file)
    config_path = path / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    trainer = config.get("trainer", {})
    dict_class = trainer.get("dict_class")
    if dict_class is None:
        if "r_mag" in sd:
            dict_class = "GatedAutoEncoder"
        elif "W_enc" in sd and "k" in sd:
            dict_class = "MatryoshkaBatchTopKSAE"
        elif "W_enc" in sd:
            dict_class = "JumpReluAutoEncoder"
        elif "bias" in sd:
            dict_class = "AutoEncoder"
        else:
            raise ValueError(
                f"{path}: cannot tell the dictionary_learning class from {file.name}'s keys "
                f"{sorted(sd)}; put the trainer's config.json (trainer.dict_class) beside it"
            )

    def linear_weights() -> tuple[Tensor, Tensor]:
        _require(sd, ["encoder.weight", "decoder.weight"], file)
        return sd["encoder.weight"].T.contiguous(), sd["decoder.weight"].T.contiguous()

    cfg: dict[str, Any] = {"apply_b_dec_to_input": True, "activation_fn": "relu"}
    if dict_class == "AutoEncoder":
        W_enc, W_dec = linear_weights()
        _require(sd, ["encoder.bias", "bias"], file)
        state = {"W_enc": W_enc, "b_enc": sd["encoder.bias"], "W_dec": W_dec, "b_dec": sd["bias"]}
        cfg["architecture"] = "standard"
    elif dict_class == "GatedAutoEncoder":
        W_enc, W_dec = linear_weights()
        _require(sd, ["decoder_bias", "r_mag", "gate_bias", "mag_bias"], file)
        state = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": sd["decoder_bias"],
                 "r_mag": sd["r_mag"], "b_gate": sd["gate_bias"], "b_mag": sd["mag_bias"]}  # fmt: skip
        cfg["architecture"] = "gated"
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        W_enc, W_dec = linear_weights()
        _require(sd, ["encoder.bias", "b_dec", "k"], file)
        state = {"W_enc": W_enc, "b_enc": sd["encoder.bias"], "W_dec": W_dec, "b_dec": sd["b_dec"]}
        if dict_class == "AutoEncoderTopK":
            cfg.update(architecture="topk", activation_fn="topk",
                       activation_fn_kwargs={"k": int(sd["k"])})  # fmt: skip
        else:
            _require(sd, ["threshold"], file)
            state["threshold"] = sd["threshold"].float().expand(W_enc.shape[1]).clone()
            cfg["architecture"] = "jumprelu"
    elif dict_class in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        _require(sd, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], file)
        state = {k: sd[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        state["threshold"] = sd["threshold"].float().expand(sd["W_enc"].shape[1]).clone()
        cfg["architecture"] = "jumprelu"
        # JumpReluAutoEncoder does not subtract b_dec before encoding
        cfg["apply_b_dec_to_input"] = dict_class == "MatryoshkaBatchTopKSAE"
    else:
        raise ValueError(
            f"{config_path}: dictionary_learning class {dict_class!r} is not supported"
        )

    d_in, d_sae = state["W_enc"].shape
    layer = trainer.get("layer")
    cfg.update(
        d_in=trainer.get("activation_dim", d_in),
        d_sae=trainer.get("dict_size", d_sae),
        dtype="float32",
        normalize_activations="none",
        model_name=(trainer.get("lm_name") or "").split("/")[-1] or None,
        hook_name=f"blocks.{layer}.hook_resid_post" if layer is not None else None,
        context_size=config.get("buffer", {}).get("ctx_len"),
    )
    state = {k: v.to(torch.float32) for k, v in state.items()}
    return _with_overrides(cfg, device, cfg_overrides), state


# ---------------------------------------------------------------------------- detection
DISK_CONVERTERS: dict[str, PretrainedSaeDiskLoader] = {
    "sae_lens": sae_lens_disk_loader,
    "gemma_scope": gemma_scope_disk_loader,
    "sparsify": sparsify_disk_loader,
    "dictionary_learning": dictionary_learning_disk_loader,
}


def detect_disk_converter(path: str | Path) -> PretrainedSaeDiskLoader:
    """Pick the converter for a directory from the files in it."""
    path = Path(path)
    if path.is_file():
        raise NotADirectoryError(f"{path}: is a file; pass the SAE directory that holds it")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: SAE directory not found")
    if (path / SAE_WEIGHTS_FILENAME).exists() or (
        (path / SAE_CFG_FILENAME).exists() and not (path / SPARSIFY_WEIGHTS_FILENAME).exists()
    ):
        return sae_lens_disk_loader
    if (path / SPARSIFY_WEIGHTS_FILENAME).exists():
        return sparsify_disk_loader
    if (path / GEMMA_SCOPE_FILENAME).exists():
        return gemma_scope_disk_loader
    if (path / DICTIONARY_LEARNING_FILENAME).exists():
        return dictionary_learning_disk_loader
    raise FileNotFoundError(
        f"{path}: no SAE found (looked for {SAE_CFG_FILENAME} + {SAE_WEIGHTS_FILENAME}, "
        f"{SPARSIFY_WEIGHTS_FILENAME}, {GEMMA_SCOPE_FILENAME}, {DICTIONARY_LEARNING_FILENAME}); "
        f"found {sorted(p.name for p in path.iterdir())}"
    )


def load_sae_from_disk(
    path: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    converter: PretrainedSaeDiskLoader | None = None,
    *,
    expected_cls: type[SAE] | None = None,
    validate: bool = False,
) -> SAE:
    """Load an SAE directory: SAELens 6.x or older, or (``converter=None``) any format
    :func:`detect_disk_converter` recognises."""
    check_device(device)
    path = recover_dir(Path(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: SAE directory not found")
    overrides = {"dtype": dtype_to_str(dtype)} if dtype is not None else None
    if converter is None:
        converter = detect_disk_converter(path)
    cfg_dict, state_dict = converter(path, device=device, cfg_overrides=overrides)
    cfg_dict = handle_config_defaulting(cfg_dict, where=str(path))
    return build_sae(
        cfg_dict, state_dict, where=str(path), expected_cls=expected_cls, validate=validate
    )
