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
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from fastsae.loading.atomic_dir import recover_dir
from fastsae.loading.converters import (
    DICTIONARY_LEARNING_FILENAME,
    GEMMA_SCOPE_FILENAME,
    SPARSIFY_WEIGHTS_FILENAME,
    detect_disk_converter,
    dictionary_learning_disk_loader,
    gemma_scope_disk_loader,
    sparsify_disk_loader,
)
from fastsae.loading.disk import (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    DiskConverter,
    build_sae,
    handle_config_defaulting,
    read_log_sparsity,
    sae_lens_disk_loader,
)
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


# registry format name -> (files to fetch, optional files, disk converter)
_FORMATS: dict[str, tuple[list[str], list[str], DiskConverter]] = {
    "sae_lens": (
        [SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME],
        [SPARSITY_FILENAME],
        sae_lens_disk_loader,
    ),
    "gemma_2": ([GEMMA_SCOPE_FILENAME], [], gemma_scope_disk_loader),
    "sparsify": ([SAE_CFG_FILENAME, SPARSIFY_WEIGHTS_FILENAME], [], sparsify_disk_loader),
    "dictionary_learning_1": (
        [DICTIONARY_LEARNING_FILENAME, "config.json"],
        [],
        dictionary_learning_disk_loader,
    ),
}
# files that identify a format in a plain repo folder, tried in this order
_PROBES = [
    (SAE_WEIGHTS_FILENAME, "sae_lens"),
    (SPARSIFY_WEIGHTS_FILENAME, "sparsify"),
    (GEMMA_SCOPE_FILENAME, "gemma_2"),
    (DICTIONARY_LEARNING_FILENAME, "dictionary_learning_1"),
]


def _hf_download(repo_id: str, filename: str, force_download: bool) -> Path | None:
    """Download one file (or find it in the cache); None when the repo has no such file."""
    try:
        return Path(
            hf_hub_download(repo_id=repo_id, filename=filename, force_download=force_download)
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _fetch_folder(
    repo_id: str, folder: str, fmt: str | None, force_download: bool
) -> tuple[Path, str]:
    """Make ``folder`` of ``repo_id`` available locally; returns (local folder, format)."""
    local_root = Path(repo_id).expanduser()
    if local_root.is_dir():  # a local directory laid out like a hub repo
        local = recover_dir(local_root / folder)  # finish a swap that a kill interrupted
        if not local.is_dir():
            raise FileNotFoundError(f"{local}: SAE folder not found")
        converter = detect_disk_converter(local)  # raises naming what is missing
        return local, fmt or _format_of(converter)
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    if fmt is None:
        for probe, name in _PROBES:
            if _hf_download(repo_id, prefix + probe, force_download) is not None:
                fmt = name
                break
        else:
            raise FileNotFoundError(
                f"{repo_id}/{folder}: no SAE files found (looked for "
                f"{[p for p, _ in _PROBES]}; offline={_offline()})"
            )
    needed, optional, _ = _FORMATS[fmt]
    local = None
    for name in needed:
        got = _hf_download(repo_id, prefix + name, force_download)
        if got is None:
            raise FileNotFoundError(f"{repo_id}: missing {prefix + name} (offline={_offline()})")
        local = got.parent
    for name in optional:
        _hf_download(repo_id, prefix + name, force_download)
    if fmt == "sparsify" and prefix:  # the run config beside the layer folders names the model
        _hf_download(repo_id, "config.json", force_download)
    assert local is not None
    return local, fmt


def _offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def _format_of(converter: DiskConverter) -> str:
    for name, (_, _, conv) in _FORMATS.items():
        if conv is converter:
            return name
    raise AssertionError(converter)


def load_pretrained(
    release: str,
    sae_id: str,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    force_download: bool = False,
    converter: DiskConverter | None = None,
    fold_W_dec_norm: bool = False,
    expected_cls: type[SAE] | None = None,
) -> tuple[SAE, dict[str, Any], torch.Tensor | None]:
    """Resolve, download, convert and build: ``(sae, cfg_dict, log_sparsity)``."""
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
        if fmt not in _FORMATS and converter is None:
            raise NotImplementedError(
                f"release {release!r} is in the {fmt!r} format, which fastsae does not convert "
                f"yet (supported: {sorted(_FORMATS)}). Load it with sae_lens and convert it with "
                "fastsae.SAE.from_sae_lens(sae)."
            )
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

    local, fmt = _fetch_folder(repo_id, folder, fmt, force_download)
    convert = converter or _FORMATS[fmt][2]
    dtype_str = dtype_to_str(dtype)
    overrides.update(device=device, dtype=dtype_str)
    if convert is gemma_scope_disk_loader:
        cfg_dict, state_dict = gemma_scope_disk_loader(
            local, device=device, cfg_overrides=overrides, repo_id=repo_id, folder=folder
        )
    else:
        cfg_dict, state_dict = convert(local, device=device, cfg_overrides=overrides)
    cfg_dict = handle_config_defaulting(cfg_dict, where=f"{repo_id}/{folder}")
    # registry metadata (neuronpedia_id, dataset_path, ...) must land in ``metadata``: a
    # 6.x cfg.json is not rewritten, and top-level keys that are not fields are dropped
    metadata_overrides = {k: v for k, v in overrides.items() if k in LLM_METADATA_KEYS}
    if metadata_overrides:
        cfg_dict["metadata"] = {**(cfg_dict.get("metadata") or {}), **metadata_overrides}
    sae = build_sae(cfg_dict, state_dict, where=f"{repo_id}/{folder}", expected_cls=expected_cls)
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
    log_sparsity = read_log_sparsity(local / SPARSITY_FILENAME, device, d_sae=sae.cfg.d_sae)
    sae._log_sparsity = log_sparsity
    return sae, flat_cfg_dict(sae), log_sparsity


def flat_cfg_dict(sae: SAE) -> dict[str, Any]:
    """``cfg.to_dict()`` plus the metadata keys flat (``cfg_dict["hook_name"]``), for older code."""
    cfg_dict = sae.cfg.to_dict()
    for key, value in cfg_dict["metadata"].items():
        cfg_dict.setdefault(key, value)
    return cfg_dict
