"""``SAE.from_pretrained``: the SAELens release registry and Hugging Face downloads.

Files come through ``huggingface_hub.hf_hub_download``, so its cache,
``HF_HUB_OFFLINE=1`` and ``force_download`` behave as users expect. ``release`` is
a registry release name, a Hugging Face repo id (``"user/repo"``, with ``sae_id``
the folder in it), or a local directory laid out like such a repo.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from fastsae.loading.atomic_dir import recover_dir
from fastsae.loading.converters import detect_disk_converter
from fastsae.loading.disk import build_sae, handle_config_defaulting
from fastsae.loading.hub import PretrainedSaeHuggingfaceLoader, fetch, local_repo, offline
from fastsae.loading.hub_loaders import DISK_FORMATS, PROBES, loader_for_format
from fastsae.saes.config import LLM_METADATA_KEYS, dtype_to_str

if TYPE_CHECKING:
    from fastsae.saes.base import SAE


@dataclass
class PretrainedRelease:
    """One release of the registry."""

    release: str
    repo_id: str
    model: str | None
    conversion_func: str | None
    saes_map: dict[str, str]  # sae_id -> folder in the repo
    neuronpedia_id: dict[str, str] = field(default_factory=dict)
    norm_scaling_factor: dict[str, float] = field(default_factory=dict)
    config_overrides: dict[str, Any] | None = None


@cache
def get_pretrained_saes_directory() -> dict[str, PretrainedRelease]:
    """The release registry shipped with fastsae (``loading/pretrained_saes.yaml``)."""
    text = files("fastsae.loading").joinpath("pretrained_saes.yaml").read_text()
    data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    directory = {}
    for release, info in data.items():
        entries = info["saes"]
        directory[release] = PretrainedRelease(
            release=release,
            repo_id=info["repo_id"],
            model=info.get("model"),
            conversion_func=info.get("conversion_func"),
            saes_map={e["id"]: e["path"] for e in entries},
            neuronpedia_id={e["id"]: e["neuronpedia"] for e in entries if "neuronpedia" in e},
            norm_scaling_factor={
                e["id"]: e["norm_scaling_factor"] for e in entries if "norm_scaling_factor" in e
            },
            config_overrides=info.get("config_overrides"),
        )
    return directory


def detect_format(repo_id: str, folder: str, force_download: bool) -> str:
    """The registry format of a folder of a repo that is not in the registry, from the
    files in it (a local directory ``repo_id`` is read directly)."""
    root = local_repo(repo_id)
    if root is not None:
        local = recover_dir(root / folder)  # finish a swap that a kill interrupted
        if not local.is_dir():
            raise FileNotFoundError(f"{local}: SAE folder not found")
        return DISK_FORMATS[detect_disk_converter(local)]  # raises naming what is missing
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    for probe, name in PROBES:
        if fetch(repo_id, prefix + probe, force_download, required=False) is not None:
            return name
    raise FileNotFoundError(
        f"{repo_id}/{folder}: no SAE files found (looked for "
        f"{[p for p, _ in PROBES]}; offline={offline()})"
    )


def load_pretrained(
    release: str,
    sae_id: str,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    force_download: bool = False,
    converter: PretrainedSaeHuggingfaceLoader | None = None,
    fold_W_dec_norm: bool = False,
    expected_cls: type[SAE] | None = None,
) -> tuple[SAE, dict[str, Any], torch.Tensor | None]:
    """Resolve, download, convert and build: ``(sae, cfg_dict, log_sparsity)``.

    ``converter`` (sae-lens's ``PretrainedSaeHuggingfaceLoader``) replaces the loader
    the release's format names.
    """
    directory = get_pretrained_saes_directory()
    overrides: dict[str, Any] = {}
    fmt: str | None = None
    info = directory.get(release)
    if info is not None:
        if sae_id not in info.saes_map:
            valid = list(info.saes_map)
            shown = str(valid[:5])[:-1] + ", ...]" if len(valid) > 5 else str(valid)
            raise ValueError(f"ID {sae_id} not found in release {release}. Valid IDs are {shown}.")
        repo_id, folder = info.repo_id, info.saes_map[sae_id]
        fmt = info.conversion_func or "sae_lens"
        overrides.update(info.config_overrides or {})
        if sae_id in info.neuronpedia_id:
            overrides["neuronpedia_id"] = info.neuronpedia_id[sae_id]
    elif "/" in release or Path(release).expanduser().is_dir():
        matching = [r for r, i in directory.items() if i.repo_id == release]
        if matching:
            warnings.warn(
                f"repo {release!r} is registered as release(s) {matching}; loading by release "
                f"name adds its metadata: SAE.from_pretrained({matching[0]!r}, sae_id)",
                UserWarning,
                stacklevel=3,
            )
        repo_id, folder = release, sae_id
    else:
        raise ValueError(
            f"Release {release} not found in pretrained SAEs directory, and is not a valid "
            "huggingface repo."
        )

    if converter is None:
        if fmt is None:
            fmt = detect_format(repo_id, folder, force_download)
        converter = loader_for_format(fmt)
    elif local_repo(repo_id) is not None:  # a user's loader may read the folder itself
        recover_dir(local_repo(repo_id) / folder)
    dtype_str = dtype_to_str(dtype)
    overrides.update(device=device, dtype=dtype_str)
    where = f"{repo_id}/{folder}"
    cfg_dict, state_dict, log_sparsity = converter(
        repo_id=repo_id,
        folder_name=folder,
        device=device,
        force_download=force_download,
        cfg_overrides=overrides,
    )
    cfg_dict = handle_config_defaulting(cfg_dict, where=where)
    # registry metadata (neuronpedia_id, dataset_path, ...) must land in ``metadata``: a
    # 6.x cfg.json is not rewritten, and top-level keys that are not fields are dropped
    metadata_overrides = {k: v for k, v in overrides.items() if k in LLM_METADATA_KEYS}
    if metadata_overrides:
        cfg_dict["metadata"] = {**(cfg_dict.get("metadata") or {}), **metadata_overrides}
    sae = build_sae(cfg_dict, state_dict, where=where, expected_cls=expected_cls)
    if sae.cfg.normalize_activations == "expected_average_only_in":
        factor = info.norm_scaling_factor.get(sae_id) if info is not None else None
        if factor is not None:
            sae.fold_activation_norm_scaling_factor(factor)
        else:
            warnings.warn(
                f"{release}/{sae_id}: normalize_activations='expected_average_only_in' but no "
                "norm_scaling_factor is registered; inputs are used unscaled",
                UserWarning,
                stacklevel=3,
            )
    if fold_W_dec_norm:
        sae.fold_W_dec_norm()
    if log_sparsity is not None:
        log_sparsity = check_log_sparsity(log_sparsity, sae.cfg.d_sae, where)
    sae._log_sparsity = log_sparsity
    return sae, flat_cfg_dict(sae), log_sparsity


def check_log_sparsity(log_sparsity: torch.Tensor, d_sae: int, where: str) -> torch.Tensor:
    """A loader's log sparsity, after checking it is the SAE's (``[d_sae]``)."""
    if log_sparsity.numel() != d_sae or max(log_sparsity.shape, default=1) != d_sae:
        raise ValueError(
            f"{where}: sparsity has shape {list(log_sparsity.shape)}, but the SAE has "
            f"d_sae={d_sae} (expected [{d_sae}]); the file belongs to another SAE"
        )
    return log_sparsity


def flat_cfg_dict(sae: SAE) -> dict[str, Any]:
    """``cfg.to_dict()`` plus the metadata keys flat (``cfg_dict["hook_name"]``), for older code."""
    cfg_dict = sae.cfg.to_dict()
    for key, value in cfg_dict["metadata"].items():
        cfg_dict.setdefault(key, value)
    return cfg_dict
