"""The SAELens 6.x directory format: ``cfg.json`` + ``sae_weights.safetensors``
(+ optional ``sparsity.safetensors``), read and written byte-compatibly.

Every error names the file and what is wrong with it. Nothing is half-loaded (the
SAE is built only after every check passed) and nothing is half-written or torn: a save
writes a complete new folder beside the destination and swaps it in as a whole
(:mod:`fastsae.loading.atomic_dir`; a reader applies its recovery rule first), so a
kill or a failed rename at any moment leaves exactly the old SAE or exactly the new one.

A save replaces the files fastsae owns in an SAE folder (:data:`SAE_FILENAMES`, plus
the ``extra_files`` a writer adds): one it does not write this time (``sparsity`` not
given) is gone afterwards, never left stale beside the new weights. Everything else a
user put in the folder (a README, plots, ``metrics.jsonl`` of the run) is carried over
into the new folder (hard-linked, or copied where links are impossible).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fastsae.loading.atomic_dir import recover_dir, replace_dir
from fastsae.saes.config import (
    LLM_METADATA_KEYS,
    SAE_LENS_FORMAT_VERSION,
    SAEConfig,
    str_to_dtype,
)
from fastsae.saes.registry import config_class_for_architecture, sae_class_for_architecture

if TYPE_CHECKING:
    from fastsae.saes.base import SAE

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
# the files of an SAE folder that a save owns: written anew, never carried over
SAE_FILENAMES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME)
# the dtypes SAE weights may be stored in (each widens to the SAE's dtype exactly)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# per-file temporaries of fastsae versions that renamed files one at a time
_LEGACY_FILE_TMP = re.compile(r"^\..+\.(json|safetensors)(\.[A-Za-z0-9_]+)?\.tmp$")


class PretrainedSaeDiskLoader(Protocol):
    """Reads one SAE directory: ``(cfg_dict, state_dict)``, the config not yet defaulted
    (``SAE.load_from_disk(path, converter=...)``; sae-lens's protocol)."""

    def __call__(
        self,
        path: str | Path,
        device: str,
        cfg_overrides: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], dict[str, Tensor]]: ...


# ---------------------------------------------------------------------------- reading
def read_json(path: Path, where: str | Path | None = None) -> dict[str, Any]:
    """Parse a JSON object file; errors name ``where`` (default: the file)."""
    where = path if where is None else where
    if not path.is_file():
        raise FileNotFoundError(f"{where}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, after checking this machine has it: an error
    names the device (and says CUDA is not available) instead of failing later."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {str(device)!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {str(device)!r}: CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {str(device)!r}: this machine has {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    elif dev.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # noqa: BLE001 - each backend raises its own type
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(
                f"device {str(device)!r} is not available on this machine ({first})"
            ) from None
    return dev


def check_weight_dtypes(tensors: dict[str, Tensor], where: str | Path) -> None:
    """Every tensor is in one of :data:`WEIGHT_DTYPES`: an int8 or bool tensor would
    otherwise be cast to floats silently. Errors name ``where`` and the tensor."""
    for name, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise ValueError(
                f"{where}: tensor {name!r} has dtype {dtype}; SAE weights must be "
                "float16, bfloat16, float32 or float64"
            )


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of a safetensors file of SAE weights (floating point, see
    :func:`check_weight_dtypes`); a missing, truncated or corrupt file, another dtype
    or an unusable ``device`` raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    check_device(device)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({e})") from None
    check_weight_dtypes(tensors, path)
    return tensors


def read_log_sparsity(
    path: Path, device: str | torch.device = "cpu", *, d_sae: int | None = None
) -> Tensor | None:
    """``sparsity.safetensors`` -> its ``sparsity`` tensor, or None when the file is absent.

    Given ``d_sae`` (the SAE's), a vector of another shape is an error naming the file.
    """
    if not path.exists():
        return None
    tensors = read_safetensors(path, device)
    if "sparsity" not in tensors:
        raise ValueError(f"{path}: no 'sparsity' tensor (found {sorted(tensors)})")
    sparsity = tensors["sparsity"]
    # a [1, d_sae] vector is still that SAE's (the length is what must match)
    if d_sae is not None and (sparsity.numel() != d_sae or max(sparsity.shape, default=1) != d_sae):
        raise ValueError(
            f"{path}: sparsity has shape {list(sparsity.shape)}, but the SAE beside it has "
            f"d_sae={d_sae} (expected [{d_sae}]); the file belongs to another SAE"
        )
    return sparsity


def sae_lens_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a SAELens-format directory: ``(cfg_dict, state_dict)``, config not yet defaulted."""
    path = recover_dir(Path(path))
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: SAE directory not found")
    cfg_dict = read_json(path / SAE_CFG_FILENAME)
    cfg_dict["device"] = device
    if cfg_overrides:
        cfg_dict.update(cfg_overrides)
    state_dict = read_safetensors(path / SAE_WEIGHTS_FILENAME, device)
    return cfg_dict, state_dict


# ---------------------------------------------------------------------------- configs
def _format_version(cfg_dict: dict[str, Any]) -> tuple[int, ...] | None:
    version = cfg_dict.get("sae_lens_version")
    if not version and isinstance(cfg_dict.get("metadata"), dict):
        version = cfg_dict["metadata"].get("sae_lens_version")
    if not version:
        return None
    parts = []
    for piece in str(version).replace("-", ".").split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts) or None


def handle_config_defaulting(cfg_dict: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """Bring a cfg.json dict to the 6.x layout (configs older than SAELens 6.0 are rewritten).

    ``where`` (the file or directory it came from) prefixes any error message.
    """
    version = _format_version(cfg_dict)
    if version is None or version < (6,):
        try:
            cfg_dict = handle_pre_6_0_config(cfg_dict)
        except ValueError as e:
            if where is None:
                raise
            raise ValueError(f"{where}: invalid SAE config: {e}") from None
    cfg_dict.setdefault("architecture", "standard")
    return cfg_dict


def handle_pre_6_0_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """A flat pre-6.0 config (``hook_point``, ``activation_fn_str``, boolean
    ``normalize_activations``, ``activation_fn_kwargs={"k": ...}``) -> the 6.x layout."""
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    cfg = {renames.get(k, k): v for k, v in cfg_dict.items()}
    cfg.setdefault("prepend_bos", True)
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("activation_fn", "relu")
    cfg.setdefault("architecture", "standard")
    cfg.setdefault(
        "reshape_activations", "hook_z" if "hook_z" in (cfg.get("hook_name") or "") else "none"
    )
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk":
        if kwargs.get("k") is None:
            raise ValueError("activation_fn='topk' config has no activation_fn_kwargs['k']")
        cfg["architecture"] = "topk"
        cfg["k"] = kwargs["k"]
    normalize = cfg.get("normalize_activations")
    if isinstance(normalize, bool):
        cfg["normalize_activations"] = "expected_average_only_in" if normalize else "none"
    elif normalize is None:
        cfg["normalize_activations"] = "none"
    cfg.setdefault("device", "cpu")
    cfg.setdefault("dtype", "float32")

    arch = cfg["architecture"]
    names = set(config_class_for_architecture(arch).__dataclass_fields__)
    out = {k: v for k, v in cfg.items() if k in names and k != "metadata"}
    metadata = dict(cfg_dict.get("metadata") or {})
    metadata.update({k: v for k, v in cfg.items() if k in LLM_METADATA_KEYS})
    # the format is now 6.x: record that, and what produced the original
    metadata.setdefault("sae_lens_training_version", cfg.get("sae_lens_training_version"))
    metadata["sae_lens_version"] = SAE_LENS_FORMAT_VERSION
    out["metadata"] = metadata
    out["architecture"] = arch
    # carried for the state-dict fix-up below; not a config field
    out["finetuning_scaling_factor"] = bool(cfg.get("finetuning_scaling_factor", False))
    return out


def _fold_scaling_factor(
    cfg_dict: dict[str, Any], state_dict: dict[str, Tensor], where: str
) -> None:
    """SAELens < 6 could scale activations by ``scaling_factor [d_sae]`` before decoding.

    All ones is dropped (older files always wrote it); anything else is folded
    into ``W_dec`` rows, which gives exactly the same reconstruction.
    """
    factor = state_dict.pop("scaling_factor", state_dict.pop("finetuning_scaling_factor", None))
    if factor is None:
        return
    if torch.allclose(factor, torch.ones_like(factor)):
        return
    if not cfg_dict.get("finetuning_scaling_factor", False):
        raise ValueError(
            f"{where}: has a scaling_factor that is not all ones but the config "
            "says finetuning_scaling_factor=False"
        )
    if "W_dec" not in state_dict:
        raise ValueError(f"{where}: scaling_factor present but no W_dec")
    state_dict["W_dec"] = state_dict["W_dec"] * factor.to(state_dict["W_dec"].dtype)[:, None]


# ---------------------------------------------------------------------------- building
def build_sae(
    cfg_dict: dict[str, Any],
    state_dict: dict[str, Tensor],
    *,
    where: str,
    expected_cls: type[SAE] | None = None,
    validate: bool = False,
) -> SAE:
    """Config dict + state dict -> SAE, after checking names, shapes and (optionally) values.

    ``where`` names the source (file or directory) in every error message.
    """
    cfg_dict = dict(cfg_dict)
    check_weight_dtypes(state_dict, where)
    _fold_scaling_factor(cfg_dict, state_dict, where)
    try:
        cfg = SAEConfig.from_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: invalid SAE config: {e}") from None
    sae_cls = sae_class_for_architecture(cfg.architecture())
    if expected_cls is not None and not issubclass(sae_cls, expected_cls):
        raise ValueError(
            f"{where}: holds a {sae_cls.__name__} (architecture {cfg.architecture()!r}), "
            f"which is not a {expected_cls.__name__}; load it with {sae_cls.__name__} or SAE"
        )
    device = cfg.device
    cfg.device = "meta"  # build without allocating, then assign the loaded tensors
    sae = sae_cls(cfg)
    sae.cfg.device = device
    sae.device = torch.device(device)
    sae.process_state_dict_for_loading(state_dict)

    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match architecture {cfg.architecture()!r}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise ValueError(
                f"{where}: weight {name!r} has shape {list(got)} but the config "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {list(shape)}"
            )
    if validate:
        for name, tensor in state_dict.items():
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"{where}: weight {name!r} has {bad} NaN/inf values")
    dtype = str_to_dtype(cfg.dtype)
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    sae.load_state_dict(state_dict, assign=True)
    return sae.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------- writing
def _carried_over(name: str) -> bool:
    """What a save keeps of the folder it replaces: all but the SAE's own files and
    the per-file temporaries older fastsae versions could leave behind."""
    return name not in SAE_FILENAMES and not _LEGACY_FILE_TMP.match(name)


def save_sae(
    sae: SAE,
    path: str | Path,
    *,
    sparsity: Tensor | None = None,
    extra_files: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``sae`` to ``path`` in the SAELens 6.x format; returns (weights path, cfg path).

    Everything is checked and serialised first; then the folder is replaced as a whole
    (see the module docstring): a failure or a kill at any moment leaves the previous
    folder or the new one, never new weights beside an old ``cfg.json``.
    ``extra_files`` (``{file name: text}``, e.g. a run's config) are written inside the
    same swap.
    """
    state_dict = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving(state_dict)
    return write_sae_dir(
        path,
        lambda p: save_file(state_dict, str(p)),
        sae.cfg.to_dict(),
        d_sae=sae.cfg.d_sae,
        sparsity=sparsity,
        extra_files=extra_files,
    )


def write_sae_dir(
    path: str | Path,
    write_weights: Callable[[Path], None],
    cfg_dict: dict[str, Any],
    *,
    d_sae: int,
    sparsity: Tensor | None = None,
    extra_files: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """The files of an SAELens directory, written as :func:`save_sae` says (a complete
    folder swapped in as a whole). ``write_weights(file)`` writes
    ``sae_weights.safetensors``'s content to ``file``."""
    path = Path(path)
    if sparsity is not None and tuple(sparsity.shape) != (d_sae,):
        raise ValueError(f"sparsity must be [d_sae]=[{d_sae}], got {tuple(sparsity.shape)}")
    config_text = json.dumps(cfg_dict)  # a config that cannot be written fails here
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name in SAE_FILENAMES or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"extra file {name!r}: must be a plain file name, not an SAE file")
    sparsity_tensors = (
        {"sparsity": sparsity.detach().contiguous().cpu()} if sparsity is not None else None
    )

    def write(folder: Path) -> None:
        write_weights(folder / SAE_WEIGHTS_FILENAME)
        if sparsity_tensors is not None:
            save_file(sparsity_tensors, str(folder / SPARSITY_FILENAME))
        for name, text in extra_files.items():
            (folder / name).write_text(text)
        (folder / SAE_CFG_FILENAME).write_text(config_text)

    replace_dir(path, write, carry_over=_carried_over)
    return path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME


def load_torch_file(path: Path, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a file (``what`` it holds, for the message); a
    missing, truncated or corrupt file raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - name the file whatever torch raised
        raise ValueError(f"{path}: unreadable {what}, truncated or corrupt ({e})") from e


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (any dtype; ``what`` it holds,
    for the message); a missing, truncated or corrupt file raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable {what}, truncated or corrupt ({e})") from e
