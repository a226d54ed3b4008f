"""Files of a Hugging Face repo, for the pretrained-SAE loaders, and the loader protocols.

A loader (:class:`PretrainedSaeHuggingfaceLoader`, sae-lens's protocol) is called with
``repo_id`` and ``folder_name`` and fetches what it needs with :func:`fetch`, which
goes through ``huggingface_hub.hf_hub_download`` (its cache, ``HF_HUB_OFFLINE=1`` and
``force_download`` behave as users expect) or, when ``repo_id`` is a local directory
laid out like a repo, reads from there. A file that is missing is an error naming the
repo, the file and whether the hub was offline; so is one that does not parse, a config
without a field a format needs, or weights without a tensor it needs (``repo_id/path``).
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from torch import Tensor

from fastsae.loading.atomic_dir import recover_dir
from fastsae.loading.disk import WEIGHT_DTYPES, check_device, read_json, read_safetensors
from fastsae.saes.config import str_to_dtype


class PretrainedSaeHuggingfaceLoader(Protocol):
    """Reads one SAE of a repo: ``(cfg_dict, state_dict, log_sparsity or None)``.

    ``cfg_dict`` may be in SAELens's flat pre-6.0 layout (it is defaulted after) and
    ``state_dict`` uses SAELens's parameter names and orientation.
    """

    def __call__(
        self,
        repo_id: str,
        folder_name: str,
        device: str,
        force_download: bool,
        cfg_overrides: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]: ...


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is on (only the local cache is read)."""
    return bool(constants.HF_HUB_OFFLINE)


def local_repo(repo_id: str) -> Path | None:
    """``repo_id`` as a local directory laid out like a hub repo, or None."""
    root = Path(repo_id).expanduser()
    return root if root.is_dir() else None


def fetch(
    repo_id: str, filename: str, force_download: bool = False, *, required: bool = True
) -> Path | None:
    """The local path of ``filename`` (a path inside the repo) of ``repo_id``.

    Downloads it (or finds it in the cache); for a local directory ``repo_id`` reads it
    from there. A missing file raises ``FileNotFoundError`` naming repo and file, or
    returns None when ``required=False``.
    """
    filename = filename.strip("/")
    root = local_repo(repo_id)
    if root is not None:
        parent = recover_dir((root / filename).parent)  # finish a swap a kill interrupted
        path = parent / Path(filename).name
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{repo_id}: missing {filename} ({path} not found)")
        return None
    try:
        return Path(
            hf_hub_download(repo_id=repo_id, filename=filename, force_download=force_download)
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        if required:
            raise FileNotFoundError(
                f"{repo_id}: missing {filename} (offline={offline()})"
            ) from None
        return None


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` from a safetensors file's header, without reading the
    tensors (sae-lens reads the same header over HTTP for some formats)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: truncated or corrupt safetensors header ({e})") from None
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def read_weights(path: Path, device: str = "cpu", dtype: Any = None) -> dict[str, Tensor]:
    """Every tensor of a safetensors file of SAE weights, cast to ``dtype`` when given."""
    tensors = read_safetensors(path, device)
    if dtype is None:
        return tensors
    target = dtype if isinstance(dtype, torch.dtype) else str_to_dtype(dtype)
    return {name: t.to(target) for name, t in tensors.items()}


def require_keys(tensors: dict[str, Tensor], keys: list[str], where: Any) -> None:
    """An error naming ``where`` and the missing tensors when one of ``keys`` is absent."""
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{where}: missing weights {missing} (found {sorted(tensors)})")


def in_folder(folder_name: str, name: str) -> str:
    """``name`` inside the repo folder ``folder_name`` (the repo root when empty)."""
    folder = folder_name.strip("/")
    return f"{folder}/{name}" if folder else name


def fetch_json(repo_id: str, filename: str, force_download: bool) -> dict[str, Any]:
    """The JSON object in ``filename`` of ``repo_id``."""
    path = fetch(repo_id, filename, force_download)
    assert path is not None
    return read_json(path, f"{repo_id}/{filename}")


def read_yaml(path: Path, where: str) -> dict[str, Any]:
    """The YAML mapping in the local file ``path``; errors name ``where``."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a YAML mapping, got {type(data).__name__}")
    return data


def fetch_yaml(repo_id: str, filename: str, force_download: bool) -> dict[str, Any]:
    """The YAML mapping in ``filename`` of ``repo_id``."""
    path = fetch(repo_id, filename, force_download)
    assert path is not None
    return read_yaml(path, f"{repo_id}/{filename}")


def field(config: dict[str, Any], *keys: str, where: str) -> Any:
    """``config[keys[0]][keys[1]]...``; a missing key is an error naming ``where`` and
    the dotted path of the key."""
    value: Any = config
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            dotted = ".".join(keys[: depth + 1])
            found = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{where}: config has no {dotted!r} (found {found})")
        value = value[key]
    return value


def number(config: dict[str, Any], *keys: str, where: str, integer: bool = False) -> Any:
    """:func:`field`, checked to be a number (an int when ``integer``)."""
    value = field(config, *keys, where=where)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise ValueError(f"{where}: {'.'.join(keys)!r} must be {kind}, got {value!r}")
    return value


def fetch_safetensors(
    repo_id: str,
    filename: str,
    keys: list[str],
    *,
    device: str,
    dtype: str | torch.dtype | None,
    force_download: bool,
) -> dict[str, Tensor]:
    """Every tensor of the safetensors file ``filename`` of ``repo_id`` (cast to ``dtype``
    when given), after checking ``keys`` are among them."""
    path = fetch(repo_id, filename, force_download)
    assert path is not None
    try:
        tensors = read_weights(path, device, dtype)
    except ValueError as e:
        raise ValueError(f"{repo_id}/{filename}: {e}") from None
    require_keys(tensors, keys, f"{repo_id}/{filename}")
    return tensors


def _torch_load(path: Path, device: str) -> Any:
    # mmap keeps a multi-GB checkpoint out of memory until its tensors are used; files
    # in torch's legacy (pre-zip) format cannot be mapped and are read whole
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    return torch.load(path, map_location=device, weights_only=True)


def fetch_torch_weights(
    repo_id: str,
    filename: str,
    keys: list[str],
    *,
    device: str,
    dtype: str | torch.dtype | None = None,
    force_download: bool,
) -> dict[str, Tensor]:
    """The tensors ``keys`` of the ``torch.save`` state dict ``filename`` of ``repo_id``
    (cast to ``dtype`` when given). Only tensors are unpickled (``weights_only``)."""
    where = f"{repo_id}/{filename}"
    path = fetch(repo_id, filename, force_download)
    assert path is not None
    check_device(device)
    try:
        obj = _torch_load(path, device)
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as e:
        raise ValueError(f"{where}: truncated or corrupt torch file ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a state dict of tensors, got {type(obj).__name__}")
    require_keys(obj, keys, where)
    target = None if dtype is None else str_to_dtype(dtype)
    tensors = {}
    for key in keys:
        tensor = obj[key]
        if not isinstance(tensor, Tensor) or tensor.dtype not in WEIGHT_DTYPES:
            kind = str(tensor.dtype) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{where}: {key!r} must be a floating-point tensor, got {kind}")
        tensors[key] = tensor if target is None else tensor.to(target)
    return tensors
