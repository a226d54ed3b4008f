"""The fields every SAE config has (:class:`SAEConfig`), its metadata (:class:`SAEMetadata`)
and the dtype names; each architecture's own config class lives in its module
(:mod:`fastsae.saes.topk`, ...) and is found through :mod:`fastsae.saes.registry`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from fastsae import __version__ as FASTSAE_VERSION
from fastsae.saes.registry import config_class_for_architecture, known_architectures

# The sae-lens release whose format and behaviour fastsae matches (the parity target).
# It fills ``sae_lens_version`` / ``sae_lens_training_version`` where sae-lens writes
# its own ``__version__``. A cfg.json whose metadata carries no sae_lens_version >= 6
# is read as a pre-6.0 config, so every file we write says which format it is in.
SAE_LENS_FORMAT_VERSION = "6.54.12"

DTYPE_MAP: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
    "torch.float64": torch.float64,
    "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
}
_DTYPE_TO_STR = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}

NORMALIZE_ACTIVATIONS = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)
RESHAPE_ACTIVATIONS = ("none", "hook_z")

# Metadata keys a language-model SAE may carry; readable flat as ``cfg.hook_name``.
LLM_METADATA_KEYS = frozenset(
    {
        "model_name",
        "hook_name",
        "model_class_name",
        "hook_head_index",
        "model_from_pretrained_kwargs",
        "prepend_bos",
        "exclude_special_tokens",
        "neuronpedia_id",
        "context_size",
        "seqpos_slice",
        "dataset_path",
        "sae_lens_version",
        "sae_lens_training_version",
        "hook_name_out",
        "hook_head_index_out",
        "hf_hook_name",
        "hf_hook_name_out",
    }
)


def str_to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"torch.bfloat16"`` / ``torch.float16`` -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_TO_STR:
            raise ValueError(f"unsupported dtype {dtype}; expected one of {sorted(set(DTYPE_MAP))}")
        return dtype
    if dtype not in DTYPE_MAP:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_MAP)}")
    return DTYPE_MAP[dtype]


def dtype_to_str(dtype: torch.dtype | str) -> str:
    """torch dtype (or its name) -> the canonical short name, e.g. ``"float32"``."""
    return _DTYPE_TO_STR[str_to_dtype(dtype)]


class SAEMetadata:
    """What an SAE was trained on and how to use it (model_name, hook_name, ...).

    Any key may be set; reading a key that was never set gives None, as in SAELens.
    Supports both attribute (``md.hook_name``) and item (``md["hook_name"]``) access.

    ``sae_lens_version`` / ``sae_lens_training_version`` default to the sae-lens
    release fastsae matches, where SAELens puts its own version; ``fastsae_version``
    (beside them) to this fastsae's. A value given (read from a file) is kept.
    """

    def __init__(self, **kwargs: Any):
        self.sae_lens_version = kwargs.pop("sae_lens_version", SAE_LENS_FORMAT_VERSION)
        self.sae_lens_training_version = kwargs.pop(
            "sae_lens_training_version", SAE_LENS_FORMAT_VERSION
        )
        self.fastsae_version = kwargs.pop("fastsae_version", FASTSAE_VERSION)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.__dict__

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    def keys(self):
        return self.__dict__.keys()

    def values(self):
        return self.__dict__.values()

    def items(self):
        return self.__dict__.items()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEMetadata:
        return cls(**data)

    def __repr__(self) -> str:
        return f"SAEMetadata({self.__dict__})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SAEMetadata) and self.__dict__ == other.__dict__

    def __deepcopy__(self, memo: dict[int, Any]) -> SAEMetadata:
        return SAEMetadata(**copy.deepcopy(self.__dict__, memo))

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class SAEConfig:
    """Fields every SAE has. Subclasses add their own and name their architecture.

    ``cfg.hook_name``-style flat access reads (and writes) ``cfg.metadata``, so code
    written against SAELens 5 configs keeps working.
    """

    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    metadata: SAEMetadata = field(default_factory=SAEMetadata)

    _architecture: ClassVar[str | None] = None

    @classmethod
    def architecture(cls) -> str:
        if cls._architecture is None:
            raise TypeError(f"{cls.__name__} is abstract: it names no architecture")
        return cls._architecture

    def __post_init__(self) -> None:
        if type(self)._architecture is None:
            raise TypeError(
                f"{type(self).__name__} is abstract; use the config class of one of "
                f"{known_architectures()}"
            )
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_to_str(self.dtype)
        else:
            str_to_dtype(self.dtype)  # raises on an unknown name
        self.device = str(self.device)
        if self.normalize_activations not in NORMALIZE_ACTIVATIONS:
            raise ValueError(
                f"normalize_activations must be one of {NORMALIZE_ACTIVATIONS}, "
                f"got {self.normalize_activations!r}"
            )
        if self.reshape_activations not in RESHAPE_ACTIVATIONS:
            raise ValueError(
                f"reshape_activations must be one of {RESHAPE_ACTIVATIONS}, "
                f"got {self.reshape_activations!r}"
            )
        if isinstance(self.metadata, dict):
            self.metadata = SAEMetadata(**self.metadata)
        elif not isinstance(self.metadata, SAEMetadata):
            raise TypeError(f"metadata must be SAEMetadata or dict, got {type(self.metadata)}")

    # flat access to metadata (cfg.hook_name), as in SAELens < 6
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "metadata":
            raise AttributeError(name)
        metadata = self.__dict__.get("metadata")
        if metadata is not None and (name in metadata or name in LLM_METADATA_KEYS):
            return metadata[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in LLM_METADATA_KEYS and name not in self.__dataclass_fields__:
            self.metadata[name] = value
        else:
            super().__setattr__(name, value)

    def to_dict(self) -> dict[str, Any]:
        """The cfg.json dict: every field, metadata as a dict, and ``architecture``."""
        res = {f.name: getattr(self, f.name) for f in fields(self)}
        res["metadata"] = self.metadata.to_dict()
        res["architecture"] = self.architecture()
        return res

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> SAEConfig:
        """Build the config class named by ``config_dict["architecture"]``.

        Keys that are not fields of that class are ignored (cfg.json files carry
        training-only keys); ``metadata`` becomes an SAEMetadata.
        """
        arch = config_dict.get("architecture")
        if arch is None:
            if cls._architecture is None:
                raise ValueError("config dict has no 'architecture' key")
            arch = cls._architecture
        cfg_cls = config_class_for_architecture(arch)
        if not issubclass(cfg_cls, cls):
            raise ValueError(
                f"architecture {arch!r} gives {cfg_cls.__name__}, not a {cls.__name__}"
            )
        names = {f.name for f in fields(cfg_cls)}
        kwargs = {k: v for k, v in config_dict.items() if k in names and k != "metadata"}
        kwargs["metadata"] = SAEMetadata(**dict(config_dict.get("metadata") or {}))
        return cfg_cls(**kwargs)
