"""Every format of the release registry, by the name the registry's
``conversion_func`` gives it: ``NAMED_PRETRAINED_SAE_LOADERS[name]`` is a
:class:`~fastsae.loading.hub.PretrainedSaeHuggingfaceLoader`.

The formats that are also folders on disk (SAELens, Gemma Scope ``params.npz``,
EleutherAI sparsify, dictionary_learning) fetch their files and hand the folder to
their disk converter; the others live in :mod:`fastsae.loading.formats`, one module
per publisher's layout. A new format is one loader function plus one entry here (and
a probe in :data:`PROBES` when plain repos of that format should be recognised).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from fastsae.loading.converters import (
    DICTIONARY_LEARNING_FILENAME,
    GEMMA_SCOPE_FILENAME,
    SPARSIFY_WEIGHTS_FILENAME,
    dictionary_learning_disk_loader,
    gemma_scope_disk_loader,
    sparsify_disk_loader,
)
from fastsae.loading.disk import (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    PretrainedSaeDiskLoader,
    read_log_sparsity,
    sae_lens_disk_loader,
)
from fastsae.loading.formats.circuit_tracer import (
    mntss_clt_layer_huggingface_loader,
    mwhanna_transcoder_huggingface_loader,
)
from fastsae.loading.formats.connor_rob import connor_rob_hook_z_huggingface_loader
from fastsae.loading.formats.deepseek_r1 import deepseek_r1_sae_huggingface_loader
from fastsae.loading.formats.gemma_scope import (
    gemma_2_transcoder_huggingface_loader,
    gemma_3_sae_huggingface_loader,
)
from fastsae.loading.formats.goodfire import goodfire_sae_huggingface_loader
from fastsae.loading.formats.llama_scope import (
    llama_scope_r1_distill_sae_huggingface_loader,
    llama_scope_sae_huggingface_loader,
)
from fastsae.loading.formats.qwen_scope import qwen_scope_sae_huggingface_loader
from fastsae.loading.formats.temporal import temporal_sae_huggingface_loader
from fastsae.loading.hub import PretrainedSaeHuggingfaceLoader, fetch, in_folder


def _fetch_folder(
    repo_id: str, folder_name: str, force_download: bool, needed: list[str], optional: list[str]
) -> Path:
    """Fetch ``needed`` (errors name the missing one) and ``optional`` files of a folder;
    returns the local folder that holds them."""
    local = None
    for name in needed:
        local = fetch(repo_id, in_folder(folder_name, name), force_download)
    for name in optional:
        fetch(repo_id, in_folder(folder_name, name), force_download, required=False)
    assert local is not None
    return local.parent


def sae_lens_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A folder written by SAELens (any version) or fastsae, with its sparsity if any."""
    local = _fetch_folder(
        repo_id,
        folder_name,
        force_download,
        [SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME],
        [SPARSITY_FILENAME],
    )
    cfg_dict, state_dict = sae_lens_disk_loader(local, device=device, cfg_overrides=cfg_overrides)
    d_sae = cfg_dict.get("d_sae")
    sparsity = read_log_sparsity(
        local / SPARSITY_FILENAME, device, d_sae=d_sae if isinstance(d_sae, int) else None
    )
    return cfg_dict, state_dict, sparsity


def gemma_2_sae_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A Gemma Scope (Gemma 2) folder: ``params.npz``; model and hook from the names."""
    local = _fetch_folder(repo_id, folder_name, force_download, [GEMMA_SCOPE_FILENAME], [])
    cfg_dict, state_dict = gemma_scope_disk_loader(
        local, device=device, cfg_overrides=cfg_overrides, repo_id=repo_id, folder=folder_name
    )
    return cfg_dict, state_dict, None


def sparsify_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """An EleutherAI sparsify layer folder (the run's ``config.json`` beside the layer
    folders names the model)."""
    local = _fetch_folder(
        repo_id, folder_name, force_download, [SAE_CFG_FILENAME, SPARSIFY_WEIGHTS_FILENAME], []
    )
    if folder_name.strip("/"):
        fetch(repo_id, "config.json", force_download, required=False)
    cfg_dict, state_dict = sparsify_disk_loader(local, device=device, cfg_overrides=cfg_overrides)
    return cfg_dict, state_dict, None


def dictionary_learning_sae_huggingface_loader_1(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """A dictionary_learning folder (``ae.pt`` + ``config.json``)."""
    local = _fetch_folder(
        repo_id, folder_name, force_download, [DICTIONARY_LEARNING_FILENAME, "config.json"], []
    )
    cfg_dict, state_dict = dictionary_learning_disk_loader(
        local, device=device, cfg_overrides=cfg_overrides
    )
    return cfg_dict, state_dict, None


NAMED_PRETRAINED_SAE_LOADERS: dict[str, PretrainedSaeHuggingfaceLoader] = {
    "sae_lens": sae_lens_huggingface_loader,
    "gemma_2": gemma_2_sae_huggingface_loader,
    "sparsify": sparsify_huggingface_loader,
    "dictionary_learning_1": dictionary_learning_sae_huggingface_loader_1,
    "llama_scope": llama_scope_sae_huggingface_loader,
    "llama_scope_r1_distill": llama_scope_r1_distill_sae_huggingface_loader,
    "qwen_scope": qwen_scope_sae_huggingface_loader,
    "deepseek_r1": deepseek_r1_sae_huggingface_loader,
    "goodfire": goodfire_sae_huggingface_loader,
    "connor_rob_hook_z": connor_rob_hook_z_huggingface_loader,
    "temporal": temporal_sae_huggingface_loader,
    "gemma_3": gemma_3_sae_huggingface_loader,
    "gemma_2_transcoder": gemma_2_transcoder_huggingface_loader,
    "mwhanna_transcoder": mwhanna_transcoder_huggingface_loader,
    "mntss_clt_layer_transcoder": mntss_clt_layer_huggingface_loader,
}

# files that identify the format of a plain repo folder (no registry entry), in order
PROBES: list[tuple[str, str]] = [
    (SAE_WEIGHTS_FILENAME, "sae_lens"),
    (SPARSIFY_WEIGHTS_FILENAME, "sparsify"),
    (GEMMA_SCOPE_FILENAME, "gemma_2"),
    (DICTIONARY_LEARNING_FILENAME, "dictionary_learning_1"),
]

# the disk converter that reads a local folder of each probed format
DISK_FORMATS: dict[PretrainedSaeDiskLoader, str] = {
    sae_lens_disk_loader: "sae_lens",
    sparsify_disk_loader: "sparsify",
    gemma_scope_disk_loader: "gemma_2",
    dictionary_learning_disk_loader: "dictionary_learning_1",
}


def loader_for_format(name: str) -> PretrainedSaeHuggingfaceLoader:
    """The loader of a registry format; an error naming the known formats otherwise."""
    try:
        return NAMED_PRETRAINED_SAE_LOADERS[name]
    except KeyError:
        raise ValueError(
            f"no loader for the SAE format {name!r}; known formats: "
            f"{sorted(NAMED_PRETRAINED_SAE_LOADERS)}"
        ) from None
